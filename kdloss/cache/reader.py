"""``TopKCache``: read-only, memory-mapped random access to a top-k teacher cache."""

from __future__ import annotations

import bisect
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
    """

    tokens: torch.Tensor
    ids: torch.Tensor
    values: torch.Tensor
    index: int


class _Shard:
    """An open shard: its mmap and validated index (per process)."""

    def __init__(self, path: str, entry: dict) -> None:
        self.path = path
        fd = os.open(path, os.O_RDONLY)
        try:
            self.index, self.data_end = fmt.read_shard_index(fd, path, int(entry["bytes"]), int(entry["sequences"]))
            self.map = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)

    def close(self) -> None:
        self.map.close()


class TopKCache:
    """A top-k teacher cache opened read-only (a map-style ``torch.utils.data.Dataset``).

    Opening reads only ``manifest.json``: shards are memory-mapped lazily on first access, in
    each process separately (after a ``fork`` the child re-opens them; a ``spawn``-ed worker
    receives only the path), so the object is safe to hand to ``DataLoader`` workers.
    Every access checks the sequence's CRC-32, and the first access to a shard checks its size
    and index checksum: damage raises :class:`~kdloss.cache.CorruptCacheError` naming the file.

    Args:
        path: cache directory written by :class:`~kdloss.cache.TopKCacheWriter`.
        ids_dtype: dtype of ``seq.ids``: ``"int64"`` (default), ``"int32"``, or ``"storage"``
            (the stored integer dtype as a numpy-compatible tensor: uint16 when the cache stores
            uint16, int64 when bit-packed; torch supports few operations on uint16).
        check_crc: verify each sequence's CRC-32 on read (default True; costs a pass over the bytes).

    Example::

        cache = TopKCache("cache/")
        seq = cache[0]                      # tokens [T], ids [R, k], values [R, k]
        loss = kdloss.topk_kl_loss(logits[: len(seq.ids)], seq.ids, seq.values, **cache.loss_kwargs())
    """

    def __init__(self, path, *, ids_dtype: str = "int64", check_crc: bool = True) -> None:
        self.path = os.fspath(path)
        if ids_dtype not in _IDS_DTYPES:
            raise ValueError(f"ids_dtype must be one of {tuple(_IDS_DTYPES)}, got {ids_dtype!r}")
        if not isinstance(check_crc, bool):
            raise TypeError(f"check_crc must be a bool, got {check_crc!r}")
        self.ids_dtype, self.check_crc = ids_dtype, check_crc
        self._metadata, self.encoding, self._entries = fmt.read_manifest(self.path)
        self.k = int(self._metadata["k"])
        self.vocab_size = int(self._metadata["vocab_size"])
        counts = np.array([int(entry["sequences"]) for entry in self._entries], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
        self._open: dict[int, _Shard] = {}
        self._pid = os.getpid()

    # ------------------------------------------------------------------------------ metadata

    @property
    def metadata(self) -> dict:
        """The cache's metadata: ``vocab_size``, ``k``, ``values``, ``temperature``, ``kind``, the
        user's own keys, and ``encoding`` (how ids and values are stored)."""
        return {**self._metadata, "encoding": self.encoding.to_json()}

    @property
    def num_tokens(self) -> int:
        """Total tokens over all sequences."""
        return sum(int(entry["tokens"]) for entry in self._entries)

    @property
    def num_bytes(self) -> int:
        """Total size of the shard files."""
        return sum(int(entry["bytes"]) for entry in self._entries)

    @property
    def shards(self) -> list[dict]:
        """The manifest's shard records (file, sequences, tokens, rows, bytes, blake2b)."""
        return [dict(entry) for entry in self._entries]

    def loss_kwargs(self) -> dict:
        """Keyword arguments for :func:`kdloss.functional.topk_kl_loss` that follow from how the
        values were stored: ``values``, ``teacher_temperature`` and, for RS-KD sampled targets,
        ``tail="none"``."""
        kwargs = {"values": self._metadata["values"], "teacher_temperature": float(self._metadata["temperature"])}
        if self._metadata.get("kind") == "sampled":
            kwargs["tail"] = "none"
        return kwargs

    def __len__(self) -> int:
        return self._starts[-1]

    def __repr__(self) -> str:
        return (f"TopKCache({self.path!r}, sequences={len(self)}, vocab_size={self.vocab_size}, k={self.k}, "
                f"values={self._metadata['values']!r})")

    # ------------------------------------------------------------------------------ access

    def _shard(self, number: int) -> _Shard:
        if os.getpid() != self._pid:  # forked: do not share mmaps with the parent
            self._open, self._pid = {}, os.getpid()
        shard = self._open.get(number)
        if shard is None:
            shard = _Shard(os.path.join(self.path, self._entries[number]["file"]), self._entries[number])
            self._open[number] = shard
        return shard

    def _locate(self, index) -> tuple[int, int]:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"cache indices must be ints, got {type(index).__name__}")
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"sequence index out of range for a cache of {len(self)} sequences")
        shard = bisect.bisect_right(self._starts, index) - 1
        return shard, index - self._starts[shard]

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
        """Unmaps every open shard (the cache re-opens them on the next access)."""
        for shard in self._open.values():
            shard.close()
        self._open = {}

    def __getstate__(self) -> dict:
        # spawn-ed DataLoader workers get the path and options only; they open shards themselves
        state = dict(self.__dict__)
        state["_open"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()


def verify_cache(path) -> list[str]:
    """Checks every shard of the cache at ``path``: presence, size, BLAKE2b digest, header/index
    checksum and each sequence's CRC-32 and id range. Returns the problems found, each naming
    its file ("" list when the cache is intact). A missing or damaged manifest raises."""
    cache = TopKCache(path)
    problems = []
    for number, entry in enumerate(cache._entries):
        shard_path = os.path.join(cache.path, entry["file"])
        if not os.path.exists(shard_path):
            problems.append(f"{shard_path}: missing")
            continue
        try:
            digest = fmt.file_digest(shard_path)
            if digest != entry["blake2b"]:
                raise fmt.CorruptCacheError(f"{shard_path}: BLAKE2b digest {digest} differs from the manifest's "
                                            f"{entry['blake2b']} (damaged or replaced shard)")
            first = cache._starts[number]
            for index in range(first, first + int(entry["sequences"])):
                _, ids, _ = cache.read(index)
                if ids.size and int(ids.max()) >= cache.vocab_size:
                    raise fmt.CorruptCacheError(f"{shard_path}: sequence {index} holds id {int(ids.max())} >= "
                                                f"vocab_size {cache.vocab_size}")
        except fmt.CorruptCacheError as error:
            problems.append(str(error))
    cache.close()
    return problems
