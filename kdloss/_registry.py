"""The one list of kdloss's losses. Everything that enumerates losses derives from :data:`LOSSES`.

Each :class:`Loss` names the loss once (``name``) and says which files of the one-name-per-loss layout
it has: ``kdloss/<name>.py`` (public functionals and modules), ``kdloss/_ops/<name>.py`` (op schemas,
fakes, autograd), ``kdloss/reference/<name>.py``, ``kdloss/testing/<name>.py`` (fuzz spec),
``kdloss/bench/<name>.py``, ``csrc/cpu/*.cpp`` and ``csrc/cuda/*`` (listed explicitly),
``tests/test_<name>.py`` and ``docs/<name>.md``. Derived from it: op registration
(:mod:`kdloss._ops`), ``kdloss.__all__`` and :mod:`kdloss.functional`, the kernel build
(:mod:`kdloss._build`), the CLIs ``python -m kdloss.build|fuzz|bench``, the sanitized CI run, and the
README/docs tables (checked by ``tests/test_registry.py``).

This module imports nothing heavy: it is plain data, read by the build and the CLIs before torch ops
exist.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LOSSES", "Loss", "get", "kernel_libraries", "kernel_test_files", "names"]


@dataclass(frozen=True)
class Loss:
    """One loss and the files it owns.

    Args:
        name: the loss's one name (module, ops, sources, tests, docs, CLI).
        title: a short human title (README and docs tables).
        functionals: public functions defined in ``kdloss/<name>.py`` and exported by ``kdloss.functional``.
        modules: ``nn.Module`` classes defined in ``kdloss/<name>.py`` and exported by ``kdloss``.
        cpu_sources: C++ sources of its CPU kernel library, relative to ``csrc/`` (empty: no own library).
        cuda_sources: ``.cu``/``.cpp`` sources of its CUDA kernel library, relative to ``csrc/``.
        kernels: kernel libraries its kernel path loads (its own name when it has sources; another
            loss's library when it reuses those kernels).
        ops: whether ``kdloss/_ops/<name>.py`` defines ``kdloss::<name>_*`` ops.
        fuzz: whether ``kdloss/testing/<name>.py`` defines a parity-fuzz spec (needs a kernel path).
        bench: whether ``kdloss/bench/<name>.py`` defines benchmark cases.
        status: one line for the README table.

    Example:
        >>> from kdloss._registry import get
        >>> get("topk_kl").cpu_sources
        ('cpu/topk_kl.cpp',)
    """

    name: str
    title: str
    functionals: tuple[str, ...]
    modules: tuple[str, ...]
    cpu_sources: tuple[str, ...] = ()
    cuda_sources: tuple[str, ...] = ()
    kernels: tuple[str, ...] = ()
    ops: bool = True
    fuzz: bool = True
    bench: bool = True
    status: str = ""

    @property
    def docs(self) -> str:
        """Path of the loss's documentation page, relative to the repository root."""
        return f"docs/{self.name}.md"

    @property
    def has_kernel(self) -> bool:
        """True when the loss has a compiled kernel path (its own library or another's)."""
        return bool(self.kernels)


def _own(name: str) -> dict:
    """Source lists of a loss with its own kernel library: ``csrc/cpu/<name>.cpp``,
    ``csrc/cuda/<name>.cu`` (kernels) and ``csrc/cuda/<name>_ops.cpp`` (dispatcher glue)."""
    return dict(cpu_sources=(f"cpu/{name}.cpp",), cuda_sources=(f"cuda/{name}.cu", f"cuda/{name}_ops.cpp"),
                kernels=(name,))


_NOT_RUN = "CPU kernels; CUDA compiled, not yet run on a GPU"

#: Every loss, in documentation order.
LOSSES: tuple[Loss, ...] = (
    Loss("margin_mse", "Margin-MSE (Hofstätter et al. 2020)", ("margin_mse_loss", "margin_mse_from_embeddings"),
         ("MarginMSELoss",), status=_NOT_RUN, **_own("margin_mse")),
    Loss("topk_kl", "Top-k sparse KL (LLM distillation from a stored or served top-k teacher)", ("topk_kl_loss",),
         ("TopKKLLoss",), status=_NOT_RUN, **_own("topk_kl")),
    Loss("fused_linear_topk_kl", "Fused linear + top-k KL (never materialises [N, V] logits)",
         ("fused_linear_topk_kl_loss",), ("FusedLinearTopKKLLoss",), kernels=("topk_kl",),
         status="CPU (top-k kernels per chunk); CUDA compiled, not yet run on a GPU"),
    Loss("sinkhorn", "SinKD (batch-wise Sinkhorn distillation)", ("sinkhorn_loss",), ("SinkhornLoss",),
         status=_NOT_RUN, **_own("sinkhorn")),
    Loss("plackett_luce", "PLD (Plackett-Luce distillation)", ("plackett_luce_loss", "plackett_luce_ranking"),
         ("PlackettLuceLoss",), status=_NOT_RUN, **_own("plackett_luce")),
    Loss("token_contextual", "TRG contextual term (MSE between per-image token-relation softmaxes)",
         ("token_contextual_loss",), ("TokenContextualLoss",), status=_NOT_RUN, **_own("token_contextual")),
    Loss("token_graph", "TRG graph term (kNN token graph KL)", ("token_graph_loss",), ("TokenGraphLoss",),
         status=_NOT_RUN + "; experimental", **_own("token_graph")),
    Loss("token_contrastive", "TRG contrastive term (token InfoNCE)", ("token_contrastive_loss",),
         ("TokenContrastiveLoss",), status=_NOT_RUN + "; experimental", **_own("token_contrastive")),
    Loss("trg", "TRG (token relationship graph: contextual + graph + contrastive)",
         (), ("TRGLoss",), ops=False, fuzz=False,
         bench=False, status="composite of the three token_* losses"),
)

_BY_NAME = {loss.name: loss for loss in LOSSES}


def names() -> list[str]:
    """Names of every loss, in :data:`LOSSES` order."""
    return [loss.name for loss in LOSSES]


def get(name: str) -> Loss:
    """The :class:`Loss` called ``name``; ``ValueError`` listing the names otherwise."""
    if name not in _BY_NAME:
        raise ValueError(f"loss must be one of {names()}, got {name!r}")
    return _BY_NAME[name]


def kernel_libraries() -> list[str]:
    """Names of the compiled kernel libraries (losses with their own sources)."""
    return [loss.name for loss in LOSSES if loss.cpu_sources or loss.cuda_sources]


def kernel_test_files() -> list[str]:
    """``tests/test_<name>.py`` of every loss with a kernel path (the sanitized CI run's selection)."""
    return [f"tests/test_{loss.name}.py" for loss in LOSSES if loss.has_kernel]

