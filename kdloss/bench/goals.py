"""The GPU performance goals of kdloss: one forward + backward workload per row, its time goal on an
H100 and, where there is one, its memory goal, with the implementations to measure against it.

``python -m kdloss.selftest`` (the ``bench`` stage) measures every goal and writes the result next to
the goal. Times are for one forward + backward step; ``memory`` is the peak extra device memory of
one step beyond the gradients it returns (a loss cannot avoid allocating its own gradient).

An H200 has the H100's arithmetic and about 1.4 times its memory bandwidth, so the time goal of a
memory-bound workload (``memory_bound=True``: it streams a tensor far larger than the caches) is
divided by 1.4 there; the others keep the H100 figure.

Example::

    from kdloss.bench.goals import GOALS
    goal = GOALS[0]
    inputs, impls = goal.make("cuda", quick=False)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..functional import margin_mse_loss, plackett_luce_loss, sinkhorn_loss, token_contextual_loss
from . import margin_mse as margin_bench
from . import plackett_luce as pld_bench
from . import sinkhorn as sinkhorn_bench
from . import token_contextual as contextual_bench
from .fused_linear_topk_kl import eager as fused_eager
from .fused_linear_topk_kl import fused, unfused
from .topk_kl import TEMPERATURE, eager_distillkit
from .topk_kl import kernel as topk_kernel

__all__ = ["GOALS", "Goal", "H200_BANDWIDTH_RATIO", "liger_fused_linear_jsd"]

#: H200 / H100 memory bandwidth (4.8 / 3.35 TB/s): memory-bound goals are this much tighter on an H200.
H200_BANDWIDTH_RATIO = 1.4
MIB = 2.0**20


@dataclass(frozen=True)
class Goal:
    """One workload with its goal.

    ``make(device, quick)`` returns ``(inputs, impls)``: the input tuple (leaves that need gradients
    first) and ``{name: fn(*inputs) -> loss}`` with ``"kdloss"`` first, then the eager code, peers
    (when installed) and ``"compile"`` (torch.compile of the eager code) last.
    ``memory_limit_mib(args)`` is the allowed extra memory beyond the gradients, from the shape.
    """

    loss: str
    workload: str
    args: dict
    quick_args: dict
    dtype: torch.dtype
    time_ms: float
    reference: str
    make: Callable[..., tuple]
    memory_bound: bool = False
    memory: str = ""
    memory_limit_mib: Callable[[dict], float] | None = None
    peers: tuple[str, ...] = field(default_factory=tuple)

    def shape(self, quick: bool = False) -> str:
        return " ".join(f"{k}={v}" for k, v in (self.quick_args if quick else self.args).items())

    def time_goal_ms(self, device_name: str) -> float:
        """The time goal on the named GPU (H100 figure; divided by 1.4 on an H200 if memory-bound)."""
        if self.memory_bound and "H200" in device_name.upper():
            return self.time_ms / H200_BANDWIDTH_RATIO
        return self.time_ms


def _gen(device: str, seed: int = 0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _teacher(rows: int, vocab: int, k: int, device: str, gen: torch.Generator):
    """Distinct teacher ids (one per ``V/k``-wide bucket) and fp32 log-probs, as in kdloss.bench.topk_kl."""
    stride = vocab // k
    ids = torch.arange(k, device=device) * stride + torch.randint(0, stride, (rows, k), device=device, generator=gen)
    logprobs = torch.log_softmax(torch.randn(rows, k, device=device, generator=gen), -1) - 0.3
    return ids, logprobs


def _compiled(fn):
    return torch.compile(fn)


def make_topk(device: str, dtype: torch.dtype, N: int, V: int, k: int):
    """Student logits ``[N, V]`` drawn on the device (the goal shape is 2.5 G elements)."""
    gen = _gen(device)
    logits = (2.0 * torch.randn(N, V, device=device, generator=gen)).to(dtype).requires_grad_()
    ids, logprobs = _teacher(N, V, k, device, gen)
    impls = {"kdloss": topk_kernel, "eager": eager_distillkit, "compile": _compiled(eager_distillkit)}
    return (logits, ids, logprobs), impls


def liger_fused_linear_jsd():
    """Liger-Kernel's fused linear JSD (dense teacher head: here the student's own hidden states and
    weight, detached) as ``fn(hidden, weight, ids, logprobs)``; None when Liger-Kernel is not installed."""
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except Exception:
        return None
    jsd = LigerFusedLinearJSD(jsd_beta=0.5, temperature=TEMPERATURE)

    def liger(hidden, weight, ids, logprobs):
        return jsd(hidden, weight, hidden.detach(), weight.detach())

    return liger


def make_fused(device: str, dtype: torch.dtype, N: int, H: int, V: int, k: int):
    gen = _gen(device)
    hidden = torch.randn(N, H, device=device, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, device=device, generator=gen) / H**0.5).to(dtype).requires_grad_()
    ids, logprobs = _teacher(N, V, k, device, gen)
    impls = {"kdloss": fused, "kdloss-unfused": unfused, "eager": fused_eager}
    liger = liger_fused_linear_jsd()
    if liger is not None:
        impls["liger-fljsd"] = liger
    impls["compile"] = _compiled(fused_eager)
    return (hidden, weight, ids, logprobs), impls


def _from_maker(make_inputs):
    return tuple(make_inputs())


def make_sinkhorn(device: str, dtype: torch.dtype, B: int, C: int):
    inputs = _from_maker(sinkhorn_bench._maker(B, C, device, dtype))
    impls = {"kdloss": lambda zs, zt: sinkhorn_loss(zs, zt, backend="kernel"),
             "eager": sinkhorn_bench.eager_official, "compile": _compiled(sinkhorn_bench.eager_official)}
    return inputs, impls


def make_pld(device: str, dtype: torch.dtype, B: int, C: int):
    inputs = _from_maker(pld_bench._maker(B, C, device, dtype))
    impls = {"kdloss": lambda s, t, y: plackett_luce_loss(s, t, y, backend="kernel"),
             "eager": pld_bench.pld_paper_eager, "compile": _compiled(pld_bench.pld_paper_eager)}
    return inputs, impls


def make_contextual(device: str, dtype: torch.dtype, B: int, N: int, D: int):
    inputs = _from_maker(contextual_bench._maker(B, N, D, device, dtype))
    impls = {"kdloss": lambda s, t: token_contextual_loss(s, t, backend="kernel"),
             "eager": contextual_bench.eager, "compile": _compiled(contextual_bench.eager)}
    return inputs, impls


def make_margin(device: str, dtype: torch.dtype, B: int):
    inputs = _from_maker(margin_bench._maker("scores", B, 1, 1, device, dtype))
    impls = {"kdloss": lambda p, n, t: margin_mse_loss(p, n, t, backend="kernel"),
             "eager": margin_bench.eager_scores, "compile": _compiled(margin_bench.eager_scores)}
    return inputs, impls


def _goal(loss, workload, make, args, quick_args, dtype, time_ms, reference, **extra) -> Goal:
    def build(device: str, quick: bool = False):
        return make(device, dtype, **(quick_args if quick else args))

    return Goal(loss, workload, args, quick_args, dtype, time_ms, reference, build, **extra)


GOALS: list[Goal] = [
    _goal("topk_kl", "top-k KL", make_topk, {"N": 16384, "V": 151936, "k": 64}, {"N": 64, "V": 4096, "k": 16},
          torch.bfloat16, 4.0, "eager 55.6 ms, compile 16.4 ms", memory_bound=True,
          memory="extra memory beyond the gradient within 10% of the gradient",
          memory_limit_mib=lambda a: 0.1 * a["N"] * a["V"] * 2 / MIB),
    _goal("fused_linear_topk_kl", "fused linear + top-k KL", make_fused, {"N": 8192, "H": 4096, "V": 151936, "k": 64},
          {"N": 64, "H": 64, "V": 2048, "k": 16}, torch.bfloat16, 42.0, "Liger FL-JSD 49.1 ms, compile 49.3 ms",
          memory="at most 1 GiB beyond the gradients", memory_limit_mib=lambda a: 1024.0, peers=("liger-fljsd",)),
    _goal("sinkhorn", "SinKD", make_sinkhorn, {"B": 32, "C": 2}, {"B": 32, "C": 2}, torch.float32, 0.05,
          "compile 2.7 ms"),
    _goal("sinkhorn", "SinKD", make_sinkhorn, {"B": 1024, "C": 100}, {"B": 64, "C": 10}, torch.float32, 0.3,
          "compile 3.5 ms"),
    _goal("plackett_luce", "PLD", make_pld, {"B": 1024, "C": 1000}, {"B": 64, "C": 100}, torch.float32, 0.05,
          "eager 0.89 ms"),
    _goal("plackett_luce", "PLD", make_pld, {"B": 256, "C": 32000}, {"B": 16, "C": 2000}, torch.float32, 0.3,
          "eager 2.48 ms"),
    _goal("token_contextual", "TRG contextual", make_contextual, {"B": 64, "N": 577, "D": 768},
          {"B": 2, "N": 64, "D": 32}, torch.bfloat16, 1.0, "",
          memory="O(N) extra: beyond the gradient, under 10% of one fp32 [B, N, N] matrix",
          memory_limit_mib=lambda a: 0.1 * a["B"] * a["N"] ** 2 * 4 / MIB),
    _goal("token_contextual", "TRG contextual", make_contextual, {"B": 8, "N": 4096, "D": 1024},
          {"B": 1, "N": 256, "D": 64}, torch.bfloat16, 5.0, "",
          memory="O(N) extra: beyond the gradient, under 10% of one fp32 [B, N, N] matrix",
          memory_limit_mib=lambda a: 0.1 * a["B"] * a["N"] ** 2 * 4 / MIB),
    _goal("margin_mse", "Margin-MSE (scores)", make_margin, {"B": 1 << 20}, {"B": 4096}, torch.float32, 0.03,
          "eager 0.16 ms"),
]
