"""Reading DistillKit's offline teacher datasets (Parquet) and converting them to a kdloss cache.

DistillKit stores one Parquet row per sequence: ``input_ids`` and, per position, either raw
``token_ids`` / ``top_values`` lists or a compressed pair ``compressed_logprobs`` /
``bytepacked_indices`` (lists of bytes) described by a quantisation config. The compressed
log-prob bytes of one position are, in order:

1. ``exact_k`` values in ``exact_dtype`` (little-endian);
2. one coefficient per entry of ``polynomial_terms`` in ``term_dtype``;
3. per residual bin: its scale in ``scale_dtype``, then ``num_elements`` integers of
   ``element_bits`` bits packed MSB-first into ``ceil(num_elements * element_bits / 8)`` bytes.

Decoding: slots ``exact_k..k-1`` are the polynomial ``Σ c_j · f_j(t)`` over ``t = 0..k-exact_k-1``
(or ``t`` spread over ``[0, 1]`` with ``normalize_t``; ``f_j`` is ``t**j`` for an int, ``sqrt(t)`` or
``exp(t)`` for the named terms) plus the dequantised residuals (``(q - 2**(b-1)) · scale``, or
``(2q - 1) · scale`` for 1-bit bins; zero past the bins), with the residual rounded to
``exact_dtype`` first; with ``delta_encoding`` the decoded values are differences and a running
sum (fp32) restores them, rounded to ``exact_dtype``. The ``k`` ids are packed MSB-first with
``ceil(log2 d)`` bits each. Values come sorted by decreasing log-prob.
"""

from __future__ import annotations

import glob
import itertools
import json
import numbers
import os
from dataclasses import dataclass, field

import numpy as np

from .writer import TopKCacheWriter

__all__ = ["DistillKitQuantization", "decode_distillkit_logprobs", "decode_distillkit_indices", "convert_distillkit",
           "read_distillkit_rows"]

_DTYPES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
_SPECIAL = ("sqrt", "exp")
_FIELDS = ("d", "k", "exact_k", "exact_dtype", "polynomial_terms", "term_dtype", "residual_bins", "delta_encoding",
           "error_diffusion", "normalize_t")


def _need_pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ImportError("reading DistillKit Parquet datasets needs pyarrow: pip install 'kdloss[cache]' "
                          "(or pip install pyarrow)") from None
    return pyarrow


@dataclass(frozen=True)
class ResidualBin:
    """One residual bin: ``num_elements`` values of ``element_bits`` bits sharing a scale."""

    scale_dtype: str
    element_bits: int
    num_elements: int


def _int_field(data: dict, name: str, low: int, default=None) -> int:
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"quantization[{name!r}] must be an int >= {low}, got {value!r}")
    return int(value)


def _dtype_field(data: dict, name: str, default: str) -> str:
    value = data.get(name, default)
    if value not in _DTYPES:
        raise ValueError(f"quantization[{name!r}] must be one of {tuple(_DTYPES)}, got {value!r}")
    return value


def _bool_field(data: dict, name: str, default: bool) -> bool:
    value = data.get(name, default)
    if not isinstance(value, bool):
        raise TypeError(f"quantization[{name!r}] must be a bool, got {value!r}")
    return value


