"""``TopKCache``: read-only, memory-mapped random access to a top-k teacher cache."""

from __future__ import annotations

import mmap
import os
from typing import NamedTuple

import numpy as np
import torch

from . import _format as fmt

__all__ = ["TopKCache", "CachedSequence"]

_IDS_DTYPES = {"int64": torch.int64, "int32": torch.int32, "storage": None}


class CachedSequence(NamedTuple):
    """One cached sequence.

    Attributes:
        tokens: ``[T]`` int64 token ids.
        ids: ``[R, k]`` teacher ids (int64 by default, see ``TopKCache(ids_dtype=...)``), with
            ``R = T`` or ``R = T - 1``: row t is the teacher's distribution of the token after
            ``tokens[t]``, i.e. it lines up with a causal LM's logits at position t.
        values: ``[R, k]`` float32 log-probs or logits (``cache.metadata["values"]``); ``-inf``
            marks a slot with zero probability.
        index: position of the sequence in the cache.

    Example::

        tokens, ids, values, index = TopKCache("cache/")[0]
    """

    tokens: torch.Tensor
    ids: torch.Tensor
    values: torch.Tensor
    index: int


class _Shard:
    """An open shard: its mmap and validated index (per process)."""

    def __init__(self, path: str, entry: dict) -> None:
        self.path = path
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise fmt.CorruptCacheError(f"{path}: missing (the manifest lists it)") from None
        try:
            self.index, self.data_end = fmt.read_shard_index(fd, path, int(entry["bytes"]), int(entry["sequences"]))
            self.map = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)

    def close(self) -> None:
        self.map.close()


