"""Data parallelism with two CPU processes (gloo): with ``num_items_in_batch=num_items_for_ddp(...)``
the gradients DDP leaves on every rank equal the single-process gradient of the global mean (fp32
rounding), with uneven counted tokens per rank, for the top-k KL, the fused head (hidden states
through the DDP wrapper, the head weight a parameter of the wrapped module) and PLD, each also with
gradient accumulation over 2 micro-batches; the fused head fed by an unwrapped submodule is shown to skip
the synchronisation. ``register_loss`` keeps ``TRGLoss``'s projection heads equal on both ranks."""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import kdloss
from kdloss.distributed import num_items_for_ddp, register_loss, world_size
from kdloss.functional import fused_linear_topk_kl_loss, plackett_luce_loss, topk_kl_loss
from kdloss.sparse import topk_teacher

from helpers import spawn_ranks

WORLD = 2
MICRO = 2  # micro-batches per optimizer step in the accumulation scenario
POSITIONS = (2, 3)  # labels shape of one micro-batch: [batch, sequence]
# counted (label != -100) positions of micro-batch m on rank r: deliberately uneven
COUNTED = {(0, 0): 5, (0, 1): 1, (1, 0): 2, (1, 1): 6}
D_IN, HIDDEN, VOCAB, K = 5, 8, 24, 4
TOPK_OPTIONS = dict(temperature=2.0)
TIMEOUT_S = 240
RTOL, ATOL = 1e-5, 1e-7  # fp32 rounding: DDP averages rank gradients in a different order


class TinyLM(nn.Module):
    """Hidden states from a small body, logits from a bias-free head (an LM in miniature)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(D_IN, HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def hidden(self, x):
        return torch.tanh(self.body(x))

    def forward(self, x, hidden_only: bool = False):
        h = self.hidden(x)
        return h if hidden_only else self.lm_head(h)


def make_model() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM()


def micro_batch(rank: int, micro: int) -> dict:
    """Inputs, labels (uneven counts) and the top-k teacher of one micro-batch of one rank."""
    gen = torch.Generator().manual_seed(100 + 10 * rank + micro)
    n = POSITIONS[0] * POSITIONS[1]
    x = torch.randn(*POSITIONS, D_IN, generator=gen)
    labels = torch.randint(0, VOCAB, (n,), generator=gen)
    labels[COUNTED[(rank, micro)]:] = -100
    labels = labels[torch.randperm(n, generator=gen)].reshape(POSITIONS)
    teacher = 3 * torch.randn(*POSITIONS, VOCAB, generator=gen)
    ids, logp = topk_teacher(teacher, K)
    return {"x": x, "labels": labels, "ids": ids, "logp": logp, "teacher": teacher}


def concat(batches: list[dict]) -> dict:
    return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}


def grads_of(model: nn.Module) -> dict:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------
# The losses, called the same way on one rank and on the whole batch


def topk_step(model_or_ddp, batch, num_items=None):
    logits = model_or_ddp(batch["x"])
    return topk_kl_loss(logits, batch["ids"], batch["logp"], batch["labels"], num_items_in_batch=num_items,
                        **TOPK_OPTIONS)


def fused_step(model_or_ddp, batch, num_items=None):
    """The documented recipe: hidden states through the (DDP) wrapper, the head weight taken from
    the wrapped module's parameters and used outside the forward."""
    inner = model_or_ddp.module if isinstance(model_or_ddp, DDP) else model_or_ddp
    hidden = model_or_ddp(batch["x"], hidden_only=True)
    return fused_linear_topk_kl_loss(hidden, inner.lm_head.weight, batch["ids"], batch["logp"], labels=batch["labels"],
                                     num_items_in_batch=num_items, chunk_size=4, **TOPK_OPTIONS)


def naive_fused_step(ddp, batch, num_items=None):
    """The trap: hidden states from the unwrapped module, so DDP never sees the iteration."""
    hidden = ddp.module.hidden(batch["x"])
    return fused_linear_topk_kl_loss(hidden, ddp.module.lm_head.weight, batch["ids"], batch["logp"],
                                     labels=batch["labels"], num_items_in_batch=num_items, chunk_size=4,
                                     **TOPK_OPTIONS)


def pld_step(model_or_ddp, batch, num_items=None):
    logits = model_or_ddp(batch["x"])
    return plackett_luce_loss(logits, batch["teacher"], batch["labels"], temperature=2.0,
                              num_items_in_batch=num_items)


STEPS = {"topk": topk_step, "fused": fused_step, "naive_fused": naive_fused_step, "pld": pld_step}
# scenario -> (step, micro-batches per optimizer step)
SCENARIOS = {
    "topk": ("topk", 1),
    "fused": ("fused", 1),
    "topk_accumulate": ("topk", MICRO),
    "fused_accumulate": ("fused", MICRO),
    "pld": ("pld", 1),
    "pld_accumulate": ("pld", MICRO),
    "naive_fused": ("naive_fused", 1),
}