@dataclass(frozen=True)
class DistillKitQuantization:
    """DistillKit's ``DistributionQuantizationConfig`` (same fields, same defaults).

    Build it with :meth:`from_dict` from the dict (or YAML ``compression_config.yaml``) DistillKit
    used; its fields: ``d`` (vocabulary size of the index packing), ``k``, ``exact_k``,
    ``exact_dtype`` (default float32), ``polynomial_terms`` (ints and ``"sqrt"``/``"exp"``),
    ``term_dtype`` (float32), ``residual_bins`` (dicts with ``scale_dtype``, ``element_bits``,
    ``num_elements``), ``delta_encoding`` (default True), ``error_diffusion`` (encoding only),
    ``normalize_t`` (False).

    Args:
        d, k, exact_k, exact_dtype, polynomial_terms, term_dtype, residual_bins, delta_encoding,
            error_diffusion, normalize_t: DistillKit's fields, as above.

    Returns:
        ``logprob_bytes``, ``index_bits``, ``index_bytes`` and ``bytes_per_token()`` describe the
        byte layout of one position.

    Example::

        config = DistillKitQuantization.from_dict(yaml.safe_load(open("compression_config.yaml")))
    """

    d: int
    k: int
    exact_k: int
    exact_dtype: str = "float32"
    polynomial_terms: tuple = ()
    term_dtype: str = "float32"
    residual_bins: tuple = field(default_factory=tuple)
    delta_encoding: bool = True
    error_diffusion: bool = False
    normalize_t: bool = False

    @classmethod
    def from_dict(cls, data: dict) -> DistillKitQuantization:
        """Validates DistillKit's config fields (unknown keys raise ``ValueError``)."""
        if not isinstance(data, dict):
            raise TypeError(f"quantization must be a dict of DistillKit's config fields, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise ValueError(f"unknown quantization fields {unknown}; expected a subset of {list(_FIELDS)}")
        terms = data.get("polynomial_terms") or []
        for term in terms:
            if not ((isinstance(term, numbers.Integral) and not isinstance(term, bool) and term >= 0)
                    or term in _SPECIAL):
                raise ValueError(f"polynomial_terms entries must be ints >= 0 or one of {_SPECIAL}, got {term!r}")
        bins = []
        for entry in data.get("residual_bins") or []:
            if not isinstance(entry, dict):
                raise TypeError(f"residual_bins entries must be dicts, got {entry!r}")
            bins.append(ResidualBin(_dtype_field(entry, "scale_dtype", None), _int_field(entry, "element_bits", 1),
                                    _int_field(entry, "num_elements", 1)))
            if bins[-1].element_bits > 64:
                raise ValueError(f"residual bin element_bits must be <= 64, got {bins[-1].element_bits}")
        config = cls(d=_int_field(data, "d", 2), k=_int_field(data, "k", 1), exact_k=_int_field(data, "exact_k", 0),
                     exact_dtype=_dtype_field(data, "exact_dtype", "float32"),
                     polynomial_terms=tuple(int(t) if isinstance(t, numbers.Integral) else t for t in terms),
                     term_dtype=_dtype_field(data, "term_dtype", "float32"), residual_bins=tuple(bins),
                     delta_encoding=_bool_field(data, "delta_encoding", True),
                     error_diffusion=_bool_field(data, "error_diffusion", False),
                     normalize_t=_bool_field(data, "normalize_t", False))
        if config.exact_k > config.k:
            raise ValueError(f"exact_k must be <= k, got exact_k={config.exact_k}, k={config.k}")
        if sum(b.num_elements for b in bins) > config.k - config.exact_k:
            raise ValueError("the residual bins hold more elements than k - exact_k")
        if config.exact_k < config.k and not terms and not bins:
            raise ValueError("exact_k < k needs polynomial_terms or residual_bins")
        return config

    @property
    def index_bits(self) -> int:
        """Bits per packed id: ``ceil(log2(d))`` evaluated in float32, as DistillKit does."""
        return int(np.ceil(np.log2(np.float32(self.d))))

    @property
    def index_bytes(self) -> int:
        """Bytes of one position's ``bytepacked_indices``."""
        return (self.k * self.index_bits + 7) // 8

    @property
    def logprob_bytes(self) -> int:
        """Bytes of one position's ``compressed_logprobs``."""
        size = self.exact_k * _DTYPES[self.exact_dtype] + len(self.polynomial_terms) * _DTYPES[self.term_dtype]
        for b in self.residual_bins:
            size += _DTYPES[b.scale_dtype] + (b.num_elements * b.element_bits + 7) // 8
        return size

    def bytes_per_token(self) -> int:
        """Payload bytes per position (log-probs + ids), without Parquet overhead."""
        return self.logprob_bytes + self.index_bytes


# ----------------------------------------------------------------------------------------------
# decoding


def _read_floats(raw: np.ndarray, dtype: str, count: int) -> np.ndarray:
    """``raw [N, count * width]`` uint8 → ``[N, count]`` values of ``dtype`` (float64 for float64, else float32)."""
    raw = np.ascontiguousarray(raw)
    if count == 0:
        return np.zeros((raw.shape[0], 0), dtype=np.float64 if dtype == "float64" else np.float32)
    if dtype == "bfloat16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(raw.shape[0], count)
    numpy_dtype = {"float16": "<f2", "float32": "<f4", "float64": "<f8"}[dtype]
    values = raw.view(numpy_dtype).reshape(raw.shape[0], count)
    return values.astype(np.float64 if dtype == "float64" else np.float32)


def _round_to(values: np.ndarray, dtype: str) -> np.ndarray:
    """Rounds to ``dtype`` (nearest even) and returns the rounded values as float32 (float64 for float64)."""
    if dtype == "float64":
        return values.astype(np.float64)
    if dtype == "float32":
        return values.astype(np.float32)
    if dtype == "float16":
        return values.astype(np.float16).astype(np.float32)
    bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
    finite = np.isfinite(values)
    rounded = np.where(finite, (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16, bits & 0xFFFF0000)
    return rounded.astype(np.uint32).view(np.float32)


def _promote(a: str, b: str) -> str:
    """torch's type promotion between two float dtypes."""
    if a == b:
        return a
    if "float64" in (a, b):
        return "float64"
    return "float32"


def _unpack_msb(raw: np.ndarray, count: int, bits: int) -> np.ndarray:
    """``raw [N, nbytes]`` uint8 holding ``count`` MSB-first ``bits``-bit integers per row → ``[N, count]`` int64."""
    stream = np.unpackbits(np.ascontiguousarray(raw), axis=1, bitorder="big")[:, : count * bits]
    stream = stream.reshape(raw.shape[0], count, bits).astype(np.uint64)
    weights = np.uint64(1) << np.arange(bits - 1, -1, -1, dtype=np.uint64)
    return (stream * weights).sum(axis=2, dtype=np.uint64).astype(np.int64)


def _term_matrix(config: DistillKitQuantization, count: int) -> np.ndarray:
    """``[count, n_terms]`` basis values, computed in the term dtype's precision."""
    dtype = np.float64 if config.term_dtype == "float64" else np.float32
    if config.normalize_t:
        points = np.linspace(0.0, 1.0, count, dtype=np.float64).astype(dtype) if count > 1 else np.zeros(count, dtype)
    else:
        points = np.arange(count, dtype=dtype)
    points = _round_to(points, config.term_dtype)
    columns = []
    with np.errstate(over="ignore"):
        for term in config.polynomial_terms:
            if term == "sqrt":
                column = np.sqrt(points)
            elif term == "exp":
                column = np.exp(points)
            else:
                column = points.astype(np.float64) ** term
            columns.append(_round_to(column, config.term_dtype))
    return np.stack(columns, axis=-1) if columns else np.zeros((count, 0), dtype)


def decode_distillkit_logprobs(raw, config: DistillKitQuantization) -> np.ndarray:
    """Decodes ``compressed_logprobs`` bytes ``[N, logprob_bytes]`` (uint8) to ``[N, k]`` float32 log-probs.

    Follows DistillKit's decompression step by step, including its roundings (basis values and
    products in ``term_dtype``, residuals to ``exact_dtype``, delta-decoded sums to
    ``exact_dtype``). The sum over polynomial terms is taken in float64 and rounded once, where
    torch sums in float32 in an order of its own: results can differ from DistillKit's by the
    rounding of that sum (a few float32 ulps of the largest term; more for float16 terms).
    """
    raw = np.asarray(raw, dtype=np.uint8)
    if raw.ndim != 2 or raw.shape[1] != config.logprob_bytes:
        raise ValueError(f"compressed_logprobs must hold {config.logprob_bytes} bytes per position for this "
                         f"quantization config, got shape {raw.shape}")
    rows, at = raw.shape[0], 0
    width = _DTYPES[config.exact_dtype]
    exact = _read_floats(raw[:, : config.exact_k * width], config.exact_dtype, config.exact_k)
    at += config.exact_k * width
    n_terms, term_width = len(config.polynomial_terms), _DTYPES[config.term_dtype]
    coeffs = _read_floats(raw[:, at: at + n_terms * term_width], config.term_dtype, n_terms)
    at += n_terms * term_width
    approx_count = config.k - config.exact_k
    residual = np.zeros((rows, approx_count), dtype=np.float64)
    filled = 0
    for b in config.residual_bins:
        scale = _read_floats(raw[:, at: at + _DTYPES[b.scale_dtype]], b.scale_dtype, 1).astype(np.float64)
        at += _DTYPES[b.scale_dtype]
        size = (b.num_elements * b.element_bits + 7) // 8
        codes = _unpack_msb(raw[:, at: at + size], b.num_elements, b.element_bits).astype(np.float64)
        at += size
        if b.element_bits == 1:
            steps = codes * 2.0 - 1.0
        else:
            steps = codes - float(1 << (b.element_bits - 1))
        # DistillKit multiplies in float32 (float64 for a float64 scale)
        product = steps.astype(np.float32) * scale.astype(np.float32) if b.scale_dtype != "float64" else steps * scale
        residual[:, filled: filled + b.num_elements] = product
        filled += b.num_elements
    residual = _round_to(residual, config.exact_dtype)
    if n_terms:
        basis = _term_matrix(config, approx_count).astype(np.float64)
        # products rounded to the term dtype (as torch multiplies there), the sum rounded once
        products = _round_to(basis[None] * coeffs.astype(np.float64)[:, None, :], config.term_dtype)
        fit = _round_to(products.astype(np.float64).sum(-1), config.term_dtype)
        joint = _promote(config.term_dtype, config.exact_dtype)
        approx = _round_to(fit.astype(np.float64) + residual.astype(np.float64), joint)
    else:
        joint, approx = config.exact_dtype, residual
    values = np.concatenate([exact.astype(np.float64), approx.astype(np.float64)], axis=1)
    if config.delta_encoding:
        values = _round_to(np.cumsum(values.astype(np.float32), axis=1, dtype=np.float32), config.exact_dtype)
    else:
        values = _round_to(values, joint)
    return values.astype(np.float32)


def decode_distillkit_indices(raw, config: DistillKitQuantization) -> np.ndarray:
    """Decodes ``bytepacked_indices`` bytes ``[N, index_bytes]`` to ``[N, k]`` int64 ids."""
    raw = np.asarray(raw, dtype=np.uint8)
    if raw.ndim != 2 or raw.shape[1] != config.index_bytes:
        raise ValueError(f"bytepacked_indices must hold {config.index_bytes} bytes per position "
                         f"(k={config.k} ids of {config.index_bits} bits), got shape {raw.shape}")
    return _unpack_msb(raw, config.k, config.index_bits)


# ----------------------------------------------------------------------------------------------
# Parquet reading and conversion


def _parquet_files(source: str) -> list[str]:
    if os.path.isdir(source):
        files = sorted(glob.glob(os.path.join(source, "**", "*.parquet"), recursive=True),
                       key=lambda p: (len(p), p))
        if not files:
            raise FileNotFoundError(f"no .parquet files under {source!r}")
        return files
    if not os.path.exists(source):
        raise FileNotFoundError(f"no such file or directory: {source!r}")
    return [source]


def _load_quantization(quantization, source: str) -> DistillKitQuantization | None:
    if isinstance(quantization, DistillKitQuantization):
        return quantization
    if quantization is None:
        folder = source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))
        candidate = os.path.join(folder, "compression_config.yaml")
        if not os.path.exists(candidate):
            return None
        quantization = candidate
    if isinstance(quantization, (str, os.PathLike)):
        path = os.fspath(quantization)
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        if path.endswith((".yaml", ".yml")):
            try:
                import yaml
            except ImportError:
                raise ImportError(f"reading {path} needs PyYAML (pip install pyyaml), or pass the config as a "
                                  "dict") from None
            quantization = yaml.safe_load(text)
        else:
            quantization = json.loads(text)
    return DistillKitQuantization.from_dict(quantization)


