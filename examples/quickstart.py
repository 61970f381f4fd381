"""kdloss quick start: distill a tiny GPT-2 student from a tiny GPT-2 teacher through a stored top-k
teacher, on the CPU, in about a minute. Nothing is downloaded (both models are built from configs
with random weights) and the data is synthetic.

    python examples/quickstart.py              # the full run (--steps 100)
    python examples/quickstart.py --steps 3    # a smoke run (seconds)

What it does — the usual offline LLM-distillation loop:

1. builds a teacher (4 layers, width 128) and a smaller student (2 layers, width 64) over a
   4096-token vocabulary; the teacher's logits are sharpened so its next-token distributions carry
   information worth distilling;
2. runs the teacher once over the corpus and stores its top-k (k = 32) ids and log-probs per
   position on disk (``kdloss.sparse.topk_teacher``; what DistillKit stores), then frees it;
3. trains the student against the stored targets with ``kdloss.TopKKLLoss`` (temperature 2, × T²,
   teacher renormalised over its k ids), printing the loss curve;
4. times the loss's forward + backward on one batch: kdloss's kernel against the same loss written
   in eager PyTorch (DistillKit's recipe);
5. writes the stored teacher and a plot of the loss curve (``loss.png``; needs matplotlib) under
   ``--out`` (default ``examples_out/quickstart``).

Prints ``step i loss L`` per optimizer step, like the other examples. Needs transformers (installed
by ``pip install -r requirements-dev.txt``; otherwise ``pip install 'kdloss[transformers,examples]'``).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import _common
import torch

import kdloss
from kdloss.sparse import topk_teacher

VOCAB, SEQ, K, TEMPERATURE, BATCH = 4096, 64, 32, 2.0, 8


def synthetic_corpus(sequences: int, seed: int = 0) -> torch.Tensor:
    """Token sequences ``[sequences, SEQ]`` from a random sparse Markov chain (each token has a few
    likely successors), so that next-token prediction has structure to learn."""
    gen = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, VOCAB, (VOCAB, 4), generator=gen)
    tokens = torch.empty(sequences, SEQ, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, VOCAB, (sequences,), generator=gen)
    for t in range(1, SEQ):
        choice = torch.randint(0, 4, (sequences,), generator=gen)
        tokens[:, t] = successors[tokens[:, t - 1], choice]
    return tokens


@torch.no_grad()
def store_teacher(corpus: torch.Tensor, path: Path) -> dict:
    """Runs the teacher over the corpus once and saves its top-k ids and log-probs to ``path``."""
    teacher = _common.tiny_gpt2(VOCAB, hidden=128, layers=4, seed=1).eval()
    ids, logprobs = [], []
    for start in range(0, len(corpus), BATCH):
        logits = 4.0 * teacher(corpus[start:start + BATCH]).logits  # sharpened: a confident teacher
        top_ids, top_lp = topk_teacher(logits, K)
        ids.append(top_ids.to(torch.int16))  # V = 4096 fits; halves the storage
        logprobs.append(top_lp.to(torch.float16))
    stored = {"ids": torch.cat(ids), "logprobs": torch.cat(logprobs), "k": K}
    torch.save(stored, path)
    return stored


def eager_topk_kl(student_logits, teacher_ids, teacher_logprobs):
    """The same loss in eager PyTorch, as DistillKit computes it: fp32 log-softmax of the whole
    student row, teacher re-tempered and renormalised over its ids, KL × T², mean over positions."""
    log_q = torch.log_softmax(student_logits.float() / TEMPERATURE, dim=-1).gather(-1, teacher_ids)
    log_p = torch.log_softmax(teacher_logprobs.float() / TEMPERATURE, dim=-1)
    per_position = (log_p.exp() * (log_p - log_q)).sum(-1)
    return per_position.mean() * TEMPERATURE**2


def kdloss_topk_kl(student_logits, teacher_ids, teacher_logprobs):
    return kdloss.functional.topk_kl_loss(student_logits, teacher_ids, teacher_logprobs, temperature=TEMPERATURE,
                                          backend="kernel")


def time_loss(fn, logits: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, repeat: int) -> float:
    """Median ms of the loss's forward + backward on fixed logits (after one warm-up call)."""
    leaf = logits.detach().requires_grad_()
    samples = []
    for _ in range(repeat + 1):
        start = time.perf_counter()
        torch.autograd.grad(fn(leaf, ids, logprobs), leaf)
        samples.append(time.perf_counter() - start)
    return 1e3 * statistics.median(samples[1:])


def main() -> None:
    args = _common.parse_args(__doc__.split("\n\n")[0], steps=100)
    out = Path(_common.output_dir(args, "quickstart"))
    _common.quiet()
    torch.manual_seed(0)
    sequences = BATCH * max(1, min(args.steps, 8))  # a few batches, cycled
    corpus = synthetic_corpus(sequences)

    start = time.perf_counter()
    stored = store_teacher(corpus, out / "teacher_topk.pt")
    dense_mib = corpus.numel() * VOCAB * 4 / 2**20
    stored_mib = (stored["ids"].nbytes + stored["logprobs"].nbytes) / 2**20
    print(f"stored the teacher's top-{K} for {corpus.numel()} positions: {stored_mib:.2f} MiB "
          f"(dense fp32 logits would be {dense_mib:.0f} MiB), {time.perf_counter() - start:.1f} s", flush=True)

    stored = torch.load(out / "teacher_topk.pt")  # what a training job reads back
    student = _common.tiny_gpt2(VOCAB, hidden=64, layers=2, seed=2)
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    loss_fn = kdloss.TopKKLLoss(temperature=TEMPERATURE)  # renorm tail, full-vocabulary student, × T²
    losses = []
    start = time.perf_counter()
    for step in range(args.steps):
        rows = slice((step * BATCH) % sequences, (step * BATCH) % sequences + BATCH)
        logits = student(corpus[rows]).logits  # [BATCH, SEQ, VOCAB]
        loss = loss_fn(logits, stored["ids"][rows].long(), stored["logprobs"][rows].float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        _common.print_step(step + 1, losses[-1])
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.1f} s", flush=True)

    ids, logprobs = stored["ids"][:BATCH].long(), stored["logprobs"][:BATCH].float()
    with torch.no_grad():
        logits = student(corpus[:BATCH]).logits
    repeat = 3 if args.steps < 10 else 15
    kernel_ms = time_loss(kdloss_topk_kl, logits, ids, logprobs, repeat)
    eager_ms = time_loss(eager_topk_kl, logits, ids, logprobs, repeat)
    print(f"loss forward + backward on [{BATCH}, {SEQ}, {VOCAB}] logits: kdloss {kernel_ms:.2f} ms, "
          f"eager {eager_ms:.2f} ms ({eager_ms / kernel_ms:.1f}x; median of {repeat}, "
          f"{torch.get_num_threads()} thread)", flush=True)
    _common.report({"loss": losses}, str(out), "tiny GPT-2 from a stored top-k teacher (TopKKLLoss)")


if __name__ == "__main__":
    main()
