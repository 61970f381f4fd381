"""Distil a tiny Llama student from an online Llama teacher with Hugging Face ``Trainer``.

Both models are built from configs with random weights (nothing is downloaded). The teacher runs
on every batch; its top-k (k = 16) ids and log-probs per position are taken with
``kdloss.sparse.topk_teacher`` and the student's full logits go to ``kdloss.functional.topk_kl_loss``
(T = 2, × T²), mixed with 10 % hard-label cross-entropy: ``loss = 0.9·KD + 0.1·CE``. Gradient
accumulation 2; the loss is normalised by the counted tokens of the whole optimizer step.

    python examples/llm_trainer_online_teacher.py [--steps 40] [--out DIR]

Prints ``step i loss L kd_loss K ce_loss C`` per optimizer step and writes ``loss.png``.
"""

from __future__ import annotations

import _common

VOCAB = 128


def main() -> None:
    args = _common.parse_args(__doc__.splitlines()[0], steps=40)
    out = _common.output_dir(args, "llm_trainer_online_teacher")
    _common.quiet()
    from datasets import Dataset
    from transformers import TrainingArguments

    from kdloss.integrations.transformers import DistillationConfig, KDTrainer

    teacher = _common.tiny_llama(VOCAB, hidden=64, layers=2, seed=1, init=0.1)
    student = _common.tiny_llama(VOCAB, hidden=32, layers=1, seed=0)
    train = Dataset.from_list(_common.token_sequences(64, VOCAB, seed=0))
    training_args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=args.steps,
        learning_rate=5e-3, lr_scheduler_type="constant", logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = KDTrainer(
        model=student, args=training_args, train_dataset=train, teacher_model=teacher,
        distillation=DistillationConfig(temperature=2.0, top_k=16, ce_weight=0.1),
    )
    _common.silent_trainer(trainer)
    trainer.train()
    curves = _common.print_trainer_log(trainer.state.log_history)
    _common.report(curves, out, "online teacher, plain head")


if __name__ == "__main__":
    main()