def _nested(cell, rows: int, width: int | None, name: str, row_number: int, dtype) -> np.ndarray:
    """A ``list<list<x>>`` cell (a ``ListScalar``) as a ``[rows, width]`` array."""
    flat = np.asarray(cell.values.flatten().to_numpy(zero_copy_only=False), dtype=dtype)
    if width is None:
        width = flat.size // max(rows, 1) if rows else 0
    if flat.size != rows * width:
        raise ValueError(f"row {row_number}: column {name!r} is ragged or has {flat.size} entries, "
                         f"expected {rows} x {width}")
    return flat.reshape(rows, width)


def read_distillkit_rows(source, quantization=None):
    """Yields ``(tokens [T] int64, ids [R, k] int64, logprobs [R, k] float32)`` per DistillKit row.

    Args:
        source: a Parquet file or a directory of them (DistillKit's ``data_N.parquet`` output).
        quantization: DistillKit's quantisation config (dict, :class:`DistillKitQuantization`, or
            path to its YAML/JSON) for compressed rows; None looks for ``compression_config.yaml``
            next to the data. Raw rows (``token_ids``/``top_values``, or Axolotl-style
            ``target_token_ids``/``target_logprobs``) need none.

    Returns:
        An iterator over the rows, in file order (files sorted by name length, then name).

    Example::

        for tokens, ids, logprobs in read_distillkit_rows("distillkit_out/"):
            ...
    """
    pyarrow = _need_pyarrow()
    source = os.fspath(source)
    config = _load_quantization(quantization, source)
    row_number = 0
    for path in _parquet_files(source):
        parquet = pyarrow.parquet.ParquetFile(path)
        names = set(parquet.schema_arrow.names)
        if "compressed_logprobs" in names and "bytepacked_indices" in names :
            mode, columns = "compressed", ["input_ids", "compressed_logprobs", "bytepacked_indices"]
            if config is None:
                raise ValueError(f"{path} holds compressed rows: pass quantization= (DistillKit's config fields "
                                 "d, k, exact_k, ...) or put compression_config.yaml next to it")
        elif "token_ids" in names and "top_values" in names:
            mode, columns = "raw", ["input_ids", "token_ids", "top_values"]
        elif "target_token_ids" in names and "target_logprobs" in names:
            mode, columns = "raw", ["input_ids", "target_token_ids", "target_logprobs"]
        elif "packed_indices" in names:
            raise ValueError(f"{path}: DistillKit's legacy format (packed_indices/exact_values/coeffs) is not "
                             "supported")
        else:
            raise ValueError(f"{path}: no DistillKit columns (expected compressed_logprobs + bytepacked_indices or "
                             f"token_ids + top_values), found {sorted(names)}")
        if "input_ids" not in names:
            raise ValueError(f"{path}: no input_ids column")
        for batch in parquet.iter_batches(batch_size=64, columns=columns):
            for i in range(batch.num_rows):
                cells = [batch.column(c)[i] for c in range(3)]
                tokens = np.asarray(cells[0].values.to_numpy(zero_copy_only=False), dtype=np.int64)
                rows = len(cells[1].values)
                if mode == "compressed":
                    logprobs = decode_distillkit_logprobs(
                        _nested(cells[1], rows, config.logprob_bytes, columns[1], row_number, np.uint8), config)
                    ids = decode_distillkit_indices(
                        _nested(cells[2], rows, config.index_bytes, columns[2], row_number, np.uint8), config)
                else:
                    ids = _nested(cells[1], rows, None, columns[1], row_number, np.int64)
                    logprobs = _nested(cells[2], rows, ids.shape[1], columns[2], row_number, np.float32)
                yield tokens, ids, logprobs
                row_number += 1


