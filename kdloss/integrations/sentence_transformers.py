"""kdloss losses with sentence-transformers' loss interface.

Each class is constructed from the model being trained and is passed as ``loss=`` to
``SentenceTransformerTrainer`` (bi-encoders: ``forward(sentence_features, labels)``) or
``CrossEncoderTrainer`` (cross-encoders: ``forward(inputs, labels, prompt=None, task=None)`` with raw
text columns), exactly like sentence-transformers' own losses:

* :class:`MarginMSELoss` — bi-encoder Margin-MSE; computes the same function as
  ``sentence_transformers.sentence_transformer.losses.MarginMSELoss`` (same label formats), with
  the dot products fused into the kernel for the default dot-product similarity;
* :class:`CrossEncoderMarginMSELoss` — the cross-encoder form
  (``sentence_transformers.cross_encoder.losses.MarginMSELoss``);
* :class:`PlackettLuceLoss` / :class:`CrossEncoderPlackettLuceLoss` — list-wise Plackett-Luce
  distillation (PLD) of teacher scores over each query's candidate documents.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

try:
    from sentence_transformers.util import batch_to_device
except ImportError as error:  # pragma: no cover - exercised only without sentence-transformers
    raise ImportError(
        "kdloss.integrations.sentence_transformers needs sentence-transformers: "
        "pip install 'kdloss[sentence-transformers]' (or pip install 'sentence-transformers[train]')"
    ) from error

try:  # sentence-transformers >= 5.4: one merged forward for like-shaped candidate columns
    from sentence_transformers.base.losses.merged_forward import embed_columns as _st_embed_columns
except ImportError:  # pragma: no cover - older sentence-transformers
    _st_embed_columns = None

from .._validation import BACKENDS, check_int, check_option, check_real
from ..margin_mse import margin_mse_from_embeddings, margin_mse_loss
from ..plackett_luce import plackett_luce_loss

__all__ = ["MarginMSELoss", "CrossEncoderMarginMSELoss", "PlackettLuceLoss", "CrossEncoderPlackettLuceLoss"]

_MARGIN_MSE_CITATION = """
@misc{hofstaetter2021improving,
    title={Improving Efficient Neural Ranking Models with Cross-Architecture Knowledge Distillation},
    author={Sebastian Hofst{\\"a}tter and Sophia Althammer and Michael Schr{\\"o}der and Mete Sertkan
            and Allan Hanbury},
    year={2021},
    eprint={2010.02666},
    archivePrefix={arXiv},
    primaryClass={cs.IR}
}
"""


def _embed(model: nn.Module, sentence_features: Iterable[dict[str, Tensor]]) -> list[Tensor]:
    """One ``sentence_embedding`` per input column, as sentence-transformers' own losses get them."""
    features = list(sentence_features)
    if _st_embed_columns is not None:
        return _st_embed_columns(model, features)
    return [model(f)["sentence_embedding"] for f in features]


def _name(fn) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def _label_tensor(labels, what: str) -> Tensor:
    if isinstance(labels, (list, tuple)):
        if not labels or not all(isinstance(row, Tensor) for row in labels):
            raise TypeError(f"{what} must be a tensor or a non-empty list of tensors")
        labels = torch.stack(list(labels))
    if not isinstance(labels, Tensor):
        raise TypeError(f"{what} must be a tensor of teacher scores, got {type(labels).__name__} "
                         f"(does the dataset have a 'label' or 'score' column?)")
    return labels.detach()


def _check_similarity(similarity_fct) -> Callable | None:
    if similarity_fct is not None and not callable(similarity_fct):
        raise TypeError(f"similarity_fct must be None (dot product) or a callable, got {similarity_fct!r}")
    return similarity_fct


def _check_label_index(value) -> int | None:
    return None if value is None else check_int(value, "label_index", low=0)


def _check_positive(value, name: str) -> float:
    return check_real(value, name, low=0.0)


