"""Vocabulary parallelism over torch.distributed (gloo, CPU): loss and gradients of every rank equal the
single-process full-vocabulary loss and its gradient restricted to the rank's shard.

One spawn of 4 processes serves every case (spawning is the slow part): the 4-rank world (uneven and
empty shards), the pairs {0, 1} and {2, 3} (2 processes each, run side by side), a 2 × 2 DP × TP mesh,
DTensor inputs, the FSDP2 recipe, and SinKD / the token contrastive term with an explicit ``group``.
The workers record (actual, expected) tensors; the tests below compare them.

fp64: ``|actual − expected| ≤ 1e-10 · (1 + max|expected|)``. fp32 and bf16 (error rule with the single-process
kdloss result as the naive computation): ``err(actual) ≤ err(single-process, same dtype) + 16·eps·(1 + scale)``,
errors against the fp64 single-process result.
"""

from __future__ import annotations

import datetime
import os
import traceback

import pytest
import torch
import torch.distributed as dist

from kdloss.testing import max_abs

from helpers import spawn_ranks

WORLD = 4
TIMEOUT_S = 300
VARIANTS = [  # (values, tail, student_support)
    ("logprobs", "renorm", "full"),
    ("logprobs", "bucket", "full"),
    ("logprobs", "none", "full"),
    ("logprobs", "renorm", "topk"),
    ("logprobs", "none", "topk"),
    ("logits", "renorm", "full"),
]
TEMPERATURES = [(1.0, 1.0), (2.0, 1.5)]
REDUCTIONS = [("mean", None), ("sum", None), ("none", None), ("mean", 7)]


# ----------------------------------------------------------------------------------------------
# Inputs (the same on every process: seeded)


def _teacher_logits(rows, vocab, seed):
    return 3 * torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _teacher(rows, vocab, k, seed, values="logprobs", dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed + 7)
    teacher_logits = _teacher_logits(rows, vocab, seed)
    top = teacher_logits.log_softmax(-1).topk(k)
    ids, vals = top.indices, top.values if values == "logprobs" else teacher_logits.gather(1, top.indices)
    vals = vals.clone()
    vals[0, -1] = float("-inf")  # a padded slot (probability 0) ...
    ids[0, -1] = ids[0, 0]  # ... may repeat a kept id
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[1] = labels[-1] = -100
    return ids, vals.to(dtype), labels


def _student(rows, vocab, seed, dtype=torch.float64, sharp=False):
    """Random logits; ``sharp``: a sharpened copy of the teacher's, so that the student keeps more mass on
    the teacher's ids than the teacher does (the bucket gradient's α < 0)."""
    gen = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(rows, vocab, generator=gen, dtype=torch.float64)
    return (3 * _teacher_logits(rows, vocab, seed) + 0.1 * noise if sharp else 2 * noise).to(dtype)


def _bounds(sizes):
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    return [slice(a, a + n) for a, n in zip(starts, sizes, strict=True)]


def _grad(loss, leaves, upstream=None):
    if upstream is None:
        upstream = torch.full_like(loss, 0.7)
    return torch.autograd.grad(loss, leaves, upstream)


# ----------------------------------------------------------------------------------------------
# Worker cases: each returns {label: (actual, expected[, single-process fp32])}