def ddp_gradients(rank: int, step_name: str, micro: int) -> dict:
    """One optimizer step's gradients on this rank: ``micro`` micro-batches, DDP's reduction only
    on the last (``no_sync`` before), every loss divided by ``num_items_for_ddp`` of the step."""
    ddp = DDP(make_model())
    batches = [micro_batch(rank, m) for m in range(micro)]
    num_items = num_items_for_ddp([b["labels"] for b in batches])
    losses = []
    for m, batch in enumerate(batches):
        if m < micro - 1:
            with ddp.no_sync():
                loss = STEPS[step_name](ddp, batch, num_items)
                loss.backward()
        else:
            loss = STEPS[step_name](ddp, batch, num_items)
            loss.backward()
        losses.append(loss.detach())
    return {"grads": grads_of(ddp.module), "loss": torch.stack(losses).sum(), "num_items": num_items}


def single_process_gradients(step_name: str, micro: int) -> dict:
    """The reference: the global batch (every micro-batch of every rank) in one process, plain mean."""
    model = make_model()
    batch = concat([micro_batch(r, m) for r in range(WORLD) for m in range(micro)])
    step = fused_step if step_name == "naive_fused" else STEPS[step_name]
    loss = step(model, batch)
    loss.backward()
    return {"grads": grads_of(model), "loss": loss.detach()}


# ---------------------------------------------------------------------------------------------
# TRGLoss: trainable projection heads inside a loss module


class TokenStudent(nn.Module):
    def __init__(self, d_in=6, d_student=8):
        super().__init__()
        self.proj = nn.Linear(d_in, d_student)

    def forward(self, x):
        return self.proj(x)


def trg_batch(rank: int):
    gen = torch.Generator().manual_seed(500 + rank)
    return torch.randn(2, 10, 6, generator=gen), torch.randn(2, 10, 12, generator=gen)


def make_trg(seed: int):
    torch.manual_seed(seed)
    return kdloss.TRGLoss(student_dim=8, teacher_dim=12, embed_dim=4, num_samples=6, k=3, sigma=8.0)


def trg_weights(rank: int, registered: bool) -> dict:
    """One SGD step with the TRG projections registered on the DDP-wrapped model (the recipe), or
    kept in a loss module outside it with its own optimizer entry (the trap). The loss modules are
    built with a different seed on each rank, as a user's would be without care."""
    torch.manual_seed(0)
    student = TokenStudent()
    trg = make_trg(seed=rank)
    if registered:
        register_loss(student, trg, name="trg")
        ddp = DDP(student)
        params = list(ddp.parameters())
    else:
        ddp = DDP(student)
        params = list(ddp.parameters()) + list(trg.parameters())
    optimizer = torch.optim.SGD(params, lr=0.5)
    x, teacher = trg_batch(rank)
    gen = torch.Generator().manual_seed(7 + rank)
    loss = trg(ddp(x), teacher, generator=gen)
    loss.backward()
    optimizer.step()
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return {
        "weights": {name: p.detach().clone() for name, p in trg.named_parameters()},
        "all_in_optimizer": all(id(p) in in_optimizer for p in trg.parameters()),
        "in_model_state": any(key.startswith("trg.") for key in student.state_dict()),
    }