class MarginMSELoss(nn.Module):
    """Bi-encoder Margin-MSE for ``SentenceTransformerTrainer``.

    Input columns ``(query, positive, negative_1, …, negative_n)``; the ``label`` column holds the
    teacher's scores in any of sentence-transformers' formats: ``[n + 1]`` raw scores (positive
    first), ``[n]`` margins ``t⁺ − t⁻_i``, or one margin per example when ``n = 1``. The loss is
    ``mean over (b, i) of ((s⁺_b − s⁻_{b,i}) − (t⁺_b − t⁻_{b,i}))²`` — the value of
    sentence-transformers' ``MarginMSELoss``, which it matches to fp32 rounding.

    Args:
        model: the ``SentenceTransformer`` being trained.
        similarity_fct: None (default) for the dot product, computed inside kdloss's fused kernel
            (:func:`kdloss.functional.margin_mse_from_embeddings`); or a pairwise similarity
            ``f(a [B, D], b [B, D]) -> [B]`` such as ``sentence_transformers.util.pairwise_cos_sim``.
        backend: ``"auto"``, ``"kernel"`` or ``"reference"``.

    Example:
        >>> loss = MarginMSELoss(student)
        >>> SentenceTransformerTrainer(model=student, train_dataset=dataset, loss=loss).train()
    """

    def __init__(self, model: nn.Module, similarity_fct: Callable[[Tensor, Tensor], Tensor] | None = None,
                 backend: str = "auto") -> None:
        super().__init__()
        self.model = model
        self.similarity_fct = _check_similarity(similarity_fct)
        self.backend = check_option(backend, "backend", BACKENDS)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        return self.compute_loss_from_embeddings(_embed(self.model, sentence_features), labels)

    def compute_loss_from_embeddings(self, embeddings: Sequence[Tensor], labels: Tensor) -> Tensor:
        """The loss from the columns' embeddings ``[query, positive, negative_1, …]`` (each ``[B, D]``)."""
        if len(embeddings) < 3:
            raise ValueError(f"MarginMSELoss needs (query, positive, negative_1, ...) columns, got {len(embeddings)}")
        query, positive, negatives = embeddings[0], embeddings[1], list(embeddings[2:])
        teacher = _label_tensor(labels, "labels")
        if self.similarity_fct is None:
            stacked = negatives[0] if len(negatives) == 1 else torch.stack(negatives, dim=1)
            return margin_mse_from_embeddings(query, positive, stacked, teacher, backend=self.backend)
        scores_pos = self.similarity_fct(query, positive)
        scores_neg = torch.stack([self.similarity_fct(query, negative) for negative in negatives], dim=1)
        return margin_mse_loss(scores_pos, scores_neg, teacher, backend=self.backend)

    def get_config_dict(self) -> dict[str, Any]:
        return {"similarity_fct": "dot" if self.similarity_fct is None else _name(self.similarity_fct)}

    @property
    def citation(self) -> str:
        return _MARGIN_MSE_CITATION


class _CrossEncoderScores(nn.Module):
    """Scores of (query, document) pairs from a one-label ``CrossEncoder``."""

    def __init__(self, model: nn.Module, activation_fn: nn.Module | None, mini_batch_size: int | None) -> None:
        super().__init__()
        if getattr(model, "num_labels", 1) != 1:
            raise ValueError(f"{type(self).__name__} needs a CrossEncoder with num_labels=1, got {model.num_labels}")
        if mini_batch_size is not None:
            check_int(mini_batch_size, "mini_batch_size", low=1)
        self.model = model
        self.activation_fn = nn.Identity() if activation_fn is None else activation_fn
        self.mini_batch_size = mini_batch_size

    def pair_scores(self, pairs: list[tuple[str, str]], prompt=None, task=None) -> Tensor:
        step = self.mini_batch_size or max(1, len(pairs))
        scores = []
        for start in range(0, len(pairs), step):
            tokens = self.model.preprocess(pairs[start:start + step], prompt=prompt, task=task)
            tokens = batch_to_device(tokens, self.model.device)
            scores.append(self.model(tokens)["scores"].view(-1))
        return self.activation_fn(torch.cat(scores))

    def get_config_dict(self) -> dict[str, Any]:
        return {"activation_fn": type(self.activation_fn).__name__, "mini_batch_size": self.mini_batch_size}


