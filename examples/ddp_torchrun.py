"""Fused-head distillation under 2-process DistributedDataParallel (gloo) with gradient accumulation.

    torchrun --standalone --nproc_per_node 2 examples/ddp_torchrun.py [--steps 30] [--out DIR]

(Without torchrun it runs as a single process.) A plain PyTorch loop, no Trainer: a tiny Llama
student (random weights, built from a config) wrapped in ``DistributedDataParallel``, an online
Llama teacher, the fused LM head (``DistillationConfig(fused=True)``: hidden states come through
the DDP wrapper, the head weight is used outside it) and 2 micro-batches per optimizer step. The
two ranks see different amounts of counted tokens (rank 1 has longer un-trained prompts).

Every micro-batch divides its summed loss by ``kdloss.distributed.num_items_for_ddp`` of the
labels of *all* micro-batches of the step: the counted tokens summed over ranks, divided by the
number of ranks. DDP's gradient averaging then yields exactly the gradient of the mean over all
counted tokens of the global batch; at step 1 rank 0 recomputes that gradient in one process and
prints the largest difference.

Rank 0 prints ``step i loss L`` (the global mean) per optimizer step and writes ``loss.png``.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os

import _common
import torch
import torch.distributed as dist

VOCAB = 128
ACCUMULATION = 2
BATCH = 4


def micro_batch(step: int, rank: int, index: int) -> dict:
    """Deterministic data, so that rank 0 can rebuild every rank's batches for the check."""
    from kdloss.integrations.transformers import DistillationCollator

    seed = 1000 * step + 10 * rank + index
    rows = _common.token_sequences(BATCH, VOCAB, seed=seed, prompt=4 + 8 * rank)
    return DistillationCollator(pad_token_id=0)(rows)


def single_process_gradient(student, teacher, config, step: int, world: int) -> dict[str, torch.Tensor]:
    """The gradient of the global mean over all ranks' micro-batches, computed in one process."""
    from kdloss.integrations.transformers import distillation_loss, shifted_labels

    batches = [micro_batch(step, r, i) for r in range(world) for i in range(ACCUMULATION)]
    total = sum(int((shifted_labels(b) != -100).sum()) for b in batches)
    reference = copy.deepcopy(student)
    for batch in batches:
        distillation_loss(reference, batch, total, teacher_model=teacher, config=config).backward()
    return {name: p.grad for name, p in reference.named_parameters()}


def main() -> None:
    args = _common.parse_args(__doc__.splitlines()[0], steps=30)
    _common.quiet()
    from torch.nn.parallel import DistributedDataParallel

    from kdloss.distributed import num_items_for_ddp
    from kdloss.integrations.transformers import DistillationConfig, distillation_loss, shifted_labels

    distributed = "RANK" in os.environ
    if distributed:  # a timeout turns a stuck collective into an error instead of a hang
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    out = _common.output_dir(args, "ddp_torchrun") if rank == 0 else None

    teacher = _common.tiny_llama(VOCAB, hidden=64, layers=2, seed=1, init=0.1).eval().requires_grad_(False)
    student = _common.tiny_llama(VOCAB, hidden=32, layers=1, seed=0)
    initial = copy.deepcopy(student)
    model = DistributedDataParallel(student) if distributed else student
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    config = DistillationConfig(temperature=2.0, top_k=16, fused=True)
    if rank == 0:
        print(f"{world} process(es), {ACCUMULATION} micro-batches of {BATCH} sequences per rank and step", flush=True)

    curve = []
    for step in range(args.steps):
        batches = [micro_batch(step, rank, i) for i in range(ACCUMULATION)]
        divisor = num_items_for_ddp([shifted_labels(b) for b in batches])  # Σ ranks Σ micro-batches / world
        step_loss = torch.zeros(())
        for i, batch in enumerate(batches):
            last = i == ACCUMULATION - 1
            sync = contextlib.nullcontext() if (last or not distributed) else model.no_sync()
            with sync:
                loss = distillation_loss(model, batch, divisor, config=config, teacher_model=teacher)
                loss.backward()
            step_loss += loss.detach()
        if step == 0:
            check_against_single_process(student, initial, teacher, config, world, rank)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if distributed:  # each rank holds S_r / d; their mean is the global mean
            dist.all_reduce(step_loss)
            step_loss /= world
        curve.append(step_loss.item())
        if rank == 0:
            _common.print_step(step + 1, curve[-1])
    if rank == 0:
        _common.report({"loss": curve}, out, f"DDP ({world} ranks) + accumulation {ACCUMULATION}, fused head")
    if distributed:  # leave together: rank 0 may still be plotting
        dist.barrier()
        dist.destroy_process_group()


def check_against_single_process(student, initial, teacher, config, world: int, rank: int) -> None:
    if rank == 0:
        expected = single_process_gradient(initial, teacher, config, 0, world)
        actual = {name: p.grad for name, p in student.named_parameters()}
        error = max(float((actual[n] - expected[n]).abs().max()) for n in expected)
        scale = max(float(g.abs().max()) for g in expected.values())
        print(f"step 1: DDP gradient vs single-process gradient of the global mean: max |diff| {error:.2e} "
              f"(largest gradient entry {scale:.2e})", flush=True)
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main()
