"""List-wise Plackett-Luce distillation (PLD) of a bi-encoder and of a cross-encoder.

Random-weight BERT teachers and smaller students, built from configs (nothing is downloaded).

* Bi-encoder, ``SentenceTransformerTrainer``: columns ``(query, positive, document_1..3)``, the
  ``label`` column holds the teacher bi-encoder's 4 dot-product scores per query. Loss
  ``kdloss.integrations.sentence_transformers.PlackettLuceLoss``: the Plackett-Luce likelihood of
  the ranking "positive first, then the teacher's order", weighted by softmax(teacher scores).
* Cross-encoder, ``CrossEncoderTrainer``: list-wise rows ``(query, [documents])`` with 3–5
  documents per query (lists of different lengths) that share more or fewer words with the query;
  the teacher's scores (``labels``) are a stand-in for a trained cross-encoder: 2 × the number of
  shared words. Loss ``CrossEncoderPlackettLuceLoss`` with ``label_index=None``: the teacher's top
  document is the target, so the ranking distilled is the teacher's own.

    python examples/sentence_transformers_pld.py [--steps 30] [--out DIR]

Prints ``step i loss L`` per optimizer step for each part (``bi-encoder`` then ``cross-encoder``)
and writes ``loss.png`` with both curves.
"""

from __future__ import annotations

import random

import _common
import torch


def related(query: str, seed: int) -> str:
    """A document sharing most of the query's words (the "positive")."""
    words = query.split()
    random.Random(seed).shuffle(words)
    return " ".join(words + _common.sentences(1, seed, max_words=2)[0].split())


def overlapping(query: str, generator: random.Random) -> str:
    """A document with a random share of the query's words and some other words."""
    words = [w for w in query.split() if generator.random() < generator.random()]
    words += generator.sample(_common.WORDS, generator.randint(1, 4))
    generator.shuffle(words)
    return " ".join(words)


def bi_encoder(steps: int, out: str) -> list[float]:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    from kdloss.integrations.sentence_transformers import PlackettLuceLoss

    teacher = _common.tiny_sentence_transformer(hidden=64, layers=2, seed=1)
    student = _common.tiny_sentence_transformer(hidden=32, layers=1, seed=0)
    n = 96
    queries = _common.sentences(n, 1)
    columns = {"query": queries, "positive": [related(q, i) for i, q in enumerate(queries)]}
    for j in range(1, 4):
        columns[f"document_{j}"] = _common.sentences(n, 10 + j)
    q = teacher.encode(queries, convert_to_tensor=True)
    scores = [(q * teacher.encode(columns[c], convert_to_tensor=True)).sum(-1) for c in list(columns)[1:]]
    columns["label"] = torch.stack(scores, dim=1).tolist()
    training_args = SentenceTransformerTrainingArguments(
        output_dir=out, per_device_train_batch_size=8, max_steps=steps, learning_rate=2e-3,
        lr_scheduler_type="constant", logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        disable_tqdm=True, seed=0,
    )
    trainer = SentenceTransformerTrainer(model=student, args=training_args, train_dataset=Dataset.from_dict(columns),
                                         loss=PlackettLuceLoss(student, label_index=0))
    _common.silent_trainer(trainer)
    trainer.train()
    print("bi-encoder (query, positive, 3 documents), label_index=0:", flush=True)
    return _common.print_trainer_log(trainer.state.log_history, keys=("loss",))["loss"]


def cross_encoder(steps: int, out: str) -> list[float]:
    from datasets import Dataset
    from sentence_transformers.cross_encoder import CrossEncoderTrainer, CrossEncoderTrainingArguments

    from kdloss.integrations.sentence_transformers import CrossEncoderPlackettLuceLoss

    student = _common.tiny_cross_encoder(hidden=32, layers=1, seed=2)
    n = 64
    queries = _common.sentences(n, 5, min_words=4)
    generator = random.Random(0)
    lists, labels = [], []
    for query in queries:
        documents = [overlapping(query, generator) for _ in range(generator.randint(3, 5))]
        lists.append(documents)
        labels.append([2.0 * len(set(query.split()) & set(d.split())) for d in documents])
    train = Dataset.from_dict({"query": queries, "documents": lists, "labels": labels})
    training_args = CrossEncoderTrainingArguments(
        output_dir=out, per_device_train_batch_size=8, max_steps=steps, learning_rate=2e-3,
        lr_scheduler_type="constant", logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        disable_tqdm=True, seed=0,
    )
    trainer = CrossEncoderTrainer(model=student, args=training_args, train_dataset=train,
                                  loss=CrossEncoderPlackettLuceLoss(student, label_index=None))
    _common.silent_trainer(trainer)
    trainer.train()
    print("cross-encoder (query, [3-5 documents]), teacher's ranking:", flush=True)
    return _common.print_trainer_log(trainer.state.log_history, keys=("loss",))["loss"]


def main() -> None:
    args = _common.parse_args(__doc__.splitlines()[0], steps=30)
    out = _common.output_dir(args, "sentence_transformers_pld")
    _common.quiet()
    curves = {"bi-encoder": bi_encoder(args.steps, out), "cross-encoder": cross_encoder(args.steps, out)}
    _common.report(curves, out, "list-wise PLD")


if __name__ == "__main__":
    main()