class CrossEncoderMarginMSELoss(_CrossEncoderScores):
    """Cross-encoder Margin-MSE for ``CrossEncoderTrainer``.

    Input columns ``(query, positive, negative_1, …, negative_n)`` (raw text); labels as for
    :class:`MarginMSELoss` (a list of per-example tensors is stacked). The student scores are the
    (activated) logits of the (query, document) pairs; the value is that of
    ``sentence_transformers.cross_encoder.losses.MarginMSELoss``.

    Args:
        model: a ``CrossEncoder`` with ``num_labels=1``.
        activation_fn: applied to the logits (default identity).
        mini_batch_size: pairs per forward (default: all pairs of a column at once).
        backend: ``"auto"``, ``"kernel"`` or ``"reference"``.

    Example:
        >>> CrossEncoderTrainer(model=ce, train_dataset=dataset, loss=CrossEncoderMarginMSELoss(ce)).train()
    """

    def __init__(self, model: nn.Module, activation_fn: nn.Module | None = None, mini_batch_size: int | None = None,
                 backend: str = "auto") -> None:
        super().__init__(model, activation_fn, mini_batch_size)
        self.backend = check_option(backend, "backend", BACKENDS)

    def forward(self, inputs: list[list[str]], labels, prompt: str | None = None, task: str | None = None) -> Tensor:
        if len(inputs) < 3:
            raise ValueError(f"CrossEncoderMarginMSELoss needs (query, positive, negative_1, ...) columns, "
                             f"got {len(inputs)}")
        queries = inputs[0]
        teacher = _label_tensor(labels, "labels")
        positive = self.pair_scores(list(zip(queries, inputs[1], strict=True)), prompt, task)
        negatives = torch.stack([self.pair_scores(list(zip(queries, column, strict=True)), prompt, task)
                                 for column in inputs[2:]], dim=1)
        return margin_mse_loss(positive, negatives, teacher, backend=self.backend)

    @property
    def citation(self) -> str:
        return _MARGIN_MSE_CITATION


def _targets(teacher: Tensor, label_index: int | None) -> Tensor | None:
    """The true document of each list: ``label_index``, or None (the teacher's top document)."""
    if label_index is None:
        return None
    if label_index >= teacher.shape[-1]:
        raise ValueError(f"label_index {label_index} is out of range for lists of {teacher.shape[-1]} documents")
    return torch.full(teacher.shape[:-1], label_index, dtype=torch.int64, device=teacher.device)


class PlackettLuceLoss(nn.Module):
    """Bi-encoder list-wise Plackett-Luce distillation for ``SentenceTransformerTrainer``.

    Input columns ``(query, document_1, …, document_n)``; the ``label`` column holds the teacher's
    ``n`` scores per query. The student's scores are ``scale · sim(query, document_i)``; the loss
    is :func:`kdloss.functional.plackett_luce_loss` of the ``[B, n]`` student scores against the
    teacher scores: the Plackett-Luce likelihood of the teacher's ranking with
    ``document_{label_index}`` put first, weighted by ``softmax(teacher / temperature)``, averaged
    over queries.

    Args:
        model: the ``SentenceTransformer`` being trained.
        similarity_fct: None (default) for the dot product, or a pairwise similarity
            ``f(a [B, D], b [B, D]) -> [B]``.
        scale: multiplier of the student scores (default 1.0; use e.g. 20 with cosine similarity).
        temperature: teacher temperature τ (default 1.0).
        label_index: which document is the true one (default 0, the first column after the
            query); None takes the teacher's top document, so the ranking is the teacher's own.
        backend: ``"auto"``, ``"kernel"`` or ``"reference"``.

    Example:
        >>> loss = PlackettLuceLoss(student, temperature=1.0)
    """

    def __init__(self, model: nn.Module, similarity_fct: Callable[[Tensor, Tensor], Tensor] | None = None, *,
                 scale: float = 1.0, temperature: float = 1.0, label_index: int | None = 0,
                 backend: str = "auto") -> None:
        super().__init__()
        self.model = model
        self.similarity_fct = _check_similarity(similarity_fct)
        self.scale = _check_positive(scale, "scale")
        self.temperature = _check_positive(temperature, "temperature")
        self.label_index = _check_label_index(label_index)
        self.backend = check_option(backend, "backend", BACKENDS)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        return self.compute_loss_from_embeddings(_embed(self.model, sentence_features), labels)

    def compute_loss_from_embeddings(self, embeddings: Sequence[Tensor], labels: Tensor) -> Tensor:
        """The loss from ``[query, document_1, …, document_n]`` embeddings (each ``[B, D]``)."""
        if len(embeddings) < 2:
            raise ValueError(f"PlackettLuceLoss needs (query, document_1, ...) columns, got {len(embeddings)}")
        query, documents = embeddings[0], list(embeddings[1:])
        teacher = _label_tensor(labels, "labels")
        if teacher.dim() == 1 and len(documents) == 1:
            teacher = teacher.unsqueeze(-1)
        if teacher.shape != (query.shape[0], len(documents)):
            raise ValueError(f"labels must hold the teacher's {len(documents)} scores per query: shape "
                             f"{(query.shape[0], len(documents))}, got {tuple(teacher.shape)}")
        if self.similarity_fct is None:
            scores = torch.bmm(torch.stack(documents, dim=1), query.unsqueeze(-1)).squeeze(-1)
        else:
            scores = torch.stack([self.similarity_fct(query, document) for document in documents], dim=1)
        return plackett_luce_loss(scores * self.scale if self.scale != 1.0 else scores, teacher,
                                  _targets(teacher, self.label_index), temperature=self.temperature,
                                  backend=self.backend)

    def get_config_dict(self) -> dict[str, Any]:
        return {"similarity_fct": "dot" if self.similarity_fct is None else _name(self.similarity_fct),
                "scale": self.scale, "temperature": self.temperature, "label_index": self.label_index}