def _topk_case(group, sizes, rank, options, reduction, num_items, dtype, seed, backend="auto", module=False,
               sharp=False):
    from kdloss import TopKKLLoss
    from kdloss.functional import topk_kl_loss

    rows, vocab, k = 9, sum(sizes), 5
    ids, vals, labels = _teacher(rows, vocab, k, seed, options["values"])
    full = _student(rows, vocab, seed, sharp=sharp)
    shard = _bounds(sizes)[rank]
    upstream = torch.randn(rows, generator=torch.Generator().manual_seed(seed + 2)) if reduction == "none" else None
    kwargs = dict(options, reduction=reduction)
    if num_items is not None:
        kwargs["num_items_in_batch"] = num_items
    out = {}
    exact = {}
    for dt in {dtype, torch.float64}:
        z = full.to(dt).requires_grad_()
        loss = topk_kl_loss(z, ids, vals, labels, **kwargs)
        exact[dt] = (loss.detach(), _grad(loss, z, None if upstream is None else upstream.to(dt))[0][:, shard])
    local = full[:, shard].to(dtype).requires_grad_()
    if module:  # and leading dims [3, 3, ...]
        call_kwargs = {"num_items_in_batch": kwargs.pop("num_items_in_batch", None)}
        loss = TopKKLLoss(**kwargs, backend=backend, vocab_parallel_group=group)(
            local.view(3, 3, -1), ids.view(3, 3, k), vals.view(3, 3, k), labels.view(3, 3), **call_kwargs)
    else:
        loss = topk_kl_loss(local, ids, vals, labels, **kwargs, backend=backend, vocab_parallel_group=group)
    grad = _grad(loss, local, None if upstream is None else upstream.to(dtype))[0]
    for i, (name, actual) in enumerate((("loss", loss.detach()), ("grad", grad))):
        out[name] = (actual, exact[torch.float64][i]) + (() if dtype == torch.float64 else (exact[dtype][i],))
    return out


def _fused_case(group, sizes, rank, options, reduction, dtype, seed, *, bias=True, softcap=None, chunk_size=4,
                all_reduce=True, backend="auto"):
    from kdloss.functional import fused_linear_topk_kl_loss

    rows, hidden_dim, vocab, k = 10, 6, sum(sizes), 5
    ids, vals, labels = _teacher(rows, vocab, k, seed, options["values"])
    gen = torch.Generator().manual_seed(seed + 3)
    h = torch.randn(rows, hidden_dim, generator=gen, dtype=torch.float64)
    w = torch.randn(vocab, hidden_dim, generator=gen, dtype=torch.float64)
    b = torch.randn(vocab, generator=gen, dtype=torch.float64) if bias else None
    shard = _bounds(sizes)[rank]
    upstream = torch.randn(rows, generator=gen) if reduction == "none" else None
    kwargs = dict(options, reduction=reduction, softcap=softcap, chunk_size=chunk_size)

    def run(dt, weight_rows, **extra):
        leaves = [h.to(dt).requires_grad_(), w[weight_rows].to(dt).requires_grad_()]
        if bias:
            leaves.append(b[weight_rows].to(dt).requires_grad_())
        loss = fused_linear_topk_kl_loss(leaves[0], leaves[1], ids, vals, labels,
                                         bias=leaves[2] if bias else None, **kwargs, **extra)
        grads = _grad(loss, leaves, None if upstream is None else upstream.to(dt))
        return [loss.detach(), *grads]

    exact = {dt: run(dt, slice(None)) for dt in {dtype, torch.float64}}
    actual = run(dtype, shard, backend=backend, vocab_parallel_group=group, all_reduce_hidden_grad=all_reduce)
    out = {}
    for i, name in enumerate(["loss", "grad_hidden", "grad_weight", "grad_bias"][: len(actual)]):
        pick = (lambda t: t) if i < 2 else (lambda t: t[shard])  # noqa: B023 (used at once)
        if name == "grad_hidden" and not all_reduce:
            continue  # partial sums: checked across ranks by the test
        out[name] = (actual[i], pick(exact[torch.float64][i])) + (
            () if dtype == torch.float64 else (pick(exact[dtype][i]),))
    if not all_reduce:
        out["partial_hidden"] = (actual[1], exact[torch.float64][1])
    return out


