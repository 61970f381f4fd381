"""Margin-MSE distillation of a tiny bi-encoder with ``SentenceTransformerTrainer``.

A random-weight BERT teacher and a smaller student (built from configs, saved to a temporary
folder and loaded as ``SentenceTransformer``s). The dataset has the columns
``(query, positive, negative_1, negative_2)`` and a ``label`` column with the teacher's three dot
product scores per row (raw scores, positive first: one of the label formats of
sentence-transformers' ``MarginMSELoss``). The loss is
``kdloss.integrations.sentence_transformers.MarginMSELoss``: the same value as
sentence-transformers' own ``MarginMSELoss`` (checked on the first batch below), with the dot
products fused into kdloss's kernel.

    python examples/sentence_transformers_margin_mse.py [--steps 40] [--out DIR]

Prints ``step i loss L`` per optimizer step and writes ``loss.png``.
"""

from __future__ import annotations

import _common
import torch


def teacher_scores(teacher, queries, *documents) -> torch.Tensor:
    q = teacher.encode(queries, convert_to_tensor=True)
    return torch.stack([(q * teacher.encode(d, convert_to_tensor=True)).sum(-1) for d in documents], dim=1)


def main() -> None:
    args = _common.parse_args(__doc__.splitlines()[0], steps=40)
    out = _common.output_dir(args, "sentence_transformers_margin_mse")
    _common.quiet()
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MarginMSELoss as STMarginMSELoss

    from kdloss.integrations.sentence_transformers import MarginMSELoss

    teacher = _common.tiny_sentence_transformer(hidden=64, layers=2, seed=1)
    student = _common.tiny_sentence_transformer(hidden=32, layers=1, seed=0)
    n = 128
    columns = {"query": _common.sentences(n, 1), "positive": _common.sentences(n, 2),
               "negative_1": _common.sentences(n, 3), "negative_2": _common.sentences(n, 4)}
    columns["label"] = teacher_scores(teacher, *columns.values()).tolist()
    train = Dataset.from_dict(columns)
    loss = MarginMSELoss(student)

    with torch.no_grad():  # the same value as sentence-transformers' own loss
        embeddings = [student.encode(columns[c][:8], convert_to_tensor=True) for c in list(columns)[:4]]
        labels = torch.tensor(columns["label"][:8])
        ours = loss.compute_loss_from_embeddings(embeddings, labels)
        theirs = STMarginMSELoss(student).compute_loss_from_embeddings(embeddings, labels)
    print(f"first batch: kdloss {ours.item():.6f}, sentence-transformers {theirs.item():.6f}", flush=True)

    training_args = SentenceTransformerTrainingArguments(
        output_dir=out, per_device_train_batch_size=8, max_steps=args.steps, learning_rate=2e-3,
        lr_scheduler_type="constant", logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        disable_tqdm=True, seed=0,
    )
    trainer = SentenceTransformerTrainer(model=student, args=training_args, train_dataset=train, loss=loss)
    _common.silent_trainer(trainer)
    trainer.train()
    curves = _common.print_trainer_log(trainer.state.log_history, keys=("loss",))
    _common.report(curves, out, "bi-encoder Margin-MSE")


if __name__ == "__main__":
    main()