class CrossEncoderPlackettLuceLoss(_CrossEncoderScores):
    """Cross-encoder list-wise Plackett-Luce distillation for ``CrossEncoderTrainer``.

    Two input layouts, as sentence-transformers' cross-encoder losses take them:

    * list-wise (like ``ListNetLoss``): columns ``(query, documents)`` where each ``documents``
      entry is a list of texts, and ``labels`` a list of per-query teacher-score tensors of the
      same lengths (lists may differ in length between queries);
    * columns ``(query, document_1, …, document_n)`` with ``labels`` ``[B, n]``.

    The loss is the mean over queries of :func:`kdloss.functional.plackett_luce_loss` of the
    query's (activated) pair logits against its teacher scores (queries are grouped by list length;
    nothing is padded).

    Args:
        model: a ``CrossEncoder`` with ``num_labels=1``.
        activation_fn: applied to the logits (default identity).
        temperature: teacher temperature τ (default 1.0).
        label_index: the true document's position in each list (default 0); None takes the teacher's
            top document.
        mini_batch_size: pairs per forward (default: all pairs at once).
        backend: ``"auto"``, ``"kernel"`` or ``"reference"``.

    Example:
        >>> CrossEncoderTrainer(model=ce, train_dataset=dataset, loss=CrossEncoderPlackettLuceLoss(ce)).train()
    """

    def __init__(self, model: nn.Module, activation_fn: nn.Module | None = None, *, temperature: float = 1.0,
                 label_index: int | None = 0, mini_batch_size: int | None = None, backend: str = "auto") -> None:
        super().__init__(model, activation_fn, mini_batch_size)
        self.temperature = _check_positive(temperature, "temperature")
        self.label_index = _check_label_index(label_index)
        self.backend = check_option(backend, "backend", BACKENDS)

    def forward(self, inputs: list, labels, prompt: str | None = None, task: str | None = None) -> Tensor:
        queries, lists, teachers = self._lists(inputs, labels)
        pairs = [(query, document) for query, documents in zip(queries, lists, strict=True) for document in documents]
        scores = self.pair_scores(pairs, prompt, task).split([len(documents) for documents in lists])
        total = scores[0].new_zeros((), dtype=torch.float32)
        by_length: dict[int, list[int]] = {}
        for row, documents in enumerate(lists):
            by_length.setdefault(len(documents), []).append(row)
        for rows in by_length.values():
            student = torch.stack([scores[row] for row in rows])
            teacher = torch.stack([teachers[row] for row in rows]).to(student.device)
            total = total + plackett_luce_loss(student, teacher, _targets(teacher, self.label_index),
                                               temperature=self.temperature, reduction="sum",
                                               backend=self.backend).float()
        return total / max(1, len(lists))

    @staticmethod
    def _lists(inputs: list, labels):
        if len(inputs) == 2 and inputs[1] and isinstance(inputs[1][0], (list, tuple)):
            queries, lists = inputs[0], [list(documents) for documents in inputs[1]]
            if not isinstance(labels, (list, tuple)):
                labels = list(_label_tensor(labels, "labels"))
            teachers = [torch.as_tensor(row).detach() for row in labels]
        else:
            if len(inputs) < 2:
                raise ValueError("CrossEncoderPlackettLuceLoss needs (query, documents) or (query, document_1, ...)")
            queries, lists = inputs[0], [list(row) for row in zip(*inputs[1:], strict=True)]
            teachers = list(_label_tensor(labels, "labels"))
        if len(teachers) != len(queries) or any(
                t.dim() != 1 or t.shape[0] != len(d) for t, d in zip(teachers, lists, strict=True)):
            raise ValueError(f"labels must hold one teacher score per document: lists of lengths "
                             f"{[len(d) for d in lists]}, got {[tuple(t.shape) for t in teachers]}")
        if any(not t.is_floating_point() for t in teachers):
            raise ValueError("labels must be floating-point teacher scores")
        return queries, lists, teachers

    def get_config_dict(self) -> dict[str, Any]:
        return {**super().get_config_dict(), "temperature": self.temperature, "label_index": self.label_index}