def _fused_autocast_case(group, sizes, rank, seed):
    """Inside CPU bf16 autocast, a bf16 hidden (what autocast produces) with this rank's fp32 rows of the head:
    an fp32 loss and gradients in each input's dtype, as the single-process head gives on the same inputs."""
    from kdloss.functional import fused_linear_topk_kl_loss

    rows, hidden_dim, vocab, k = 10, 6, sum(sizes), 5
    ids, vals, labels = _teacher(rows, vocab, k, seed)
    gen = torch.Generator().manual_seed(seed + 3)
    h = torch.randn(rows, hidden_dim, generator=gen).to(torch.bfloat16)
    w, b = torch.randn(vocab, hidden_dim, generator=gen), torch.randn(vocab, generator=gen)
    shard = _bounds(sizes)[rank]

    def run(dtypes, weight_rows, autocast, **extra):
        leaves = [t.to(dt).requires_grad_() for t, dt in zip((h, w[weight_rows], b[weight_rows]), dtypes, strict=True)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = fused_linear_topk_kl_loss(leaves[0], leaves[1], ids, vals, labels, bias=leaves[2], chunk_size=4,
                                             **extra)
        return [loss.detach(), *_grad(loss, leaves)]

    mixed = (torch.bfloat16, torch.float32, torch.float32)
    actual = run(mixed, shard, True, vocab_parallel_group=group)
    assert [t.dtype for t in actual] == [torch.float32, *mixed], [t.dtype for t in actual]
    single = run(mixed, slice(None), True)
    exact = run((torch.float64,) * 3, slice(None), False)
    names = ["loss", "grad_hidden", "grad_weight", "grad_bias"]
    return {name: (actual[i], *(t[i] if i < 2 else t[i][shard] for t in (exact, single)))
            for i, name in enumerate(names)}


def _topk_cases(group, sizes, rank, prefix):
    results = {}
    for v, (values, tail, support) in enumerate(VARIANTS):
        for t, (temperature, teacher_temperature) in enumerate(TEMPERATURES):
            options = dict(values=values, tail=tail, student_support=support, temperature=temperature,
                           teacher_temperature=teacher_temperature)
            for reduction, num_items in REDUCTIONS:
                name = f"{prefix}/{values}-{tail}-{support}-T{temperature}/{reduction}{num_items or ''}"
                results[name] = _topk_case(group, sizes, rank, options, reduction, num_items, torch.float64,
                                           seed=10 * v + t, module=(reduction == "sum"), sharp=(t == 1))
    options = dict(values="logprobs", tail="bucket", student_support="full", temperature=2.0)
    for tail in ("renorm", "bucket"):
        for dtype in (torch.float32, torch.bfloat16):
            results[f"{prefix}/{dtype}-{tail}"] = _topk_case(group, sizes, rank, dict(options, tail=tail), "mean",
                                                             None, dtype, seed=5)
    results[f"{prefix}/reference-bucket"] = _topk_case(group, sizes, rank, options, "mean", None, torch.float64,
                                                       seed=6, backend="reference")
    return results


def _fused_cases(group, sizes, rank, prefix):
    results = {}
    for v, (values, tail, support) in enumerate(VARIANTS[:4]):
        options = dict(values=values, tail=tail, student_support=support, temperature=2.0, teacher_temperature=1.5)
        for reduction in ("mean", "none"):
            results[f"{prefix}/{tail}-{support}/{reduction}"] = _fused_case(
                group, sizes, rank, options, reduction, torch.float64, seed=20 + v,
                softcap=3.0 if v == 1 else None)
    options = dict(values="logprobs", tail="renorm", student_support="full")
    for dtype in (torch.float32, torch.bfloat16):
        results[f"{prefix}/{dtype}"] = _fused_case(group, sizes, rank, options, "mean", dtype, seed=30)
    results[f"{prefix}/no-bias-one-chunk"] = _fused_case(group, sizes, rank, options, "sum", torch.float64, seed=31,
                                                         bias=False, chunk_size=None)
    results[f"{prefix}/partial-hidden"] = _fused_case(group, sizes, rank, options, "mean", torch.float64, seed=32,
                                                      all_reduce=False)
    results[f"{prefix}/reference"] = _fused_case(group, sizes, rank, options, "none", torch.float64, seed=33,
                                                 backend="reference")
    results[f"{prefix}/autocast-bf16-hidden-fp32-weight"] = _fused_autocast_case(group, sizes, rank, seed=34)
    return results


def _dtensor_cases(rank):
    """A 1-D mesh over the 4 ranks; V = 5 is chunked [2, 2, 1, 0]: an empty shard."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from kdloss.functional import fused_linear_topk_kl_loss, topk_kl_loss

    mesh = init_device_mesh("cpu", (WORLD,))
    rows, vocab, k, hidden_dim = 6, 5, 3, 4
    ids, vals, labels = _teacher(rows, vocab, k, seed=40)
    options = dict(tail="bucket", temperature=2.0)
    results = {}
    full = _student(rows, vocab, seed=40)
    z = full.clone().requires_grad_()
    expected = topk_kl_loss(z, ids, vals, labels, **options)
    (expected_grad,) = torch.autograd.grad(expected, z)
    logits = distribute_tensor(full.clone(), mesh, [Shard(-1)]).requires_grad_()
    loss = topk_kl_loss(logits, ids, vals, labels, **options)
    loss.backward()
    results["dtensor/logits"] = {"loss": (loss.detach(), expected.detach()),
                                 "grad": (logits.grad.full_tensor(), expected_grad)}

    gen = torch.Generator().manual_seed(41)
    h = torch.randn(rows, hidden_dim, generator=gen, dtype=torch.float64)
    w = torch.randn(vocab, hidden_dim, generator=gen, dtype=torch.float64)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    expected = fused_linear_topk_kl_loss(hh, ww, ids, vals, labels, **options, chunk_size=4)
    expected_grads = torch.autograd.grad(expected, (hh, ww))
    weight = distribute_tensor(w.clone(), mesh, [Shard(0)]).requires_grad_()
    for how in ("hidden-dtensor", "plain-hidden-and-mesh"):
        if how == "hidden-dtensor":
            hidden = distribute_tensor(h.clone(), mesh, [Replicate()]).requires_grad_()
            loss = fused_linear_topk_kl_loss(hidden, weight, ids, vals, labels, **options, chunk_size=4)
        else:
            hidden = h.clone().requires_grad_()
            loss = fused_linear_topk_kl_loss(hidden, weight, ids, vals, labels, **options, chunk_size=4,
                                             vocab_parallel_group=mesh)
        weight.grad = None
        loss.backward()
        grad_hidden = hidden.grad.full_tensor() if how == "hidden-dtensor" else hidden.grad
        results[f"dtensor/{how}"] = {"loss": (loss.detach(), expected.detach()),
                                     "grad_hidden": (grad_hidden, expected_grads[0]),
                                     "grad_weight": (weight.grad.full_tensor(), expected_grads[1])}
    try:
        fused_linear_topk_kl_loss(h, weight, ids, vals, labels)
        results["errors/dtensor-weight-plain-hidden"] = "no error"
    except ValueError as error:
        results["errors/dtensor-weight-plain-hidden"] = str(error)
    return results


def _dp_tp_cases(rank):
    """2 × 2 mesh: rows split over "dp", vocabulary over "tp"; the DP count is the counted positions
    summed over the DP group divided by its size (what kdloss.distributed.num_items_for_ddp returns)."""
    from torch.distributed.device_mesh import init_device_mesh

    from kdloss.functional import fused_linear_topk_kl_loss, topk_kl_loss

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp, tp = mesh["dp"].get_local_rank(), mesh["tp"].get_local_rank()
    rows, vocab, k, hidden_dim, dp_size = 12, 19, 4, 5, 2
    row_part, vocab_part = _bounds([7, 5])[dp], _bounds([10, 9])[tp]
    ids, vals, labels = _teacher(rows, vocab, k, seed=50)
    labels[8:11] = -100  # uneven counts over the DP ranks
    full = _student(rows, vocab, seed=50)
    options = dict(tail="bucket", temperature=2.0)

    count = (labels[row_part] != -100).sum().to(torch.float64)
    dist.all_reduce(count, group=mesh["dp"].get_group())
    num_items = count / dp_size
    results = {}
    z = full.clone().requires_grad_()
    expected = topk_kl_loss(z, ids, vals, labels, **options)  # the global mean
    (expected_grad,) = torch.autograd.grad(expected, z)
    local = full[row_part, vocab_part].clone().requires_grad_()
    loss = topk_kl_loss(local, ids[row_part], vals[row_part], labels[row_part], **options,
                        num_items_in_batch=num_items, vocab_parallel_group=mesh["tp"])
    (grad,) = torch.autograd.grad(loss, local)
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss, group=mesh["dp"].get_group())  # what DDP's averaging sees
    results["dp_tp/topk"] = {"loss averaged over dp": (mean_loss / dp_size, expected.detach()),
                             "grad x dp_size": (grad, dp_size * expected_grad[row_part, vocab_part])}

    gen = torch.Generator().manual_seed(51)
    h = torch.randn(rows, hidden_dim, generator=gen, dtype=torch.float64)
    w = torch.randn(vocab, hidden_dim, generator=gen, dtype=torch.float64)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    expected = fused_linear_topk_kl_loss(hh, ww, ids, vals, labels, **options, chunk_size=3)
    expected_grads = torch.autograd.grad(expected, (hh, ww))
    hidden, weight = h[row_part].clone().requires_grad_(), w[vocab_part].clone().requires_grad_()
    loss = fused_linear_topk_kl_loss(hidden, weight, ids[row_part], vals[row_part], labels[row_part], **options,
                                     chunk_size=3, num_items_in_batch=num_items, vocab_parallel_group=mesh["tp"])
    grad_hidden, grad_weight = torch.autograd.grad(loss, (hidden, weight))
    dist.all_reduce(grad_weight, group=mesh["dp"].get_group())  # DDP: average over dp
    results["dp_tp/fused"] = {"grad_hidden x dp_size": (grad_hidden, dp_size * expected_grads[0][row_part]),
                              "grad_weight averaged over dp": (grad_weight / dp_size, expected_grads[1][vocab_part])}
    return results


def _fsdp2_case(rank):
    """FSDP2 without TP: the head is sharded by FSDP; the loss runs inside the wrapped module's forward,
    where FSDP has gathered the weight, as the single-device fused head."""
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from kdloss.functional import fused_linear_topk_kl_loss

    class DistillHead(nn.Module):
        def __init__(self, hidden_dim, vocab):
            super().__init__()
            self.lm_head = nn.Linear(hidden_dim, vocab, bias=False, dtype=torch.float64)

        def forward(self, hidden, ids, vals, labels, num_items):
            return fused_linear_topk_kl_loss(hidden, self.lm_head.weight, ids, vals, labels, temperature=2.0,
                                             num_items_in_batch=num_items, chunk_size=3)

    rows, vocab, k, hidden_dim = 8, 13, 4, 6
    ids, vals, labels = _teacher(rows, vocab, k, seed=60)
    torch.manual_seed(60)
    reference_head = DistillHead(hidden_dim, vocab)
    h = torch.randn(rows, hidden_dim, dtype=torch.float64)
    hh = h.clone().requires_grad_()
    expected = reference_head(hh, ids, vals, labels, None)
    expected.backward()
    mesh = init_device_mesh("cpu", (WORLD,))
    model = DistillHead(hidden_dim, vocab)
    model.load_state_dict(reference_head.state_dict())
    fully_shard(model, mesh=mesh)
    part = _bounds([2] * WORLD)[rank]
    count = (labels[part] != -100).sum().to(torch.float64)
    dist.all_reduce(count)
    hidden = h[part].clone().requires_grad_()
    loss = model(hidden, ids[part], vals[part], labels[part], count / WORLD)
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    return {"fsdp2/recipe": {"loss averaged over ranks": (mean_loss / WORLD, expected.detach()),
                             "grad_weight (FSDP-reduced)": (model.lm_head.weight.grad.full_tensor(),
                                                            reference_head.lm_head.weight.grad),
                             "grad_hidden x world": (hidden.grad, WORLD * hh.grad[part])}}


def _coupled_cases(pair, pair_rank):
    """SinKD and the token contrastive term coupling only the ranks of ``pair`` (not the default group)."""
    from kdloss.functional import sinkhorn_loss, token_contrastive_loss

    gen = torch.Generator().manual_seed(70)
    student_rows, teacher_rows, classes, dim = (5, 3), (4, 6), 3, 4
    zs = 2 * torch.randn(sum(student_rows), classes, generator=gen, dtype=torch.float64)
    zt = 2 * torch.randn(sum(teacher_rows), classes, generator=gen, dtype=torch.float64)
    s_part, t_part = _bounds(student_rows)[pair_rank], _bounds(teacher_rows)[pair_rank]
    full = zs.clone().requires_grad_()
    expected = sinkhorn_loss(full, zt, scale=1e-3)
    (expected_grad,) = torch.autograd.grad(expected, full)
    local = zs[s_part].clone().requires_grad_()
    loss = sinkhorn_loss(local, zt[t_part], scale=1e-3, gather_across_ranks=True, group=pair)
    (grad,) = torch.autograd.grad(loss, local)
    results = {"group/sinkhorn": {"loss": (loss.detach(), expected.detach()), "grad": (grad, expected_grad[s_part])}}

    nodes = (4, 6)
    hs = torch.randn(sum(nodes), dim, generator=gen, dtype=torch.float64)
    ht = torch.randn(sum(nodes), dim, generator=gen, dtype=torch.float64)
    part = _bounds(nodes)[pair_rank]
    for symmetric, reduction in ((False, "mean"), (True, "none")):
        fs, ft = hs.clone().requires_grad_(), ht.clone().requires_grad_()
        expected = token_contrastive_loss(fs, ft, symmetric=symmetric, reduction=reduction)
        upstream = torch.linspace(0.5, 1.5, expected.numel(), dtype=torch.float64).reshape(expected.shape)
        expected_grads = torch.autograd.grad(expected, (fs, ft), upstream)
        ls, lt = hs[part].clone().requires_grad_(), ht[part].clone().requires_grad_()
        loss = token_contrastive_loss(ls, lt, symmetric=symmetric, reduction=reduction, gather_across_ranks=True,
                                      group=pair)
        grads = torch.autograd.grad(loss, (ls, lt), upstream)
        results[f"group/token_contrastive-{reduction}"] = {
            "loss": (loss.detach(), expected.detach()),
            "grad_student": (grads[0], expected_grads[0][part]),
            "grad_teacher": (grads[1], expected_grads[1][part])}
    return results


def _error_cases(group):
    from kdloss.functional import topk_kl_loss

    ids, vals, labels = _teacher(3, 10, 2, seed=80)
    logits = _student(3, 5, seed=80)
    results = {}
    for name, kwargs in (("bad-group-type", {"vocab_parallel_group": "tp"}),
                         ("id-out-of-global-range", {"vocab_parallel_group": group})):
        try:
            bad_ids = ids + 100 if name == "id-out-of-global-range" else ids
            topk_kl_loss(logits, bad_ids, vals, labels, **kwargs)
            results[f"errors/{name}"] = "no error"
        except (TypeError, ValueError) as error:
            results[f"errors/{name}"] = f"{type(error).__name__}: {error}"
    return results


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        pair, pair_rank = pairs[rank // 2], rank % 2
        results = {}
        results.update(_topk_cases(dist.group.WORLD, [7, 6, 6, 4], rank, "world4"))
        results.update(_topk_cases(pair, [9, 8], pair_rank, f"pair{rank // 2}"))
        results.update(_fused_cases(dist.group.WORLD, [7, 6, 6, 4], rank, "fused4"))
        results.update(_fused_cases(pair, [2, 21], pair_rank, f"fused-pair{rank // 2}"))
        results.update(_dtensor_cases(rank))
        results.update(_dp_tp_cases(rank))
        results.update(_fsdp2_case(rank))
        results.update(_coupled_cases(pair, pair_rank))
        results.update(_error_cases(pair))
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    except BaseException:
        with open(f"{out_dir}/rank{rank}.error", "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def per_rank(tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from kdloss._build import require

    require("topk_kl", "cpu")  # build once here, not in four processes at a time
    return spawn_ranks(_worker, WORLD, tmp_path_factory.mktemp("vocab_parallel"), TIMEOUT_S)


def _check(per_rank, prefix: str, ranks=range(WORLD)) -> int:
    checked = 0
    for rank in ranks:
        for name, case in per_rank[rank].items():
            if not name.startswith(prefix):
                continue
            for label, pair in case.items():
                if label == "partial_hidden":
                    continue
                actual, expected, *single = pair
                assert actual.shape == expected.shape, (name, label, actual.shape, expected.shape)
                scale = 1.0 + (expected.abs().max().item() if expected.numel() else 0.0)
                if actual.dtype == torch.float64:
                    bound = 1e-10 * scale
                else:
                    bound = max_abs(single[0], expected) + 16 * torch.finfo(actual.dtype).eps * scale
                err = max_abs(actual, expected)
                assert err <= bound, f"rank {rank} {name} {label}: error {err:.3e} > {bound:.3e}"
                checked += 1
    return checked


def test_topk_kl_4_ranks_uneven_shards_every_variant(per_rank):
    # shards [7, 6, 6, 4] with k = 5: the 4-wide shard takes the small-shard path, the others the kernel's
    assert _check(per_rank, "world4/") == WORLD * (len(VARIANTS) * len(TEMPERATURES) * len(REDUCTIONS) + 5) * 2


def test_topk_kl_2_ranks_in_two_groups_side_by_side(per_rank):
    assert _check(per_rank, "pair0/", ranks=(0, 1)) > 0
    assert _check(per_rank, "pair1/", ranks=(2, 3)) > 0


def test_fused_head_4_ranks_and_2_ranks(per_rank):
    assert _check(per_rank, "fused4/") > 0
    assert _check(per_rank, "fused-pair0/", ranks=(0, 1)) + _check(per_rank, "fused-pair1/", ranks=(2, 3)) > 0


@pytest.mark.parametrize("prefix,ranks", [("fused4/partial-hidden", range(WORLD)),
                                          ("fused-pair0/partial-hidden", (0, 1))])
def test_fused_head_without_the_hidden_all_reduce_gives_partial_sums(per_rank, prefix, ranks):
    partials = [per_rank[r][prefix]["partial_hidden"] for r in ranks]
    total = sum(p[0] for p in partials)
    expected = partials[0][1]
    assert max_abs(total, expected) <= 1e-10 * (1 + expected.abs().max().item())
    assert max_abs(partials[0][0], expected) > 1e-3  # one rank alone is not the gradient


def test_dtensor_logits_and_weight_with_an_empty_shard(per_rank):
    assert _check(per_rank, "dtensor/") == WORLD * (2 + 3 + 3)
    for rank in range(WORLD):
        assert "vocab_parallel_group" in per_rank[rank]["errors/dtensor-weight-plain-hidden"]


def test_dp_by_tp_mesh_with_the_ddp_count(per_rank):
    assert _check(per_rank, "dp_tp/") == WORLD * 4


def test_fsdp2_recipe_matches_single_process(per_rank):
    assert _check(per_rank, "fsdp2/") == WORLD * 3


def test_sinkhorn_and_token_contrastive_couple_only_their_group(per_rank):
    assert _check(per_rank, "group/") == WORLD * (2 + 3 + 3)


def test_bad_group_and_out_of_range_ids_raise(per_rank):
    for rank in range(WORLD):
        assert per_rank[rank]["errors/bad-group-type"].startswith("TypeError")
        assert "vocab_parallel_group" in per_rank[rank]["errors/bad-group-type"]
        message = per_rank[rank]["errors/id-out-of-global-range"]
        assert message.startswith("ValueError") and "V = 10" in message, message


def test_vocab_parallel_without_a_process_group_raises():
    from kdloss.functional import topk_kl_loss

    assert not dist.is_initialized()
    ids, vals, labels = _teacher(3, 10, 2, seed=80)
    with pytest.raises(ValueError, match="vocab_parallel_group"):
        topk_kl_loss(_student(3, 10, seed=80), ids, vals, labels, vocab_parallel_group=object())
