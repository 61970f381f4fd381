"""``TopKCacheWriter``: appends sequences (tokens + the teacher's top-k) to a cache, durably."""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os

import numpy as np

from . import _format as fmt
from ._arrays import as_array

__all__ = ["TopKCacheWriter"]

#: Tokens per shard by default: about 64 MiB per shard at k = 64 with uint16 ids and fp16 values.
DEFAULT_SHARD_TOKENS = 1 << 18
#: Log-probs may exceed 0 by this much (rounding in the teacher); larger values are rejected.
LOGPROB_SLACK = 1e-2


def _check_int(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _check_temperature(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0 < value < math.inf):
        raise ValueError(f"temperature must be a finite number > 0, got {value!r}")
    return float(value)


def _check_user_metadata(metadata) -> dict:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
    clash = sorted(set(metadata) & set(fmt.RESERVED_KEYS))
    if clash:
        raise ValueError(f"metadata must not use the reserved keys {clash}")
    try:
        return json.loads(json.dumps(metadata))
    except (TypeError, ValueError) as error:
        raise ValueError(f"metadata must be JSON-serialisable ({error})") from None


class TopKCacheWriter:
    """Writes a top-k teacher cache: one :meth:`add` per sequence, committed in shards.

    A shard is written to ``shard-N.kdc.tmp``, fsynced, renamed to ``shard-N.kdc`` (the directory
    fsynced), its record appended to the shard table ``shards.bin`` (fsynced), and only then
    counted by ``manifest.json`` (replaced atomically: temporary file, fsync, rename, directory
    fsync). A writer killed at any point loses at most the shard in flight and leaves a cache
    that opens; whatever the manifest does not count is ignored by readers and removed on resume.

    Args:
        path: cache directory (created if missing).
        vocab_size: teacher vocabulary size V; every stored id and token must lie in ``[0, V)``.
        k: slots per position.
        values: ``"logprobs"`` (full-softmax log-probabilities, as :func:`kdloss.sparse.topk_teacher`
            returns them) or ``"logits"``. RS-KD sampled targets (:func:`kdloss.sparse.sample_teacher_targets`)
            are stored as ids + ``log(weights)`` with ``values="logprobs"`` and ``kind="sampled"``.
        temperature: temperature at which the stored values were generated; pass it to the loss
            as ``teacher_temperature`` (:meth:`TopKCache.loss_kwargs` does).
        shard_tokens: a shard is committed once it holds at least this many tokens.
        resume: continue an existing cache (its metadata must match); ``len(writer)`` then says
            how many sequences it already holds. With ``resume=False`` an existing cache is an error.
        metadata: optional JSON-serialisable dict stored with the cache (e.g. teacher name, dataset).
        kind: ``"topk"`` (default) or ``"sampled"`` (RS-KD targets: use the loss with ``tail="none"``).
        ids_format: ``"auto"`` (uint16 when V <= 65536, else bit-packed ``ceil(log2 V)`` bits),
            ``"uint16"``, ``"uint32"`` or ``"packed"``.
        values_format: ``"auto"`` (default: ``"float16"`` beside uint16 ids, ``"q13"`` beside
            bit-packed or uint32 ids), ``"float16"``, ``"bfloat16"``, ``"float32"`` (exact) or
            ``"q<bits>"`` (e.g. ``"q13"``): uniform quantisation of each value's distance below its
            row maximum with a step of ``value_span / (2**bits - 2)`` nats (values deeper than
            ``value_span`` below the maximum are stored at that depth); the row maximum is kept
            exactly (float32).
        value_span: range of the quantised formats in nats (default 40).
        durable: fsync files and directories (default True; False only for throwaway caches).

    Returns:
        A context manager; leaving it (or :meth:`close`) commits the shard in flight.

    Example::

        with TopKCacheWriter("cache/", vocab_size=32000, k=64) as writer:
            for tokens in dataset[len(writer):]:
                ids, logprobs = kdloss.sparse.topk_teacher(teacher(tokens[None]).logits[0, :-1], 64)
                writer.add(tokens, ids, logprobs)
    """

    def __init__(self, path, vocab_size: int, k: int, values: str = "logprobs", temperature: float = 1.0,
                 shard_tokens: int = DEFAULT_SHARD_TOKENS, resume: bool = False, metadata: dict | None = None, *,
                 kind: str = "topk", ids_format: str = "auto", values_format: str = "auto",
                 value_span: float = 40.0, durable: bool = True) -> None:
        self.path = os.fspath(path)
        self.vocab_size = _check_int(vocab_size, "vocab_size", 1)
        self.k = _check_int(k, "k", 1)
        if values not in fmt.VALUE_KINDS:
            raise ValueError(f"values must be one of {fmt.VALUE_KINDS}, got {values!r}")
        if kind not in fmt.TARGET_KINDS:
            raise ValueError(f"kind must be one of {fmt.TARGET_KINDS}, got {kind!r}")
        if ids_format not in ("auto", "uint16", "uint32", "packed"):
            raise ValueError(f"ids_format must be 'auto', 'uint16', 'uint32' or 'packed', got {ids_format!r}")
        if not isinstance(resume, bool) or not isinstance(durable, bool):
            raise TypeError("resume and durable must be bools")
        self.values, self.kind = values, kind
        self.temperature = _check_temperature(temperature)
        self.shard_tokens = _check_int(shard_tokens, "shard_tokens", 1)
        self.durable = durable
        self.encoding = fmt.choose_encoding(self.vocab_size, ids_format, values_format, value_span)
        self.metadata = {"vocab_size": self.vocab_size, "k": self.k, "values": values,
                         "temperature": self.temperature, "kind": kind, **_check_user_metadata(metadata)}
        self._committed = fmt.Manifest(self.metadata, self.encoding, 0, 0, 0, 0, 0)
        self._pending = None  # the shard in flight: file handle, hash, index records, tokens
        self._closed = False
        os.makedirs(self.path, exist_ok=True)
        self._table_path = os.path.join(self.path, fmt.TABLE)
        if os.path.exists(os.path.join(self.path, fmt.MANIFEST)):
            if not resume:
                raise FileExistsError(f"a kdloss cache already exists at {self.path!r}; pass resume=True to "
                                      "continue it, or choose another path")
            self._load_existing()
        else:
            fmt.atomic_write(self._table_path, fmt.table_header(), durable)
        self._remove_orphans()
        self._truncate_table()
        self._write_manifest()

    # -------------------------------------------------------------------------------- state

    def _load_existing(self) -> None:
        manifest = fmt.read_manifest(self.path)
        metadata, encoding = manifest.metadata, manifest.encoding
        if metadata != self.metadata or encoding != self.encoding:
            theirs = {**metadata, "encoding": encoding.to_json()}
            ours = {**self.metadata, "encoding": self.encoding.to_json()}
            differ = sorted(key for key in set(theirs) | set(ours) if theirs.get(key) != ours.get(key))
            details = ", ".join(f"{key}: {theirs.get(key)!r} there, {ours.get(key)!r} here" for key in differ)
            raise ValueError(f"cannot resume {self.path!r}: it was written with different settings ({details})")
        if manifest.shards == 0 and not os.path.exists(self._table_path):
            fmt.atomic_write(self._table_path, fmt.table_header(), self.durable)
        if manifest.shards:
            if not os.path.exists(self._table_path):
                raise fmt.CorruptCacheError(f"{self._table_path}: missing ({manifest.shards} shards are counted)")
            with open(self._table_path, "rb") as handle:
                fmt.check_table(handle.fileno(), self._table_path, manifest.shards)
                offset = fmt.TABLE_HEADER.size + (manifest.shards - 1) * fmt.RECORD_DTYPE.itemsize
                last = np.frombuffer(os.pread(handle.fileno(), fmt.RECORD_DTYPE.itemsize, offset), fmt.RECORD_DTYPE)[0]
            record = fmt.check_record(last, manifest.shards - 1, self._table_path)
            if record["first"] + record["sequences"] != manifest.sequences:
                raise fmt.CorruptCacheError(f"{self._table_path}: the last record disagrees with {fmt.MANIFEST}")
        self._committed = manifest

    def _remove_orphans(self) -> None:
        """Removes in-flight ``.tmp`` shards and shard files the manifest does not count."""
        for name in os.listdir(self.path):
            shard = fmt.SHARD_NAME.match(name)
            if fmt.TMP_NAME.match(name) or (shard and int(shard.group(1)) >= self._committed.shards):
                os.remove(os.path.join(self.path, name))

    def _truncate_table(self) -> None:
        """Drops shard table records past the committed count (left by a crash before the manifest update)."""
        size = fmt.TABLE_HEADER.size + self._committed.shards * fmt.RECORD_DTYPE.itemsize
        if os.path.getsize(self._table_path) > size:
            with open(self._table_path, "r+b") as handle:
                handle.truncate(size)
                if self.durable:
                    os.fsync(handle.fileno())

    def _write_manifest(self) -> None:
        fmt.atomic_write(os.path.join(self.path, fmt.MANIFEST), self._committed.to_bytes(), self.durable)

    @property
    def num_committed(self) -> int:
        """Sequences in committed shards (what a reader sees)."""
        return self._committed.sequences

    def __len__(self) -> int:
        """Sequences added so far: committed ones plus those in the shard in flight. Right after
        ``resume=True`` this is the number of committed sequences, i.e. where to continue."""
        return self.num_committed + (len(self._pending["index"]) if self._pending else 0)

    # -------------------------------------------------------------------------------- adding

    def _check_sequence(self, tokens, ids, values):
        tokens = as_array(tokens, "tokens", "int")
        ids = as_array(ids, "ids", "int")
        values = as_array(values, "values", "float")
        if tokens.ndim != 1 or tokens.shape[0] == 0:
            raise ValueError(f"tokens must be [T] with T >= 1, got shape {tokens.shape}")
        length = tokens.shape[0]
        if ids.ndim != 2 or ids.shape[1] != self.k or ids.shape[0] not in (length, length - 1):
            raise ValueError(f"ids must be [T, k] or [T - 1, k] with T = {length} (from tokens) and k = {self.k}: "
                             f"row t is the teacher's distribution of the token after tokens[t]; got shape {ids.shape}")
        if values.shape != ids.shape:
            raise ValueError(f"values must have the shape of ids {ids.shape}, got {values.shape}")
        for name, array in (("tokens", tokens), ("ids", ids)):
            if array.size and (array.min() < 0 or array.max() >= self.vocab_size):
                raise ValueError(f"{name} must lie in [0, vocab_size) with vocab_size = {self.vocab_size}, "
                                 f"got min {array.min()}, max {array.max()}")
        self._check_values(values)
        return tokens.astype(np.int64), ids.astype(np.int64), values.astype(np.float32)

    def _check_values(self, values: np.ndarray) -> None:
        if np.isnan(values).any() or np.isposinf(values).any():
            raise ValueError("values must not hold NaN or +inf (-inf marks a slot with zero probability)")
        finite = values[np.isfinite(values)]
        if self.values == "logprobs" and finite.size and finite.max() > LOGPROB_SLACK:
            raise ValueError(f"values='logprobs' must be <= 0, got a maximum of {finite.max()}")
        if self.encoding.values == "float16" and finite.size and np.abs(finite).max() > fmt.FP16_MAX:
            raise ValueError(f"values beyond the float16 range (|v| <= {fmt.FP16_MAX}): got {np.abs(finite).max()}; "
                             "use values_format='float32' or a quantised format")

    def add(self, tokens, ids, values, *, temperature: float | None = None) -> int:
        """Appends one sequence; returns its index in the cache.

        Args:
            tokens: ``[T]`` integer token ids (a tensor, array or list), ``0 <= t < vocab_size``.
            ids: ``[T, k]`` or ``[T - 1, k]`` integer teacher ids; row ``t`` holds the teacher's
                distribution of the token that follows ``tokens[t]`` (the teacher's logits at
                position t). ``T - 1`` rows omit the last position, which has no next token.
            values: float ``[R, k]`` like ``ids``: log-probs or logits as declared by ``values=``;
                ``-inf`` marks a slot with zero probability (its id is then not used).
            temperature: optional check: the generation temperature of these values, which must
                equal the writer's ``temperature``.

        Raises:
            ValueError: on mismatched shapes, out-of-range ids or tokens, NaN / +inf values,
                log-probs > 0, or a different temperature.
        """
        if self._closed:
            raise ValueError("this TopKCacheWriter is closed")
        if temperature is not None and _check_temperature(temperature) != self.temperature:
            raise ValueError(f"these values were generated at temperature {temperature}, the cache stores "
                             f"temperature {self.temperature}")
        tokens, ids, values = self._check_sequence(tokens, ids, values)
        block = fmt.encode_block(self.encoding, tokens, ids, values)
        pending = self._pending or self._open_shard()
        offset = pending["offset"]
        pending["file"].write(block)
        pending["hash"].update(block)
        pending["offset"] += len(block)
        pending["index"].append((offset, tokens.shape[0], ids.shape[0], fmt.crc32(block), 0))
        pending["tokens"] += tokens.shape[0]
        pending["rows"] += ids.shape[0]
        number = len(self) - 1
        if pending["tokens"] >= self.shard_tokens:
            self.flush()
        return number

    def _open_shard(self) -> dict:
        number = self._committed.shards
        name = fmt.shard_name(number)
        handle = open(os.path.join(self.path, name + ".tmp"), "wb")
        header = fmt.shard_header(number, self.encoding, self.k)
        handle.write(header)
        digest = hashlib.blake2b(digest_size=16)
        digest.update(header)
        self._pending = {"name": name, "file": handle, "hash": digest, "header": header, "offset": len(header),
                         "index": [], "tokens": 0, "rows": 0}
        return self._pending

    def flush(self) -> None:
        """Commits the shard in flight now (write index and footer, fsync, rename, update the manifest)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        index = np.array(pending["index"], dtype=fmt.INDEX_DTYPE).tobytes()
        tail = index + fmt.shard_footer(pending["offset"], len(pending["index"]),
                                        fmt.crc32(pending["header"] + index))
        handle = pending["file"]
        try:
            handle.write(tail)
            pending["hash"].update(tail)
            handle.flush()
            if self.durable:
                os.fsync(handle.fileno())
        finally:
            handle.close()
        final = os.path.join(self.path, pending["name"])
        os.replace(final + ".tmp", final)
        if self.durable:
            fmt.fsync_dir(self.path)
        done = self._committed
        size, count = pending["offset"] + len(tail), len(pending["index"])
        record = fmt.make_record(done.sequences, count, pending["tokens"], pending["rows"], size, done.shards,
                                 pending["hash"].digest())
        with open(self._table_path, "r+b") as table:
            table.seek(fmt.TABLE_HEADER.size + done.shards * fmt.RECORD_DTYPE.itemsize)
            table.write(record)
            table.truncate()
            table.flush()
            if self.durable:
                os.fsync(table.fileno())
        self._committed = fmt.Manifest(self.metadata, self.encoding, done.shards + 1, done.sequences + count,
                                       done.tokens + pending["tokens"], done.rows + pending["rows"], done.bytes + size)
        self._write_manifest()

    def close(self) -> None:
        """Commits the shard in flight; the writer cannot be used afterwards."""
        if not self._closed:
            self._closed = True
            self.flush()

    def __enter__(self) -> TopKCacheWriter:
        return self

    def __exit__(self, *exc) -> None:
        # sequences added before an exception are complete and valid: commit them too
        self.close()

    def __repr__(self) -> str:
        return (f"TopKCacheWriter({self.path!r}, vocab_size={self.vocab_size}, k={self.k}, values={self.values!r}, "
                f"sequences={len(self)}, committed={self.num_committed})")
