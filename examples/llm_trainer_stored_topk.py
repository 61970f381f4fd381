"""Distil a tiny Llama student from stored top-k teacher targets with Hugging Face ``Trainer``.

First a random-weight teacher (built from a config) is run once over the dataset, and its top-16
ids and full-softmax log-probs per position are stored as the dataset columns ``teacher_ids`` /
``teacher_values`` (``[T, 16]`` per sequence; position t holds the distribution over token t+1),
the format DistillKit-style teacher caches use. Training then needs no teacher: ``KDTrainer``
keeps these columns (``remove_unused_columns`` stays at its default, True), pads variable-length
sequences with ``DistillationCollator`` (teacher values padded with -inf) and applies
``kdloss.functional.topk_kl_loss`` to the student's logits (T = 1, DistillKit's defaults).

    python examples/llm_trainer_stored_topk.py [--steps 40] [--out DIR]

Prints ``step i loss L kd_loss K`` per optimizer step and writes ``loss.png``.
"""

from __future__ import annotations

import _common
import torch

VOCAB = 128
TOP_K = 16


@torch.no_grad()
def store_teacher_targets(teacher, rows: list[dict]) -> list[dict]:
    """Adds ``teacher_ids`` / ``teacher_values`` ([T, k] lists) to each row."""
    from kdloss.sparse import topk_teacher

    teacher.eval()
    for row in rows:
        logits = teacher(input_ids=torch.tensor([row["input_ids"]])).logits[0]
        ids, logprobs = topk_teacher(logits, TOP_K)
        row["teacher_ids"] = ids.tolist()
        row["teacher_values"] = logprobs.half().float().tolist()  # stored in fp16, as caches do
    return rows


def main() -> None:
    args = _common.parse_args(__doc__.splitlines()[0], steps=40)
    out = _common.output_dir(args, "llm_trainer_stored_topk")
    _common.quiet()
    from datasets import Dataset
    from transformers import TrainingArguments

    from kdloss.integrations.transformers import DistillationConfig, KDTrainer

    teacher = _common.tiny_llama(VOCAB, hidden=64, layers=2, seed=1, init=0.1)
    rows = store_teacher_targets(teacher, _common.token_sequences(64, VOCAB, seed=0))
    train = Dataset.from_list(rows)
    print(f"stored targets: {len(rows)} sequences, columns {train.column_names}, k = {TOP_K}", flush=True)
    del teacher

    student = _common.tiny_llama(VOCAB, hidden=32, layers=1, seed=0)
    training_args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=args.steps,
        learning_rate=5e-3, lr_scheduler_type="constant", logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=True, disable_tqdm=True, seed=0,  # remove_unused_columns=True (default): KDTrainer keeps the targets
    )
    trainer = KDTrainer(model=student, args=training_args, train_dataset=train,
                        distillation=DistillationConfig(temperature=1.0))
    _common.silent_trainer(trainer)
    trainer.train()
    curves = _common.print_trainer_log(trainer.state.log_history)
    _common.report(curves, out, "stored top-k targets, plain head")


if __name__ == "__main__":
    main()