def convert_distillkit(parquet_path, out_path, vocab_size: int, quantization=None, *, temperature: float = 1.0,
                       values_format: str = "auto", shard_tokens: int | None = None, resume: bool = False,
                       metadata: dict | None = None, progress=None) -> int:
    """Converts a DistillKit teacher dataset (Parquet) into a kdloss cache.

    DistillKit's rows hold ``R = T - 1`` positions (vLLM's prompt log-probs have none for the
    first token), position j being the distribution of ``input_ids[j + 1]``: exactly kdloss's row
    convention, so rows are stored as they are. Rows with ``R = T`` are also accepted.
    Slots holding ``-inf`` (positions where the teacher returned fewer than k ids) are kept.

    Args:
        parquet_path: a ``.parquet`` file or a directory of them.
        out_path: the cache directory to write.
        vocab_size: the teacher's vocabulary size (ids and tokens must be below it).
        quantization: DistillKit's quantisation config as a dict of its fields (``d, k, exact_k,
            exact_dtype, polynomial_terms, term_dtype, residual_bins, delta_encoding,
            error_diffusion, normalize_t``), a :class:`DistillKitQuantization`, or a path to its
            YAML/JSON; None uses ``compression_config.yaml`` next to the data when present
            (needed only for compressed rows).
        temperature: generation temperature of the stored log-probs (DistillKit samples at 1.0).
        values_format, shard_tokens, resume, metadata: as in :class:`~kdloss.cache.TopKCacheWriter`.
        progress: optional callable ``progress(sequences_done)``.

    Returns:
        The number of sequences in the cache.

    Raises:
        ImportError: pyarrow is not installed (``pip install 'kdloss[cache]'``).
        ValueError: unknown columns, malformed rows, ids out of range, or a config that does not
            match the bytes.

    Example::

        convert_distillkit("distillkit_out/", "cache/", vocab_size=151936, quantization={
            "d": 151936, "k": 128, "exact_k": 16, "exact_dtype": "bfloat16",
            "polynomial_terms": [0, 1, 2, 3, 4, "sqrt"], "term_dtype": "float32", "residual_bins": [],
            "delta_encoding": False, "error_diffusion": False})
    """
    rows = read_distillkit_rows(parquet_path, quantization)
    leading = []  # rows before the first one with positions, which tells k
    for row in rows:
        leading.append(row)
        if row[1].shape[0]:
            break
    if not leading or not leading[-1][1].shape[0]:
        raise ValueError(f"{parquet_path}: no rows with teacher positions")
    k = leading[-1][1].shape[1]
    kwargs = {} if shard_tokens is None else {"shard_tokens": shard_tokens}
    info = {"source": "distillkit", "source_path": os.path.abspath(os.fspath(parquet_path))}
    info.update(metadata or {})
    with TopKCacheWriter(out_path, vocab_size=vocab_size, k=k, values="logprobs", temperature=temperature,
                         resume=resume, metadata=info, values_format=values_format, **kwargs) as writer:
        done = len(writer)
        for number, (tokens, ids, logprobs) in enumerate(itertools.chain(leading, rows)):
            if number < done:
                continue
            if ids.shape[0] == 0:
                ids, logprobs = ids.reshape(0, k), logprobs.reshape(0, k)
            try:
                writer.add(tokens, ids, logprobs)
            except ValueError as error:
                raise ValueError(f"DistillKit row {number}: {error}") from None
            if progress is not None:
                progress(number + 1)
        return len(writer)

