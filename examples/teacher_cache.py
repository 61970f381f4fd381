"""Write once, train many: a teacher's top-k stored in a kdloss cache, then a student trained from it.

1. A tiny random-weight GPT-2 teacher (built from a config, nothing is downloaded) runs once over
   a dataset of token ids; its top-k log-probs go into a cache (``kdloss.cache.build_cache``).
2. Two identical students are trained from the cache through a ``DataLoader`` (shuffled, worker
   processes, ``TopKCollator`` padding and aligning the targets): one with ``kdloss.TopKKLLoss``
   on its logits, one with ``kdloss.FusedLinearTopKKLLoss`` on its last hidden states and LM-head
   weight (the ``[tokens, V]`` logits are never materialised). Both print their loss curves; the
   two curves should agree closely (same math, same initialisation).

Run::

    python examples/teacher_cache.py                # about a minute on 2 CPU cores
    python examples/teacher_cache.py --steps 4      # a few seconds (KDLOSS_EXAMPLE_STEPS=4 works too)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

import kdloss
from kdloss.cache import TopKCache, TopKCollator, build_cache


def make_teacher(vocab: int) -> GPT2LMHeadModel:
    # a large initialiser range gives peaked, LM-like next-token distributions without training
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_positions=256, n_embd=64, n_layer=2, n_head=2, initializer_range=0.3,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def make_student(vocab: int) -> GPT2LMHeadModel:
    torch.manual_seed(1)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=256, n_embd=48, n_layer=1, n_head=2,
                                      bos_token_id=0, eos_token_id=0))


def make_sequences(count: int, vocab: int, max_len: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(2)
    lengths = torch.randint(max_len // 2, max_len + 1, (count,), generator=generator)
    return [torch.randint(0, vocab, (int(n),), generator=generator).tolist() for n in lengths]


def student_loss(student, batch, head: str, loss_fn, cache: TopKCache) -> torch.Tensor:
    """KD loss of one batch; ``shift_labels`` marks the positions that have a teacher target."""
    if head == "logits":
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return loss_fn(logits, batch["teacher_ids"], batch["teacher_values"], batch["shift_labels"])
    hidden = student.transformer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return loss_fn(hidden, student.lm_head.weight, batch["teacher_ids"], batch["teacher_values"],
                   labels=batch["shift_labels"])


def train(cache: TopKCache, head: str, steps: int, batch_size: int, workers: int, backend: str) -> list[float]:
    vocab = cache.vocab_size
    student = make_student(vocab)
    options = dict(backend=backend, **cache.loss_kwargs())
    loss_fn = kdloss.TopKKLLoss(**options) if head == "logits" else kdloss.FusedLinearTopKKLLoss(**options)
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    collator = TopKCollator(student_vocab_size=vocab, pad_to_multiple_of=16)
    loader = DataLoader(cache, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                        collate_fn=collator, generator=torch.Generator().manual_seed(3), persistent_workers=workers > 0)
    curve, step = [], 0
    while step < steps:
        for batch in loader:
            loss = student_loss(student, batch, head, loss_fn, cache)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            curve.append(loss.item())
            step += 1
            if step >= steps:
                break
    return curve


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=int(os.environ.get("KDLOSS_EXAMPLE_STEPS", 300)),
                        help="training steps per student (env KDLOSS_EXAMPLE_STEPS)")
    parser.add_argument("--sequences", type=int, default=None, help="dataset size (default: enough for the steps)")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 2, 0 for short runs)")
    parser.add_argument("--backend", default="auto", help="kdloss backend: auto, kernel or reference")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 suits these tiny models)")
    parser.add_argument("--cache", default=None, help="cache directory (default: a temporary one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sequences = args.sequences or max(2 * args.batch_size, min(256, args.steps * args.batch_size // 2))
    workers = args.workers if args.workers is not None else (2 if args.steps >= 50 else 0)
    with tempfile.TemporaryDirectory() as scratch:
        path = args.cache or os.path.join(scratch, "teacher-cache")
        started = time.perf_counter()
        build_cache(make_teacher(args.vocab), make_sequences(sequences, args.vocab, args.max_len), path, k=args.k,
                    batch_size=16, progress=False)
        cache = TopKCache(path)
        print(f"teacher cache: {len(cache)} sequences, {cache.num_tokens} tokens, "
              f"{cache.num_bytes / cache.num_tokens:.1f} bytes/token, built in {time.perf_counter() - started:.1f} s")
        curves = {}
        for head in ("logits", "fused"):
            started = time.perf_counter()
            curves[head] = train(cache, head, args.steps, args.batch_size, workers, args.backend)
            print(f"student ({head} head): {args.steps} steps in {time.perf_counter() - started:.1f} s")
        print("step  TopKKLLoss  FusedLinearTopKKLLoss")
        every = max(1, args.steps // 10)
        for step in list(range(0, args.steps, every)) + ([args.steps - 1] if (args.steps - 1) % every else []):
            print(f"{step + 1:4d}  {curves['logits'][step]:10.4f}  {curves['fused'][step]:10.4f}")
        first, last = curves["logits"][0], sum(curves["logits"][-5:]) / len(curves["logits"][-5:])
        print(f"KD loss {first:.4f} -> {last:.4f} (mean of the last 5 steps)")


if __name__ == "__main__":
    main()
