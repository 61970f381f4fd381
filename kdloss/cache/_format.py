"""On-disk format of a kdloss top-k teacher cache: manifest, shard files, sequence blocks, codecs.

A cache is a directory::

    manifest.json          the committed state: metadata, encoding, shard count and totals (+ CRC-32)
    shards.bin             the shard table: one fixed-size record per shard (first sequence, counts,
                           size, BLAKE2b digest, CRC-32 of the record); records past the manifest's
                           count are not committed
    shard-000000.kdc       committed shards (immutable once counted by the manifest)
    shard-000001.kdc.tmp   at most one shard in flight (never read; removed on resume)

Opening reads the small manifest only (O(1) in the number of shards); the shard table is
memory-mapped and binary-searched, a record's CRC checked when its shard is first used.

A shard file is ``header | sequence blocks | index | footer`` (little-endian throughout):

* header: 8-byte magic, ``u64`` JSON length, the JSON (shard number and encoding), zero padding
  to a multiple of 8 bytes;
* one block per sequence, starting at a multiple of 8: tokens, ids, (row maxima for quantised
  values), values — each part padded to a multiple of 4 bytes, the block to a multiple of 8;
* index: one ``INDEX_DTYPE`` record per sequence (block offset, T, R, CRC-32 of the block);
* footer (32 bytes): magic, ``u64`` index offset, ``u64`` sequence count, ``u32`` CRC-32 of the
  header and the index, ``u32`` zero.

No pickle and no code is ever read back: JSON and raw little-endian numbers only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import zlib
from dataclasses import dataclass

import numpy as np

FORMAT_NAME = "kdloss-topk-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TABLE = "shards.bin"
TABLE_MAGIC = b"KDSHARDS"
TABLE_HEADER = struct.Struct("<8sII")  # magic, version, record size
#: One shard table record (64 bytes); ``crc`` covers every other field.
RECORD_DTYPE = np.dtype([("first", "<u8"), ("sequences", "<u8"), ("tokens", "<u8"), ("rows", "<u8"),
                         ("bytes", "<u8"), ("number", "<u4"), ("crc", "<u4"), ("blake2b", "V16")])
SHARD_MAGIC = b"KDTOPK\x01\x00"
FOOTER_MAGIC = b"KDTOPKIX"
FOOTER = struct.Struct("<8sQQII")
HEADER_PREFIX = struct.Struct("<8sQ")
INDEX_DTYPE = np.dtype([("offset", "<u8"), ("tokens", "<u4"), ("rows", "<u4"), ("crc", "<u4"), ("zero", "<u4")])
SHARD_NAME = re.compile(r"^shard-(\d{6,})\.kdc$")
TMP_NAME = re.compile(r"^shard-(\d{6,})\.kdc\.tmp$")

VALUE_KINDS = ("logprobs", "logits")
TARGET_KINDS = ("topk", "sampled")
FLOAT_FORMATS = {"float32": 4, "float16": 2, "bfloat16": 2}
RESERVED_KEYS = ("vocab_size", "k", "values", "temperature", "kind", "format", "format_version", "encoding")
#: fp16 finite range: values beyond it are rejected rather than stored as inf.
FP16_MAX = 65504.0


class CorruptCacheError(ValueError):
    """A cache file is damaged: truncated, altered or not a kdloss cache. The message names the file.

    Example::

        try:
            seq = cache[i]
        except CorruptCacheError as error:   # e.g. "…/shard-000003.kdc: checksum mismatch in sequence 17 …"
            print(error)
    """


def shard_name(number: int) -> str:
    """File name of shard ``number``."""
    return f"shard-{number:06d}.kdc"


def bits_for(vocab_size: int) -> int:
    """Bits needed to hold every id in ``[0, vocab_size)`` (at least 1)."""
    return max(1, (vocab_size - 1).bit_length())


# ----------------------------------------------------------------------------------------------
# encoding: how tokens, ids and values are stored


@dataclass(frozen=True)
class Encoding:
    """How one cache stores its numbers.

    ``tokens``: ``"uint16"``/``"uint32"``; ``ids``: ``"uint16"``, ``"uint32"`` or ``"packed"``
    (``id_bits`` bits per id, LSB-first bit stream); ``values``: ``"float32"``, ``"float16"``,
    ``"bfloat16"`` or ``"quantized"`` (``value_bits`` bits per value: the distance below the
    row's maximum on a uniform grid of ``value_span / (2**value_bits - 2)`` nats, the top code
    meaning ``-inf``; the row maximum is stored as float32).
    """

    tokens: str
    ids: str
    id_bits: int
    values: str
    value_bits: int = 0
    value_span: float = 0.0

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "ids": self.ids, "id_bits": self.id_bits, "values": self.values,
                "value_bits": self.value_bits, "value_span": self.value_span}

    @classmethod
    def from_json(cls, data: dict, where: str) -> Encoding:
        try:
            encoding = cls(tokens=str(data["tokens"]), ids=str(data["ids"]), id_bits=int(data["id_bits"]),
                           values=str(data["values"]), value_bits=int(data.get("value_bits", 0)),
                           value_span=float(data.get("value_span", 0.0)))
        except (KeyError, TypeError, ValueError) as error:
            raise CorruptCacheError(f"{where}: invalid encoding {data!r} ({error})") from None
        encoding.check(where)
        return encoding

    def check(self, where: str) -> None:
        ok = (self.tokens in ("uint16", "uint32") and self.ids in ("uint16", "uint32", "packed")
              and 1 <= self.id_bits <= 32 and (self.values in FLOAT_FORMATS or self.values == "quantized"))
        if ok and self.values == "quantized":
            ok = 2 <= self.value_bits <= 24 and math.isfinite(self.value_span) and self.value_span > 0
        if not ok:
            raise CorruptCacheError(f"{where}: unsupported encoding {self.to_json()!r}")

    def step(self) -> float:
        """Grid step of quantised values (nats)."""
        return self.value_span / float((1 << self.value_bits) - 2)


def choose_encoding(vocab_size: int, ids_format: str, values_format: str, value_span: float) -> Encoding:
    """The encoding for a new cache (see :class:`~kdloss.cache.TopKCacheWriter`)."""
    tokens = "uint16" if vocab_size <= 1 << 16 else "uint32"
    if ids_format == "auto":
        ids_format = "uint16" if vocab_size <= 1 << 16 else "packed"
    if ids_format == "uint16" and vocab_size > 1 << 16:
        raise ValueError(f"ids_format='uint16' holds vocab_size <= 65536, got vocab_size={vocab_size}")
    if values_format == "auto":
        # 2 + 2 bytes per slot with uint16 ids; beside bit-packed ids, 13-bit values keep a slot near 4 bytes
        values_format = "float16" if ids_format == "uint16" else "q13"
    match = re.fullmatch(r"q(\d+)", values_format)
    if match:
        bits = int(match.group(1))
        if not 2 <= bits <= 24:
            raise ValueError(f"values_format 'q<bits>' needs 2 <= bits <= 24, got {values_format!r}")
        if not (isinstance(value_span, (int, float)) and math.isfinite(value_span) and value_span > 0):
            raise ValueError(f"value_span must be a finite number > 0, got {value_span!r}")
        return Encoding(tokens, ids_format, bits_for(vocab_size), "quantized", bits, float(value_span))
    if values_format not in FLOAT_FORMATS:
        raise ValueError(f"values_format must be 'auto', 'float32', 'float16', 'bfloat16' or 'q<bits>'; "
                         f"got {values_format!r}")
    return Encoding(tokens, ids_format, bits_for(vocab_size), values_format)


# ----------------------------------------------------------------------------------------------
# bit packing (LSB-first: value i occupies bits [i*b, (i+1)*b) of the little-endian stream)


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Packs non-negative integers ``< 2**bits`` into ``ceil(n * bits / 8)`` bytes."""
    flat = values.reshape(-1).astype(np.uint64)
    planes = ((flat[:, None] >> np.arange(bits, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_bits(buffer, count: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` integers as int64."""
    raw = np.frombuffer(buffer, dtype=np.uint8)
    padded = np.zeros(raw.size + 8, dtype=np.uint8)
    padded[: raw.size] = raw
    start = np.arange(count, dtype=np.int64) * bits
    byte, shift = start >> 3, (start & 7).astype(np.uint64)
    word = np.zeros(count, dtype=np.uint64)
    for j in range((bits + 7 + 7) // 8):  # bytes spanned by a field that starts mid-byte
        word |= padded[byte + j].astype(np.uint64) << np.uint64(8 * j)
    return ((word >> shift) & np.uint64((1 << bits) - 1)).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# sequence blocks


def _pad(size: int, to: int) -> int:
    return (size + to - 1) // to * to


@dataclass(frozen=True)
class BlockLayout:
    """Byte offsets of the parts of one sequence block, relative to its start."""

    ids: int
    maxima: int
    values: int
    end: int


def block_layout(encoding: Encoding, tokens: int, rows: int, k: int) -> BlockLayout:
    """Where tokens (at 0), ids, row maxima and values of a (T, R) sequence lie; ``end`` is the
    block size."""
    slots = rows * k
    ids_at = _pad(tokens * (2 if encoding.tokens == "uint16" else 4), 4)
    if encoding.ids == "packed":
        ids_size = (slots * encoding.id_bits + 7) // 8
    else:
        ids_size = slots * (2 if encoding.ids == "uint16" else 4)
    maxima_at = _pad(ids_at + ids_size, 4)
    if encoding.values == "quantized":
        values_at = maxima_at + 4 * rows
        values_size = (slots * encoding.value_bits + 7) // 8
    else:
        values_at = maxima_at
        values_size = slots * FLOAT_FORMATS[encoding.values]
    return BlockLayout(ids_at, maxima_at, values_at, _pad(values_at + values_size, 8))


def _float_bytes(values: np.ndarray, fmt: str) -> bytes:
    if fmt == "float32":
        return values.astype("<f4").tobytes()
    if fmt == "float16":
        return values.astype("<f2").tobytes()
    bits = values.astype("<f4").view("<u4")
    # round to nearest even on the 16 dropped bits (inf and -inf are kept exactly; no NaN gets here)
    rounded = (bits.astype(np.uint64) + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype("<u2").tobytes()


def _float_values(buffer, fmt: str, count: int) -> np.ndarray:
    if fmt == "float32":
        return np.frombuffer(buffer, dtype="<f4", count=count).astype(np.float32)
    if fmt == "float16":
        return np.frombuffer(buffer, dtype="<f2", count=count).astype(np.float32)
    half = np.frombuffer(buffer, dtype="<u2", count=count).astype(np.uint32)
    return (half << 16).view(np.float32)


def quantize_rows(values: np.ndarray, encoding: Encoding) -> tuple[np.ndarray, np.ndarray]:
    """``(row maxima [R] float32, codes [R, k] int64)`` of the ``"quantized"`` values format."""
    finite = np.isfinite(values)
    maxima = np.where(finite, values, -np.inf).max(axis=1, initial=-np.inf).astype(np.float32)
    maxima[~np.isfinite(maxima)] = 0.0
    top = (1 << encoding.value_bits) - 1
    depth = (maxima[:, None].astype(np.float64) - values.astype(np.float64)) / encoding.step()
    codes = np.clip(np.rint(np.where(finite, depth, 0.0)), 0, top - 1).astype(np.int64)
    return maxima, np.where(finite, codes, top)


def dequantize_rows(maxima: np.ndarray, codes: np.ndarray, encoding: Encoding) -> np.ndarray:
    """Inverse of :func:`quantize_rows` (float32; the top code gives ``-inf``)."""
    top = (1 << encoding.value_bits) - 1
    values = maxima[:, None] - codes.astype(np.float32) * np.float32(encoding.step())
    return np.where(codes == top, np.float32(-np.inf), values).astype(np.float32)


def encode_block(encoding: Encoding, tokens: np.ndarray, ids: np.ndarray, values: np.ndarray) -> bytes:
    """One sequence block (validated inputs: tokens [T] int64, ids [R, k] int64, values [R, k] float32)."""
    rows, k = ids.shape
    layout = block_layout(encoding, tokens.shape[0], rows, k)
    out = bytearray(layout.end)
    token_bytes = tokens.astype("<u2" if encoding.tokens == "uint16" else "<u4").tobytes()
    out[: len(token_bytes)] = token_bytes
    if encoding.ids == "packed":
        id_bytes = pack_bits(ids, encoding.id_bits)
    else:
        id_bytes = ids.astype("<u2" if encoding.ids == "uint16" else "<u4").tobytes()
    out[layout.ids: layout.ids + len(id_bytes)] = id_bytes
    if encoding.values == "quantized":
        maxima, codes = quantize_rows(values, encoding)
        out[layout.maxima: layout.values] = maxima.astype("<f4").tobytes()
        value_bytes = pack_bits(codes, encoding.value_bits)
    else:
        value_bytes = _float_bytes(values, encoding.values)
    out[layout.values: layout.values + len(value_bytes)] = value_bytes
    return bytes(out)


def decode_block(encoding: Encoding, block, tokens: int, rows: int, k: int):
    """``(tokens [T] int64, ids [R, k] in the stored integer dtype (int64 when packed), values
    [R, k] float32)`` of one block (a buffer of exactly ``block_layout(...).end`` bytes)."""
    layout = block_layout(encoding, tokens, rows, k)
    view = memoryview(block)
    slots = rows * k
    token_dtype = "<u2" if encoding.tokens == "uint16" else "<u4"
    token_ids = np.frombuffer(view[: layout.ids], dtype=token_dtype, count=tokens).astype(np.int64)
    if encoding.ids == "packed":
        ids = unpack_bits(view[layout.ids: layout.maxima], slots, encoding.id_bits)
    else:
        id_dtype = "<u2" if encoding.ids == "uint16" else "<u4"
        ids = np.frombuffer(view[layout.ids: layout.maxima], dtype=id_dtype, count=slots).copy()
    if encoding.values == "quantized":
        maxima = np.frombuffer(view[layout.maxima: layout.values], dtype="<f4", count=rows).astype(np.float32)
        codes = unpack_bits(view[layout.values: layout.end], slots, encoding.value_bits)
        values = dequantize_rows(maxima, codes.reshape(rows, k), encoding)
    else:
        values = _float_values(view[layout.values: layout.end], encoding.values, slots)
    return token_ids, ids.reshape(rows, k), values.reshape(rows, k)


def crc32(buffer) -> int:
    """CRC-32 (zlib) of a buffer."""
    return zlib.crc32(buffer) & 0xFFFFFFFF


# ----------------------------------------------------------------------------------------------
# shard header / footer


def shard_header(number: int, encoding: Encoding, k: int) -> bytes:
    """The header bytes of shard ``number``."""
    text = json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION, "shard": number, "k": k,
                       "encoding": encoding.to_json()}, sort_keys=True).encode()
    raw = HEADER_PREFIX.pack(SHARD_MAGIC, len(text)) + text
    return raw + b"\0" * (_pad(len(raw), 8) - len(raw))


def shard_footer(index_offset: int, count: int, index_crc: int) -> bytes:
    """The 32-byte footer."""
    return FOOTER.pack(FOOTER_MAGIC, index_offset, count, index_crc, 0)


def read_shard_index(fd: int, path: str, expected_bytes: int, expected_sequences: int) -> tuple[np.ndarray, int]:
    """Validates a shard's size, header, footer and index CRC; returns ``(index records, index offset)``.

    Raises :class:`CorruptCacheError` naming ``path`` on any mismatch.
    """
    size = os.fstat(fd).st_size
    if size != expected_bytes:
        raise CorruptCacheError(f"{path}: {size} bytes on disk, the manifest records {expected_bytes} "
                                f"(truncated or replaced shard)")
    if size < HEADER_PREFIX.size + FOOTER.size:
        raise CorruptCacheError(f"{path}: too small to be a shard ({size} bytes)")
    magic, header_len = HEADER_PREFIX.unpack(os.pread(fd, HEADER_PREFIX.size, 0))
    footer_magic, index_offset, count, index_crc, _ = FOOTER.unpack(os.pread(fd, FOOTER.size, size - FOOTER.size))
    if magic != SHARD_MAGIC or footer_magic != FOOTER_MAGIC:
        raise CorruptCacheError(f"{path}: bad magic bytes (not a kdloss cache shard, or damaged)")
    header_end = _pad(HEADER_PREFIX.size + header_len, 8)
    index_bytes = count * INDEX_DTYPE.itemsize
    if header_end > index_offset or index_offset + index_bytes + FOOTER.size != size:
        raise CorruptCacheError(f"{path}: footer and file size disagree (damaged shard)")
    header = os.pread(fd, header_end, 0)
    raw_index = os.pread(fd, index_bytes, index_offset)
    if crc32(header + raw_index) != index_crc:
        raise CorruptCacheError(f"{path}: header/index checksum mismatch (damaged shard)")
    if count != expected_sequences:
        raise CorruptCacheError(f"{path}: holds {count} sequences, the manifest records {expected_sequences}")
    return np.frombuffer(raw_index, dtype=INDEX_DTYPE).copy(), index_offset


def file_digest(path: str, chunk: int = 1 << 22) -> str:
    """BLAKE2b (16-byte digest) of a file, hex."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while True:
            data = handle.read(chunk)
            if not data:
                return digest.hexdigest()
            digest.update(data)


# ----------------------------------------------------------------------------------------------
# durable writes and the manifest


def fsync_dir(path: str) -> None:
    """fsyncs a directory so that a rename inside it is durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes, durable: bool = True) -> None:
    """Writes ``data`` to ``path`` via a temporary file, fsync and rename (+ fsync of the directory)."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        if durable:
            os.fsync(handle.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(os.path.dirname(os.path.abspath(path)))


def record_crc(record: np.ndarray) -> int:
    """CRC-32 of a shard table record's fields other than ``crc``."""
    raw = record.tobytes()
    return crc32(raw[:44] + raw[48:])


def make_record(first: int, sequences: int, tokens: int, rows: int, size: int, number: int, digest: bytes) -> bytes:
    """The 64 bytes of one shard table record."""
    record = np.zeros(1, dtype=RECORD_DTYPE)
    record[0] = (first, sequences, tokens, rows, size, number, 0, digest)
    record["crc"] = record_crc(record[0])
    return record.tobytes()


def check_record(record, number: int, table_path: str) -> dict:
    """Validates record ``number`` (CRC and shard number); returns it as a dict."""
    if record_crc(record) != int(record["crc"]) or int(record["number"]) != number:
        raise CorruptCacheError(f"{table_path}: record {number} is damaged (checksum mismatch)")
    return {"file": shard_name(number), "first": int(record["first"]), "sequences": int(record["sequences"]),
            "tokens": int(record["tokens"]), "rows": int(record["rows"]), "bytes": int(record["bytes"]),
            "blake2b": bytes(record["blake2b"]).hex()}


def table_header() -> bytes:
    return TABLE_HEADER.pack(TABLE_MAGIC, FORMAT_VERSION, RECORD_DTYPE.itemsize)


def check_table(fd: int, path: str, count: int) -> None:
    """The shard table must start with its header and hold at least ``count`` records."""
    size = os.fstat(fd).st_size
    if size < TABLE_HEADER.size + count * RECORD_DTYPE.itemsize:
        raise CorruptCacheError(f"{path}: {size} bytes, too short for the {count} shards the manifest counts "
                                "(truncated shard table)")
    if os.pread(fd, TABLE_HEADER.size, 0) != table_header():
        raise CorruptCacheError(f"{path}: bad header (not a kdloss shard table, or damaged)")


@dataclass(frozen=True)
class Manifest:
    """The committed state: metadata, encoding, number of shards and totals."""

    metadata: dict
    encoding: Encoding
    shards: int
    sequences: int
    tokens: int
    rows: int
    bytes: int

    def to_bytes(self) -> bytes:
        """Serialised manifest: the content plus a CRC-32 of its canonical JSON."""
        body = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "metadata": self.metadata,
                "encoding": self.encoding.to_json(), "shards": self.shards, "sequences": self.sequences,
                "tokens": self.tokens, "rows": self.rows, "bytes": self.bytes}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        body["crc32"] = crc32(canonical)
        return (json.dumps(body, indent=1, sort_keys=True) + "\n").encode()


def read_manifest(directory: str) -> Manifest:
    """The manifest of the cache at ``directory``; :class:`CorruptCacheError` naming the file when it
    is unreadable or altered, ``FileNotFoundError`` when there is no cache."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no kdloss cache at {directory!r} (not a directory)")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no kdloss cache at {directory!r} ({MANIFEST} is missing)")
    try:
        with open(path, "rb") as handle:
            body = json.loads(handle.read().decode())
        stored = body.pop("crc32")
    except (ValueError, KeyError, AttributeError, TypeError, UnicodeDecodeError) as error:
        raise CorruptCacheError(f"{path}: not a valid kdloss manifest ({error})") from None
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    if crc32(canonical) != stored:
        raise CorruptCacheError(f"{path}: manifest checksum mismatch (altered or damaged)")
    if body.get("format") != FORMAT_NAME or body.get("format_version") != FORMAT_VERSION:
        raise CorruptCacheError(f"{path}: unsupported format {body.get('format')!r} "
                                f"version {body.get('format_version')!r}")
    try:
        counts = [int(body[key]) for key in ("shards", "sequences", "tokens", "rows", "bytes")]
        metadata = dict(body["metadata"])
        int(metadata["vocab_size"]), int(metadata["k"])
    except (KeyError, TypeError, ValueError) as error:
        raise CorruptCacheError(f"{path}: incomplete manifest ({error})") from None
    return Manifest(metadata, Encoding.from_json(body["encoding"], path), *counts)