class TopKCache:
    """A top-k teacher cache opened read-only (a map-style ``torch.utils.data.Dataset``).

    Opening reads only ``manifest.json`` (O(1) whatever the number of shards). The shard table
    and the shards are memory-mapped lazily on first access, in each process separately (after
    a ``fork`` the child re-opens them; a ``spawn``-ed worker receives only the path and
    options), so the object is safe to hand to ``DataLoader`` workers. Every access checks the
    sequence's CRC-32; the first access to a shard checks its table record, size and index
    checksum: damage raises :class:`~kdloss.cache.CorruptCacheError` naming the file. A cache
    being written shows the sequences committed when it was opened.

    Args:
        path: cache directory written by :class:`~kdloss.cache.TopKCacheWriter`.
        ids_dtype: dtype of ``seq.ids``: ``"int64"`` (default), ``"int32"``, or ``"storage"``
            (the stored integer dtype: uint16 when the cache stores uint16, int64 when
            bit-packed, uint32 otherwise; torch supports few operations on uint16/uint32).
        check_crc: verify each sequence's CRC-32 on read (default True; costs a pass over the bytes).

    Returns:
        ``cache[i]``: a :class:`CachedSequence`; ``len(cache)``: the number of sequences.

    Example::

        cache = TopKCache("cache/")
        seq = cache[0]                      # tokens [T], ids [R, k], values [R, k]
        loss = kdloss.functional.topk_kl_loss(logits[: len(seq.ids)], seq.ids, seq.values, **cache.loss_kwargs())
    """

    def __init__(self, path, *, ids_dtype: str = "int64", check_crc: bool = True) -> None:
        self.path = os.fspath(path)
        if ids_dtype not in _IDS_DTYPES:
            raise ValueError(f"ids_dtype must be one of {tuple(_IDS_DTYPES)}, got {ids_dtype!r}")
        if not isinstance(check_crc, bool):
            raise TypeError(f"check_crc must be a bool, got {check_crc!r}")
        self.ids_dtype, self.check_crc = ids_dtype, check_crc
        self._manifest = fmt.read_manifest(self.path)
        self.encoding = self._manifest.encoding
        self.k = int(self._manifest.metadata["k"])
        self.vocab_size = int(self._manifest.metadata["vocab_size"])
        self._table_path = os.path.join(self.path, fmt.TABLE)
        self._reset()

    def _reset(self) -> None:
        self._table = None  # (mmap, records) of the shard table, opened on first access
        self._open: dict[int, _Shard] = {}
        self._records: dict[int, dict] = {}
        self._pid = os.getpid()

    # ------------------------------------------------------------------------------ metadata

    @property
    def metadata(self) -> dict:
        """The cache's metadata: ``vocab_size``, ``k``, ``values``, ``temperature``, ``kind``, the
        user's own keys, and ``encoding`` (how ids and values are stored)."""
        return {**self._manifest.metadata, "encoding": self.encoding.to_json()}

    @property
    def num_tokens(self) -> int:
        """Total tokens over all sequences."""
        return self._manifest.tokens

    @property
    def num_rows(self) -> int:
        """Total teacher rows (positions with stored targets)."""
        return self._manifest.rows

    @property
    def num_bytes(self) -> int:
        """Total size of the shard files."""
        return self._manifest.bytes

    @property
    def num_shards(self) -> int:
        """Number of committed shards."""
        return self._manifest.shards

    @property
    def shards(self) -> list[dict]:
        """Every shard's record (file, first sequence, sequences, tokens, rows, bytes, blake2b);
        reads the whole shard table."""
        return [self._record(number) for number in range(self.num_shards)]

    def loss_kwargs(self) -> dict:
        """Keyword arguments for :func:`kdloss.functional.topk_kl_loss` that follow from how the
        values were stored: ``values``, ``teacher_temperature`` and, for RS-KD sampled targets,
        ``tail="none"``."""
        metadata = self._manifest.metadata
        kwargs = {"values": metadata["values"], "teacher_temperature": float(metadata["temperature"])}
        if metadata.get("kind") == "sampled":
            kwargs["tail"] = "none"
        return kwargs

    def __len__(self) -> int:
        return self._manifest.sequences

    def __repr__(self) -> str:
        return (f"TopKCache({self.path!r}, sequences={len(self)}, vocab_size={self.vocab_size}, k={self.k}, "
                f"values={self._manifest.metadata['values']!r})")

    # ------------------------------------------------------------------------------ access

    def _check_process(self) -> None:
        if os.getpid() != self._pid:  # forked: do not share mmaps with the parent
            self._reset()

    def _table_records(self) -> np.ndarray:
        self._check_process()
        if self._table is None:
            try:
                fd = os.open(self._table_path, os.O_RDONLY)
            except FileNotFoundError:
                raise fmt.CorruptCacheError(f"{self._table_path}: missing") from None
            try:
                fmt.check_table(fd, self._table_path, self.num_shards)
                table = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            finally:
                os.close(fd)
            records = np.frombuffer(table, dtype=fmt.RECORD_DTYPE, count=self.num_shards, offset=fmt.TABLE_HEADER.size)
            self._table = (table, records)
        return self._table[1]

    def _record(self, number: int) -> dict:
        record = self._records.get(number)
        if record is None:
            record = fmt.check_record(self._table_records()[number], number, self._table_path)
            self._records[number] = record
        return record

    def _shard(self, number: int) -> _Shard:
        self._check_process()
        shard = self._open.get(number)
        if shard is None:
            shard = _Shard(os.path.join(self.path, fmt.shard_name(number)), self._record(number))
            self._open[number] = shard
        return shard

    def _locate(self, index) -> tuple[int, int]:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"cache indices must be ints, got {type(index).__name__}")
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"sequence index {index} out of range for a cache of {len(self)} sequences")
        number = int(np.searchsorted(self._table_records()["first"], index, side="right")) - 1
        record = self._record(max(number, 0))
        local = index - record["first"]
        if not 0 <= local < record["sequences"]:
            raise fmt.CorruptCacheError(f"{self._table_path}: records out of order near shard {number}")
        return max(number, 0), local

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(tokens [T] int64, ids [R, k], values [R, k] float32)`` as numpy arrays, ids in the
        stored integer dtype (uint16/uint32, or int64 when bit-packed)."""
        number, local = self._locate(index)
        shard = self._shard(number)
        record = shard.index[local]
        tokens, rows = int(record["tokens"]), int(record["rows"])
        start = int(record["offset"])
        end = start + fmt.block_layout(self.encoding, tokens, rows, self.k).end
        if end > shard.data_end or rows not in (tokens, tokens - 1):
            raise fmt.CorruptCacheError(f"{shard.path}: index record {local} is inconsistent (damaged shard)")
        block = memoryview(shard.map)[start:end]
        try:
            if self.check_crc and fmt.crc32(block) != int(record["crc"]):
                raise fmt.CorruptCacheError(f"{shard.path}: checksum mismatch in sequence {local} "
                                            f"(cache index {int(index)}): the shard is damaged")
            tokens_, ids, values = fmt.decode_block(self.encoding, block, tokens, rows, self.k)
        finally:
            block.release()
        return tokens_, ids, values

    def __getitem__(self, index: int) -> CachedSequence:
        tokens, ids, values = self.read(index)
        wanted = _IDS_DTYPES[self.ids_dtype]
        ids_tensor = torch.from_numpy(ids) if wanted is None else torch.from_numpy(ids.astype(np.int64)).to(wanted)
        position = int(index) if int(index) >= 0 else int(index) + len(self)
        return CachedSequence(torch.from_numpy(tokens), ids_tensor, torch.from_numpy(values), position)

    def close(self) -> None:
        """Unmaps the shard table and every open shard (they are re-opened on the next access)."""
        for shard in self._open.values():
            shard.close()
        if self._table is not None:
            table, records = self._table
            del records
            self._table = None
            table.close()
        self._reset()

    def __getstate__(self) -> dict:
        # spawn-ed DataLoader workers get the path and options only; they open the files themselves
        state = dict(self.__dict__)
        state.update(_table=None, _open={}, _records={})
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()


def verify_cache(path) -> list[str]:
    """Checks every shard of the cache at ``path``: its table record, presence, size, BLAKE2b
    digest, header/index checksum and each sequence's CRC-32 and id range. Returns the problems
    found, each naming its file (an empty list when the cache is intact). A missing or damaged
    manifest raises :class:`~kdloss.cache.CorruptCacheError` (or ``FileNotFoundError``).

    Args:
        path: the cache directory.

    Returns:
        A list of messages, one per damaged shard (``python -m kdloss.cache verify`` prints them).

    Example::

        for problem in verify_cache("cache/"):
            print(problem)
    """
    cache = TopKCache(path)
    problems = []
    expected_first = 0
    for number in range(cache.num_shards):
        shard_path = os.path.join(cache.path, fmt.shard_name(number))
        try:
            record = cache._record(number)
            if record["first"] != expected_first:
                raise fmt.CorruptCacheError(f"{cache._table_path}: record {number} starts at sequence "
                                            f"{record['first']}, expected {expected_first}")
            expected_first += record["sequences"]
            if not os.path.exists(shard_path):
                raise fmt.CorruptCacheError(f"{shard_path}: missing")
            digest = fmt.file_digest(shard_path)
            if digest != record["blake2b"]:
                raise fmt.CorruptCacheError(f"{shard_path}: BLAKE2b digest {digest} differs from the recorded "
                                            f"{record['blake2b']} (damaged or replaced shard)")
            for index in range(record["first"], record["first"] + record["sequences"]):
                _, ids, _ = cache.read(index)
                if ids.size and int(ids.max()) >= cache.vocab_size:
                    raise fmt.CorruptCacheError(f"{shard_path}: sequence {index} holds id {int(ids.max())} >= "
                                                f"vocab_size {cache.vocab_size}")
        except fmt.CorruptCacheError as error:
            problems.append(str(error))
    if not problems and expected_first != len(cache):
        problems.append(f"{os.path.join(cache.path, fmt.MANIFEST)}: counts {len(cache)} sequences, the shards hold "
                        f"{expected_first}")
    cache.close()
    return problems