# ---------------------------------------------------------------------------------------------
# The two-process run


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        results = {"world": world_size()}
        results["num_items_one"] = num_items_for_ddp(micro_batch(rank, 0)["labels"])
        results["num_items_tuple"] = num_items_for_ddp(tuple(micro_batch(rank, m)["labels"] for m in range(MICRO)))
        for name, (step_name, micro) in SCENARIOS.items():
            results[name] = ddp_gradients(rank, step_name, micro)
        results["trg_registered"] = trg_weights(rank, registered=True)
        results["trg_outside"] = trg_weights(rank, registered=False)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def per_rank(tmp_path_factory):
    """Runs the two gloo workers once for the whole module; returns each rank's results."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    return spawn_ranks(_worker, WORLD, tmp_path_factory.mktemp("ddp"), TIMEOUT_S)


def max_grad_diff(a: dict, b: dict) -> float:
    return max((a[name] - b[name]).abs().max().item() for name in a)


def test_num_items_is_the_global_count_over_the_group_size(per_rank):
    assert [r["world"] for r in per_rank] == [WORLD, WORLD]
    one = sum(COUNTED[(r, 0)] for r in range(WORLD)) / WORLD
    every = sum(COUNTED.values()) / WORLD
    for results in per_rank:
        assert results["num_items_one"].shape == () and results["num_items_one"].item() == one
        assert results["num_items_tuple"].item() == every


@pytest.mark.parametrize("scenario", ["topk", "fused", "pld", "topk_accumulate", "fused_accumulate", "pld_accumulate"])
def test_ddp_gradients_equal_the_single_process_gradient_of_the_global_mean(per_rank, scenario):
    step_name, micro = SCENARIOS[scenario]
    expected = single_process_gradients(step_name, micro)
    for results in per_rank:
        got = results[scenario]["grads"]
        for name in expected["grads"]:
            torch.testing.assert_close(got[name], expected["grads"][name], rtol=RTOL, atol=ATOL,
                                       msg=lambda m, name=name: f"{scenario} {name}: {m}")
    # the ranks' losses (each S_r / d) average to the global mean
    mean_of_ranks = sum(r[scenario]["loss"] for r in per_rank) / WORLD
    torch.testing.assert_close(mean_of_ranks, expected["loss"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("step_name", ["topk", "pld"])
def test_local_normalisation_would_be_wrong(step_name):
    """The counts are uneven on purpose: averaging each rank's own mean (what DDP does with the
    default normalisation) gives a different gradient, so the equality above is a real test of
    ``num_items_for_ddp``."""
    expected = single_process_gradients(step_name, 1)
    local = []
    for rank in range(WORLD):
        model = make_model()
        STEPS[step_name](model, micro_batch(rank, 0)).backward()
        local.append(grads_of(model))
    averaged = {name: (local[0][name] + local[1][name]) / 2 for name in local[0]}
    assert max_grad_diff(averaged, expected["grads"]) > 1e-3


def test_fused_head_fed_by_an_unwrapped_submodule_is_not_synchronised(per_rank):
    """``ddp.module.hidden(x)`` bypasses the DDP forward: every rank keeps its local gradient (the
    documented trap; the recipe above goes through the wrapper)."""
    expected = single_process_gradients("naive_fused", 1)
    naive = [r["naive_fused"]["grads"] for r in per_rank]
    assert max_grad_diff(naive[0], naive[1]) > 1e-3
    assert all(max_grad_diff(g, expected["grads"]) > 1e-3 for g in naive)


def test_registered_trg_projections_stay_equal_across_ranks(per_rank):
    registered = [r["trg_registered"] for r in per_rank]
    assert all(r["all_in_optimizer"] and r["in_model_state"] for r in registered)
    for name, weight in registered[0]["weights"].items():
        torch.testing.assert_close(registered[1]["weights"][name], weight, rtol=0, atol=0)
    # without register_loss the differently initialised heads stay different after the step
    outside = [r["trg_outside"] for r in per_rank]
    assert max_grad_diff(outside[0]["weights"], outside[1]["weights"]) > 1e-3


# ---------------------------------------------------------------------------------------------
# Single-process behaviour and argument checks


def test_without_a_process_group_it_is_the_local_count():
    assert not dist.is_initialized() and world_size() == 1
    labels = torch.tensor([[5, 7, -100], [3, -100, -100]])
    out = num_items_for_ddp(labels)
    assert out.shape == () and out.dtype == torch.float64 and out.item() == 3
    assert num_items_for_ddp([labels, labels[:1].to(torch.int32)]).item() == 5
    assert num_items_for_ddp(labels, ignore_index=5).item() == 5


def test_single_process_accumulation_equals_the_mean_over_the_step():
    """Two micro-batches divided by the step's count give the gradient of one big batch."""
    batches = [micro_batch(0, m) for m in range(MICRO)]
    model = make_model()
    num_items = num_items_for_ddp([b["labels"] for b in batches])
    for batch in batches:
        topk_step(model, batch, num_items).backward()
    reference = make_model()
    topk_step(reference, concat(batches)).backward()
    assert max_grad_diff(grads_of(model), grads_of(reference)) < 1e-6


@pytest.mark.parametrize("labels, error", [
    (torch.ones(3), TypeError),
    ([torch.ones(3, dtype=torch.long), "x"], TypeError),
    ([], ValueError),
    (3, TypeError),
])
def test_bad_labels_are_rejected(labels, error):
    with pytest.raises(error, match="labels"):
        num_items_for_ddp(labels)


def test_bad_ignore_index_is_rejected():
    with pytest.raises(TypeError, match="ignore_index"):
        num_items_for_ddp(torch.zeros(3, dtype=torch.long), ignore_index=1.5)


def test_register_loss_adds_the_parameters_once_and_refuses_wrapped_models():
    student = TokenStudent()
    trg = make_trg(seed=0)
    assert register_loss(student, trg) is student
    names = {name for name, _ in student.named_parameters()}
    assert {"distillation_loss.student_proj.weight", "distillation_loss.teacher_proj.weight"} <= names
    with pytest.raises(ValueError, match="name"):
        register_loss(student, make_trg(seed=1))
    with pytest.raises(ValueError, match="unwrapped"):
        register_loss(torch.compile(TokenStudent()), make_trg(seed=1))
    with pytest.raises(TypeError, match="loss"):
        register_loss(TokenStudent(), lambda s, t: 0)
