"""Tests of kdloss.cache: format round trips, durability (SIGKILL + resume), corruption, DataLoader
workers (fork and spawn), the collator's shift convention, the vocabulary policy, DistillKit
decoding and conversion, the vLLM helper, the CLI (build with a tiny random GPT-2) and the example."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import kdloss
from kdloss.cache import (
    CorruptCacheError,
    DistillKitQuantization,
    TopKCache,
    TopKCacheWriter,
    TopKCollator,
    apply_vocab_policy,
    convert_distillkit,
    from_vllm_prompt_logprobs,
    verify_cache,
)
from kdloss.cache.__main__ import main as cli
from kdloss.cache._format import shard_header
from kdloss.cache.distillkit import decode_distillkit_indices, decode_distillkit_logprobs
from kdloss.sparse import topk_teacher

ROOT = Path(__file__).resolve().parents[1]


def make_sequence(rng: np.random.Generator, vocab: int, k: int, rows_full: bool = True, length=None):
    """tokens [T], ids [R, k] (unique per row, sorted by log-prob), log-probs [R, k] float32."""
    length = int(rng.integers(2, 40)) if length is None else length
    tokens = rng.integers(0, vocab, length)
    rows = length if rows_full else length - 1
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(rows)]).reshape(rows, k)
    logprobs = -np.sort(rng.exponential(3.0, (rows, k)), axis=1) - rng.random((rows, 1))
    return tokens, ids, logprobs.astype(np.float32)


def write_cache(path, sequences, vocab, k, **kwargs):
    with TopKCacheWriter(path, vocab_size=vocab, k=k, durable=False, **kwargs) as writer:
        for tokens, ids, values in sequences:
            writer.add(tokens, ids, values)
    return TopKCache(path)


def bf16_round(values: np.ndarray) -> np.ndarray:
    return torch.from_numpy(values).bfloat16().float().numpy()


# ---------------------------------------------------------------------------------------------- format


@pytest.mark.parametrize("values_format", ["float32", "float16", "bfloat16", "q13"])
@pytest.mark.parametrize("vocab,ids_format", [(1000, "auto"), (70000, "auto"), (1000, "uint32"), (300, "packed")])
def test_round_trip(tmp_path, values_format, vocab, ids_format):
    rng = np.random.default_rng(0)
    k = 8
    sequences = [make_sequence(rng, vocab, k, rows_full=bool(i % 2)) for i in range(9)]
    sequences[3][2][1, 2:] = -np.inf  # zero-probability slots survive every format
    cache = write_cache(tmp_path / "c", sequences, vocab, k, shard_tokens=60, values_format=values_format,
                        ids_format=ids_format)
    assert len(cache) == 9 and len(cache.shards) > 1
    expected_ids = {"auto": "uint16" if vocab <= 65536 else "packed"}.get(ids_format, ids_format)
    assert cache.encoding.ids == expected_ids
    for i, (tokens, ids, values) in enumerate(sequences):
        seq = cache[i]
        assert seq.index == i and seq.tokens.dtype == torch.int64 and seq.ids.dtype == torch.int64
        np.testing.assert_array_equal(seq.tokens.numpy(), tokens)
        np.testing.assert_array_equal(seq.ids.numpy(), ids)
        stored = seq.values.numpy()
        if values_format == "float32":
            np.testing.assert_array_equal(stored, values)
        elif values_format == "float16":
            np.testing.assert_array_equal(stored, values.astype(np.float16).astype(np.float32))
        elif values_format == "bfloat16":
            np.testing.assert_array_equal(stored, bf16_round(values))
        else:
            step = 40.0 / (2 ** 13 - 2)
            finite = np.isfinite(values)
            np.testing.assert_array_equal(np.isfinite(stored), finite)
            assert np.abs(stored[finite] - values[finite]).max() <= step / 2 + 1e-5
    assert verify_cache(tmp_path / "c") == []
    np.testing.assert_array_equal(cache[-1].tokens.numpy(), sequences[-1][0])


def test_metadata_loss_kwargs_and_compact_sizes(tmp_path):
    rng = np.random.default_rng(1)
    tokens, ids, values = make_sequence(rng, 500, 4, length=10)
    cache = write_cache(tmp_path / "c", [(tokens, ids, values)], 500, 4, temperature=2.0,
                        metadata={"teacher": "tiny", "tags": [1, 2]})
    meta = cache.metadata
    assert (meta["vocab_size"], meta["k"], meta["values"], meta["temperature"], meta["kind"]) == (500, 4, "logprobs",
                                                                                                  2.0, "topk")
    assert meta["teacher"] == "tiny" and meta["tags"] == [1, 2]
    assert cache.loss_kwargs() == {"values": "logprobs", "teacher_temperature": 2.0}
    sampled = write_cache(tmp_path / "s", [(tokens, ids, values)], 500, 4, kind="sampled")
    assert sampled.loss_kwargs()["tail"] == "none"
    # uint16 tokens (2 B) + uint16 ids (2 B/slot) + fp16 values (2 B/slot), 8-byte aligned blocks
    assert cache.encoding.ids == "uint16" and cache.encoding.tokens == "uint16"
    header = len(shard_header(0, cache.encoding, 4))
    block = 20 + 10 * 4 * 2 + 10 * 4 * 2 + 4  # tokens, ids, values, padding to 8 bytes
    assert cache.num_bytes == header + block + 24 + 32  # + one index record + the footer
    large = TopKCacheWriter(tmp_path / "large", vocab_size=151936, k=64, durable=False).encoding
    assert (large.ids, large.id_bits, large.values, large.value_bits) == ("packed", 18, "quantized", 13)
    with pytest.raises(ValueError, match="reserved"):
        TopKCacheWriter(tmp_path / "r", vocab_size=10, k=2, metadata={"k": 3})
    with pytest.raises(ValueError, match="JSON"):
        TopKCacheWriter(tmp_path / "r2", vocab_size=10, k=2, metadata={"x": object()})


def test_add_rejects_bad_input(tmp_path):
    writer = TopKCacheWriter(tmp_path / "c", vocab_size=100, k=4, durable=False)
    tokens = np.arange(5)
    ids = np.tile(np.arange(4), (5, 1))
    values = np.full((5, 4), -1.0, dtype=np.float32)
    with pytest.raises(ValueError, match=r"ids must be \[T, k\]"):
        writer.add(tokens, ids[:3], values[:3])
    with pytest.raises(ValueError, match="ids must be"):
        writer.add(tokens, ids[:, :3], values[:, :3])
    with pytest.raises(ValueError, match="values must have the shape"):
        writer.add(tokens, ids, values[:4])
    with pytest.raises(ValueError, match="ids must lie in"):
        writer.add(tokens, ids + 97, values)
    with pytest.raises(ValueError, match="tokens must lie in"):
        writer.add(tokens - 1, ids, values)
    with pytest.raises(ValueError, match="NaN"):
        writer.add(tokens, ids, np.where(ids == 1, np.nan, values))
    with pytest.raises(ValueError, match="<= 0"):
        writer.add(tokens, ids, values + 2)
    with pytest.raises(ValueError, match="temperature"):
        writer.add(tokens, ids, values, temperature=2.0)
    with pytest.raises(TypeError, match="integer dtype"):
        writer.add(tokens.astype(np.float32), ids, values)
    with pytest.raises(ValueError, match="T >= 1"):
        writer.add(np.zeros(0, dtype=np.int64), ids[:0], values[:0])
    assert writer.add(tokens, ids, values) == 0 and len(writer) == 1
    writer.close()
    with pytest.raises(ValueError, match="closed"):
        writer.add(tokens, ids, values)
    fp16 = TopKCacheWriter(tmp_path / "l", vocab_size=100, k=4, values="logits", durable=False)
    with pytest.raises(ValueError, match="float16 range"):
        fp16.add(tokens, ids, values * -1e5)


def test_resume_rules(tmp_path):
    rng = np.random.default_rng(2)
    sequences = [make_sequence(rng, 50, 3) for _ in range(5)]
    write_cache(tmp_path / "c", sequences[:3], 50, 3)
    with pytest.raises(FileExistsError, match="resume=True"):
        TopKCacheWriter(tmp_path / "c", vocab_size=50, k=3)
    with pytest.raises(ValueError, match="temperature"):
        TopKCacheWriter(tmp_path / "c", vocab_size=50, k=3, temperature=2.0, resume=True)
    with TopKCacheWriter(tmp_path / "c", vocab_size=50, k=3, resume=True, durable=False) as writer:
        assert len(writer) == writer.num_committed == 3
        for tokens, ids, values in sequences[3:]:
            writer.add(tokens, ids, values)
    cache = TopKCache(tmp_path / "c")
    assert len(cache) == 5
    np.testing.assert_array_equal(cache[4].ids.numpy(), sequences[4][1])


# ------------------------------------------------------------------------------------------ durability

WRITER_SCRIPT = textwrap.dedent("""
    import sys, time
    import numpy as np
    from kdloss.cache import TopKCacheWriter
    path, stop_after = sys.argv[1], int(sys.argv[2])
    with TopKCacheWriter(path, vocab_size=300, k=6, shard_tokens=50, resume=True) as writer:
        for i in range(len(writer), 40):
            rng = np.random.default_rng(i)
            n = int(rng.integers(2, 20))
            writer.add(rng.integers(0, 300, n), rng.permutation(300)[: 6 * (n - 1)].reshape(n - 1, 6) % 300,
                       -rng.random((n - 1, 6)).astype(np.float32) * 5)
            if i + 1 == stop_after:
                # the in-flight shard holds some sequences: report, then wait for SIGKILL
                print(len(writer), writer.num_committed, flush=True)
                time.sleep(600)
""")


def expected_writer_sequence(i: int):
    rng = np.random.default_rng(i)
    n = int(rng.integers(2, 20))
    return (rng.integers(0, 300, n), rng.permutation(300)[: 6 * (n - 1)].reshape(n - 1, 6) % 300,
            -rng.random((n - 1, 6)).astype(np.float32) * 5)


def test_sigkill_mid_shard_then_resume(tmp_path):
    path = tmp_path / "c"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(path), "23"], stdout=subprocess.PIPE,
                             env=env, text=True)
    try:
        added, committed = map(int, child.stdout.readline().split())
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert added == 23 and 0 < committed < added  # killed with a shard in flight
    assert any(name.endswith(".tmp") for name in os.listdir(path))
    cache = TopKCache(path)
    assert len(cache) == committed
    for i in range(committed):
        tokens, ids, values = expected_writer_sequence(i)
        seq = cache[i]
        np.testing.assert_array_equal(seq.tokens.numpy(), tokens)
        np.testing.assert_array_equal(seq.ids.numpy(), ids)
        np.testing.assert_array_equal(seq.values.numpy(), values.astype(np.float16).astype(np.float32))
    assert verify_cache(path) == []
    # resume (the writer script's own loop, run here): continues after the last committed sequence
    with TopKCacheWriter(path, vocab_size=300, k=6, shard_tokens=50, resume=True) as writer:
        assert len(writer) == writer.num_committed == committed
        assert not any(name.endswith(".tmp") for name in os.listdir(path))  # the partial shard is gone
        for i in range(len(writer), 40):
            writer.add(*expected_writer_sequence(i))
    cache = TopKCache(path)
    assert len(cache) == 40
    for i in range(40):
        np.testing.assert_array_equal(cache[i].tokens.numpy(), expected_writer_sequence(i)[0])
        np.testing.assert_array_equal(cache[i].ids.numpy(), expected_writer_sequence(i)[1])
    assert verify_cache(path) == []


def test_uncounted_shard_and_record_are_ignored_then_removed_on_resume(tmp_path):
    """A crash after a shard's rename (or after its table record) but before the manifest update
    leaves a shard file and a table record the manifest does not count."""
    rng = np.random.default_rng(3)
    sequences = [make_sequence(rng, 40, 2) for _ in range(4)]
    path = tmp_path / "c"
    write_cache(path, sequences, 40, 2, shard_tokens=1)
    table_size = (path / "shards.bin").stat().st_size
    (path / "shard-000004.kdc").write_bytes(b"garbage")
    (path / "shard-000005.kdc.tmp").write_bytes(b"partial")
    with open(path / "shards.bin", "ab") as table:
        table.write(b"\x07" * 64)
    assert len(TopKCache(path)) == 4 and verify_cache(path) == []
    with TopKCacheWriter(path, vocab_size=40, k=2, shard_tokens=1, resume=True, durable=False) as writer:
        assert len(writer) == 4 and (path / "shards.bin").stat().st_size == table_size
        writer.add(*sequences[0])
    expected = sorted(["manifest.json", "shards.bin"] + [f"shard-00000{i}.kdc" for i in range(5)])
    assert sorted(os.listdir(path)) == expected and verify_cache(path) == []
    np.testing.assert_array_equal(TopKCache(path)[4].ids.numpy(), sequences[0][1])


def test_open_reads_only_the_manifest(tmp_path):
    rng = np.random.default_rng(10)
    path = tmp_path / "c"
    write_cache(path, [make_sequence(rng, 40, 2) for _ in range(30)], 40, 2, shard_tokens=1)
    for number in range(1, 30):  # every shard but shard 0 replaced by garbage: opening must not notice
        (path / f"shard-{number:06d}.kdc").write_bytes(b"garbage")
    cache = TopKCache(path)
    assert len(cache) == 30 and cache.num_shards == 30 and cache._table is None and cache._open == {}
    cache[0]
    assert list(cache._open) == [0]
    with pytest.raises(CorruptCacheError, match="shard-000007.kdc"):
        cache[7]


def test_corrupt_and_truncated_shards_name_the_file(tmp_path, capsys):
    rng = np.random.default_rng(4)
    sequences = [make_sequence(rng, 100, 4, length=10) for _ in range(6)]
    path = tmp_path / "c"
    write_cache(path, sequences, 100, 4, shard_tokens=20)  # shards of 2 sequences
    shard1 = path / "shard-000001.kdc"
    data = bytearray(shard1.read_bytes())
    data[200] ^= 0x40  # inside the first sequence block
    shard1.write_bytes(bytes(data))
    cache = TopKCache(path)  # opening reads only the manifest
    np.testing.assert_array_equal(cache[0].tokens.numpy(), sequences[0][0])
    with pytest.raises(CorruptCacheError, match="shard-000001.kdc"):
        cache[2]
    problems = verify_cache(path)
    assert len(problems) == 1 and "shard-000001.kdc" in problems[0]
    assert cli(["verify", str(path)]) == 1
    assert "shard-000001.kdc" in capsys.readouterr().err
    # truncated shard: the lazy open names it, the others still read
    shard2 = path / "shard-000002.kdc"
    shard2.write_bytes(shard2.read_bytes()[:-10])
    cache = TopKCache(path)
    with pytest.raises(CorruptCacheError, match="shard-000002.kdc.*truncated"):
        cache[4]
    np.testing.assert_array_equal(cache[1].ids.numpy(), sequences[1][1])
    assert any("shard-000002.kdc" in p for p in verify_cache(path))
    # missing shard, damaged table record, damaged manifest
    os.remove(shard2)
    assert any("shard-000002.kdc: missing" in p for p in verify_cache(path))
    table = bytearray((path / "shards.bin").read_bytes())
    table[16 + 64 * 1 + 8] ^= 1  # shard 1's sequence count
    (path / "shards.bin").write_bytes(bytes(table))
    with pytest.raises(CorruptCacheError, match=r"shards.bin: record 1 is damaged"):
        TopKCache(path)[2]
    manifest = path / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"sequences": 6', '"sequences": 7', 1))
    with pytest.raises(CorruptCacheError, match="manifest.json"):
        TopKCache(path)
    assert cli(["verify", str(path)]) == 1


def test_no_pickle_in_the_format():
    for source in (ROOT / "kdloss" / "cache").glob("*.py"):
        text = source.read_text()
        for banned in ("import pickle", "allow_pickle=True", "torch.load(", "np.load("):
            assert banned not in text, f"{source.name} uses {banned}"


# ---------------------------------------------------------------------------------- DataLoader workers


def collate_reference(cache, indices, collator):
    return collator([cache[i] for i in indices])


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_dataloader_workers(tmp_path, start_method):
    rng = np.random.default_rng(5)
    sequences = [make_sequence(rng, 200, 4, rows_full=bool(i % 3)) for i in range(24)]
    cache = write_cache(tmp_path / "c", sequences, 200, 4, shard_tokens=64)
    cache[0]  # the parent has mapped a shard: forked workers must not reuse its state blindly
    collator = TopKCollator(student_vocab_size=200)
    loader = DataLoader(cache, batch_size=4, num_workers=2, collate_fn=collator,
                        multiprocessing_context=multiprocessing.get_context(start_method))
    batches = list(loader)
    assert len(batches) == 6
    for number, batch in enumerate(batches):
        expected = collate_reference(cache, range(4 * number, 4 * number + 4), collator)
        for key, value in expected.items():
            assert torch.equal(batch[key], value), key


# ---------------------------------------------------------------------------------------- collator


def test_collator_shift_convention(tmp_path):
    """Row t of the stored targets is the teacher's distribution of tokens[t + 1]: a teacher that is
    sure of the next token puts its top id exactly on shift_labels."""
    vocab, k = 50, 3
    rng = np.random.default_rng(6)
    sequences = []
    for length, rows_full in ((7, True), (4, False), (9, False)):
        tokens = rng.integers(0, vocab, length)
        rows = length if rows_full else length - 1
        nxt = np.append(tokens[1:], 0)[:rows]
        ids = np.stack([nxt, (nxt + 1) % vocab, (nxt + 2) % vocab], axis=1)
        values = np.log(np.array([[0.9, 0.06, 0.04]] * rows, dtype=np.float32))
        sequences.append((tokens, ids, values))
    cache = write_cache(tmp_path / "c", sequences, vocab, k, values_format="float32")
    batch = TopKCollator(student_vocab_size=vocab, pad_token_id=7)([cache[i] for i in range(3)])
    assert batch["input_ids"].shape == (3, 9) and batch["teacher_ids"].shape == (3, 9, k)
    for b, (tokens, _, _) in enumerate(sequences):
        length = len(tokens)
        assert batch["input_ids"][b, :length].tolist() == tokens.tolist()
        assert batch["input_ids"][b, length:].eq(7).all() and batch["attention_mask"][b].sum() == length
        assert batch["labels"][b, :length].tolist() == tokens.tolist() and batch["labels"][b, length:].eq(-100).all()
        shift = batch["shift_labels"][b]
        assert shift[: length - 1].tolist() == tokens[1:].tolist()  # the last position has no next token
        assert shift[length - 1:].eq(-100).all()
        counted = shift != -100
        assert torch.equal(batch["teacher_ids"][b, counted, 0].long(), shift[counted])
    # the stored targets line up with the student's logits at the same position: logits that put
    # their mass on shift_labels give a small loss, logits aligned with the unshifted labels do not
    def student_logits(targets):  # the teacher's known shape, placed at targets, targets + 1, targets + 2
        base = targets.clamp(min=0)[..., None]
        slots = torch.cat([base, (base + 1) % vocab, (base + 2) % vocab], dim=-1)
        logits = torch.full((3, 9, vocab), -30.0)
        return logits.scatter_(-1, slots, torch.log(torch.tensor([0.9, 0.06, 0.04])).expand(3, 9, 3).contiguous())

    args = (batch["teacher_ids"], batch["teacher_values"], batch["shift_labels"])
    good = kdloss.functional.topk_kl_loss(student_logits(batch["shift_labels"]), *args, **cache.loss_kwargs())
    bad = kdloss.functional.topk_kl_loss(student_logits(batch["labels"]), *args, **cache.loss_kwargs())
    assert good < 1e-5 and bad > 1.0
    truncated = TopKCollator(max_length=5, pad_to_multiple_of=4)([cache[i] for i in range(3)])
    assert truncated["input_ids"].shape == (3, 8)
    assert truncated["shift_labels"][2, :4].tolist() == sequences[2][0][1:5].tolist()
    assert truncated["shift_labels"][2, 4:].eq(-100).all()


def test_collator_ids_reach_the_losses(tmp_path):
    rng = np.random.default_rng(7)
    vocab, k, hidden = 64, 5, 8
    cache = write_cache(tmp_path / "c", [make_sequence(rng, vocab, k) for _ in range(3)], vocab, k)
    batch = TopKCollator(student_vocab_size=vocab)([cache[i] for i in range(3)])
    assert batch["teacher_ids"].dtype == torch.uint16  # the losses take uint16 ids as they are
    wide = TopKCollator(ids_dtype="int64")([cache[i] for i in range(3)])
    logits = torch.randn(*batch["input_ids"].shape, vocab, dtype=torch.float64)
    a = kdloss.functional.topk_kl_loss(logits, batch["teacher_ids"], batch["teacher_values"], batch["shift_labels"],
                                       backend="reference")
    b = kdloss.functional.topk_kl_loss(logits, wide["teacher_ids"], wide["teacher_values"], wide["shift_labels"],
                                       backend="reference")
    torch.testing.assert_close(a, b)
    h = torch.randn(*batch["input_ids"].shape, hidden, dtype=torch.float64)
    w = torch.randn(vocab, hidden, dtype=torch.float64)
    fused = kdloss.functional.fused_linear_topk_kl_loss(h, w, batch["teacher_ids"], batch["teacher_values"],
                                                        labels=batch["shift_labels"], backend="reference")
    direct = kdloss.functional.topk_kl_loss(h @ w.T, wide["teacher_ids"], wide["teacher_values"],
                                            wide["shift_labels"], backend="reference")
    torch.testing.assert_close(fused, direct)


def test_vocab_policy(tmp_path):
    teacher_vocab, student_vocab, k = 120, 100, 4
    tokens = np.array([1, 2, 3, 4])
    ids = np.array([[5, 110, 7, 8], [101, 102, 103, 104], [9, 10, 11, 119]])
    values = np.log(np.array([[0.4, 0.3, 0.1, 0.1], [0.5, 0.2, 0.1, 0.1], [0.3, 0.3, 0.2, 0.1]], dtype=np.float32))
    cache = write_cache(tmp_path / "c", [(tokens, ids, values)], teacher_vocab, k, values_format="float32")
    with pytest.raises(ValueError, match=r"teacher id 119 >= the student's vocab_size 100.*vocab_policy='drop'"):
        TopKCollator(student_vocab_size=student_vocab)([cache[0]])
    batch = TopKCollator(student_vocab_size=student_vocab, vocab_policy="drop")([cache[0]])
    kept_ids, kept_values = batch["teacher_ids"][0].long(), batch["teacher_values"][0]
    assert (kept_ids < student_vocab).all()
    assert torch.isinf(kept_values[0, 1]) and torch.isinf(kept_values[2, 3]) and torch.isinf(kept_values[1]).all()
    # dropped mass is spread over the kept ids in proportion: the row total is unchanged
    torch.testing.assert_close(kept_values[0].exp().sum(), torch.tensor(0.9))
    torch.testing.assert_close(kept_values[0, 0] - kept_values[0, 2], torch.tensor(np.log(4.0), dtype=torch.float32))
    assert batch["shift_labels"][0].tolist() == [2, -100, 4, -100]  # row 1 lost every slot
    logits = torch.randn(1, 4, student_vocab)
    loss = kdloss.functional.topk_kl_loss(logits, batch["teacher_ids"], batch["teacher_values"],
                                          batch["shift_labels"], **cache.loss_kwargs())
    assert torch.isfinite(loss)
    # an id beyond the student's vocabulary in a zero-probability slot is harmless under "error"
    padded_ids, padded_values = ids[:1].copy(), values[:1].copy()
    padded_ids[0, 1], padded_values[0, 1] = 115, -np.inf
    safe_ids, safe_values, _ = apply_vocab_policy(padded_ids, padded_values, student_vocab, "error")
    assert safe_ids[0].tolist() == [5, 0, 7, 8] and np.array_equal(safe_values, padded_values)
    # logits: dropping alone renormalises (softmax over the kept logits)
    new_ids, new_values, empty = apply_vocab_policy(ids, values, student_vocab, "drop", "logits")
    np.testing.assert_array_equal(new_values[0, [0, 2, 3]], values[0, [0, 2, 3]])
    assert empty.tolist() == [False, True, False]
    # without a policy the loss itself rejects ids beyond the student's logits
    plain = TopKCollator()([cache[0]])
    with pytest.raises(ValueError, match=r"teacher_ids must lie in \[0, V\) with V = 100"):
        kdloss.functional.topk_kl_loss(logits, plain["teacher_ids"], plain["teacher_values"], plain["shift_labels"])


# ---------------------------------------------------------------------------------------- DistillKit

# Rows encoded by DistillKit's own compressor (arcee-ai/DistillKit, LogprobCompressor.compress_from_sparse
# from float64 top-k log-probs) and the ids / log-probs its decompress_to_sparse returned (as float32).
DISTILLKIT_ROWS = json.loads(
    '{"bins_delta_normt":{"config":{"d":1000,"k":8,"exact_k":2,"exact_dtype":"bfloat16","polynomial_terms'
    '":[0,1,"sqrt"],"term_dtype":"float32","residual_bins":[{"scale_dtype":"float16","element_bits":4,"nu'
    'm_elements":4},{"scale_dtype":"float16","element_bits":1,"num_elements":1}],"delta_encoding":true,"e'
    'rror_diffusion":false,"normalize_t":true},"logprobs":["99bf7fbf93e3ecbed531703c7c0fb13e0f2c7ab06e308'
    '0","e8bfffbe73bca3bd979d7c3f91a685bfc6277ab0fc2b80","dabf78bfefac68bd12c3693fd2967bbf9f27a0e94c3080"'
    '],"indices":["cae57ce679f307827f29","02c0c00ed7dd0c964532","0143e39ac15f0ad3f8f9"],"ids":[[811,599,8'
    '25,633,972,120,159,809],[11,12,3,727,884,201,401,306],[5,62,230,705,380,173,254,249]],"expected":[[-'
    '1.1953125,-2.1875,-2.71875,-2.890625,-2.9375,-3.640625,-3.640625,-3.75],[-1.8125,-2.3125,-2.421875,-'
    '2.703125,-2.96875,-3.5,-3.671875,-3.796875],[-1.703125,-2.671875,-2.671875,-3.21875,-3.359375,-3.593'
    '75,-3.671875,-3.796875]]},"recommended_like":{"config":{"d":50000,"k":12,"exact_k":4,"exact_dtype":"'
    'bfloat16","polynomial_terms":[0,1,2,3,4,"sqrt"],"term_dtype":"float32","residual_bins":[],"delta_enc'
    'oding":false,"error_diffusion":false},"logprobs":["25c03fc049c063c02b4c69c07c65783efb6bedbdc526963cc'
    '7bb64ba00c30abf","3ac070c07dc084c02ada89c0d06179be99e0d63defbcd9bcbce4043b9aacfc3d","23c02ac050c058c'
    '0224780c0a6940c3e390e02bd9a8be1bad6efee390dc188be"],"indices":["1929b963af54b2845e25c1931dd5afe8b996'
    '715753e78b76","118c504d0d4d3a395f3910b29ee773d871fab1802072249e","8f0a1b1973e489a70e422383b1c243a97c'
    '3d45cb17be0cfb"],"ids":[[6441,47459,44884,45700,24101,49555,7637,45032,47510,29015,21479,35702],[449'
    '2,20557,3405,14905,24377,4274,40679,29656,29178,45440,8306,9374],[36618,6937,29668,35239,3650,9091,4'
    '5506,17321,31805,17867,6078,3323]],"expected":[[-2.578125,-2.984375,-3.140625,-3.546875,-3.645273923'
    '8739014,-4.043209552764893,-4.257725238800049,-4.4755377769470215,-4.664223670959473,-4.796863555908'
    '203,-4.862725257873535,-4.869982719421387],[-2.90625,-3.75,-3.953125,-4.125,-4.3078813552856445,-4.3'
    '476738929748535,-4.380983352661133,-4.433905601501465,-4.538512229919434,-4.681722640991211,-4.80287'
    '40882873535,-4.793094635009766],[-2.546875,-2.65625,-3.25,-3.375,-4.008683204650879,-4.1715121269226'
    '07,-4.245326995849609,-4.354765892028809,-4.49522590637207,-4.643561363220215,-4.763341903686523,-4.'
    '806201457977295]]},"exact_only_f16":{"config":{"d":300,"k":6,"exact_k":6,"exact_dtype":"float16","re'
    'sidual_bins":[],"delta_encoding":true},"logprobs":["5dbfafb416b5a6b1b6b4f3af","eebd9eb8f0ad8db63db9a'
    '9b2","fbbf42b82bb364b34daf26b5"],"indices":["9417174c10ec88","4185436d07e9b8","8e3bd80112b430"],"ids'
    '":[[296,92,186,193,29,290],[131,21,27,208,253,110],[284,239,192,17,86,268]],"expected":[[-1.84082031'
    '25,-2.1328125,-2.451171875,-2.62890625,-2.921875,-3.046875],[-1.482421875,-2.05859375,-2.15234375,-2'
    '.5625,-3.216796875,-3.423828125],[-1.9951171875,-2.52734375,-2.751953125,-2.982421875,-3.095703125,-'
    '3.41796875]]},"diffused_bins_f32":{"config":{"d":70000,"k":10,"exact_k":1,"exact_dtype":"float32","p'
    'olynomial_terms":[0,2],"term_dtype":"float16","residual_bins":[{"scale_dtype":"bfloat16","element_bi'
    'ts":3,"num_elements":5},{"scale_dtype":"float32","element_bits":7,"num_elements":4}],"delta_encoding'
    '":false,"error_diffusion":true},"logprobs":["8171a0bf18c33ea65e3ef9b4a088c43b007277f0","47378abfa6c3'
    'c3a60c3ef6a60062ae3b007dcff0","b7f506c04ec26fa73b3efda4609be93b009e6f60"],"indices":["4c5f2e90c0c741'
    'a67497b3659dbd6613711d749acb80","376b014b042a01124163b971c126245178668ec065c0","3420a10c9b3bc7b2220b'
    'dba9805666cc846499bd5600"],"ids":[[39102,47683,1594,6759,37622,55655,57011,4977,15081,27438],[28374,'
    '1324,8528,4388,11383,23664,37650,20856,52509,65943],[26689,33842,55774,31522,16763,60000,11059,52356'
    ',51507,62808]],"expected":[[-1.253463864326477,-2.896484375,-3.13671875,-3.861328125,-3.982421875,-4'
    '.37109375,-4.540104866027832,-4.64169979095459,-4.658219337463379,-4.731517791748047],[-1.0798119306'
    '56433,-3.4140625,-3.71484375,-3.79296875,-4.3359375,-4.3828125,-4.8249664306640625,-4.94905471801757'
    '8,-5.154439926147461,-5.180355072021484],[-2.1087472438812256,-2.6044921875,-2.6337890625,-3.4501953'
    '125,-3.779296875,-3.982421875,-4.335169792175293,-4.37354040145874,-4.481540203094482,-4.62674617767'
    '334]]}}'
)


@pytest.mark.parametrize("name", sorted(DISTILLKIT_ROWS))
def test_distillkit_decoding_matches_distillkit(name):
    case = DISTILLKIT_ROWS[name]
    config = DistillKitQuantization.from_dict(case["config"])
    logprob_bytes = np.array([list(bytes.fromhex(h)) for h in case["logprobs"]], dtype=np.uint8)
    index_bytes = np.array([list(bytes.fromhex(h)) for h in case["indices"]], dtype=np.uint8)
    assert logprob_bytes.shape[1] == config.logprob_bytes and index_bytes.shape[1] == config.index_bytes
    np.testing.assert_array_equal(decode_distillkit_indices(index_bytes, config), np.array(case["ids"]))
    decoded = decode_distillkit_logprobs(logprob_bytes, config)
    np.testing.assert_allclose(decoded, np.array(case["expected"], dtype=np.float32), rtol=2e-6, atol=2e-6)


def encode_distillkit(logprobs: np.ndarray, ids: np.ndarray, cfg: dict, index_bits: int):
    """An independent encoder of DistillKit's documented byte layout (sorted log-probs, least-squares
    polynomial, naive residual quantisation, MSB-first bit packing). Returns the bytes and the
    values a decoder must reproduce."""
    dtypes = {"float16": np.float16, "float32": np.float32, "float64": np.float64}
    k, exact_k = cfg["k"], cfg["exact_k"]
    work = logprobs.astype(np.float64)
    if cfg["delta_encoding"]:
        work = np.concatenate([work[:, :1], np.diff(work, axis=1)], axis=1).astype(np.float32).astype(np.float64)
    exact = work[:, :exact_k].astype(dtypes[cfg["exact_dtype"]])
    parts = [np.ascontiguousarray(exact).view(np.uint8).reshape(len(work), -1)]
    count = k - exact_k
    t = np.linspace(0, 1, count) if cfg.get("normalize_t") else np.arange(count, dtype=np.float64)
    basis = np.stack([np.sqrt(t) if term == "sqrt" else t ** term for term in cfg["polynomial_terms"]], axis=1)
    coeffs = np.linalg.lstsq(basis, work[:, exact_k:].T, rcond=None)[0].T.astype(np.float32)
    parts.append(np.ascontiguousarray(coeffs).view(np.uint8).reshape(len(work), -1))
    fit = (basis[None] * coeffs.astype(np.float64)[:, None, :]).sum(-1)
    residual = work[:, exact_k:] - fit
    recon = np.zeros_like(residual)
    at = 0
    for b in cfg["residual_bins"]:
        bits, n = b["element_bits"], b["num_elements"]
        chunk = residual[:, at: at + n]
        scale = (np.abs(chunk).max(axis=1, keepdims=True) / 2 ** (bits - 1)).astype(np.float16)
        scale = np.where(scale == 0, np.float16(1), scale)
        q = np.clip(np.rint(chunk / scale.astype(np.float64)), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        recon[:, at: at + n] = q * scale.astype(np.float64)
        codes = (q + 2 ** (bits - 1)).astype(np.int64)
        planes = (codes[..., None] >> np.arange(bits - 1, -1, -1)) & 1
        parts += [np.ascontiguousarray(scale).view(np.uint8), np.packbits(planes.reshape(len(work), -1).astype(np.uint8), axis=1)]
        at += n
    id_planes = (ids[..., None] >> np.arange(index_bits - 1, -1, -1)) & 1
    packed_ids = np.packbits(id_planes.reshape(len(ids), -1).astype(np.uint8), axis=1)
    recon = recon.astype(dtypes[cfg["exact_dtype"]]).astype(np.float64)  # residuals in the exact dtype
    values = np.concatenate([exact.astype(np.float64), fit + recon], axis=1)
    if cfg["delta_encoding"]:  # the running sum comes back in the exact dtype
        values = np.cumsum(values, axis=1).astype(dtypes[cfg["exact_dtype"]]).astype(np.float64)
    return np.concatenate(parts, axis=1), packed_ids, values


@pytest.mark.parametrize("cfg", [
    dict(d=5000, k=24, exact_k=4, exact_dtype="float32", polynomial_terms=[0, 1, 2, "sqrt"], term_dtype="float32",
         residual_bins=[dict(scale_dtype="float16", element_bits=6, num_elements=12),
                        dict(scale_dtype="float16", element_bits=3, num_elements=5)], delta_encoding=False),
    dict(d=70000, k=16, exact_k=2, exact_dtype="float16", polynomial_terms=[0, 1, "sqrt"], term_dtype="float32",
         residual_bins=[dict(scale_dtype="float16", element_bits=8, num_elements=14)], delta_encoding=True,
         normalize_t=True),
])
def test_distillkit_round_trip_with_an_independent_encoder(cfg):
    rng = np.random.default_rng(8)
    logits = torch.from_numpy(rng.standard_normal((20, cfg["d"])).astype(np.float32) * 3)
    ids, logprobs = topk_teacher(logits, cfg["k"])
    config = DistillKitQuantization.from_dict(cfg)
    raw, packed, expected = encode_distillkit(logprobs.numpy(), ids.numpy(), cfg, config.index_bits)
    assert raw.shape[1] == config.logprob_bytes and packed.shape[1] == config.index_bytes
    np.testing.assert_array_equal(decode_distillkit_indices(packed, config), ids.numpy())
    # up to one rounding of the exact dtype (the decoder sums in float32, this encoder in float64)
    np.testing.assert_allclose(decode_distillkit_logprobs(raw, config), expected, rtol=1e-3, atol=1e-5)


def test_distillkit_config_validation():
    with pytest.raises(ValueError, match="unknown quantization fields"):
        DistillKitQuantization.from_dict({"d": 10, "k": 4, "exact_k": 4, "colour": 1})
    with pytest.raises(ValueError, match="exact_k must be <= k"):
        DistillKitQuantization.from_dict({"d": 10, "k": 4, "exact_k": 5})
    with pytest.raises(ValueError, match="polynomial_terms or residual_bins"):
        DistillKitQuantization.from_dict({"d": 10, "k": 4, "exact_k": 2})
    config = DistillKitQuantization.from_dict({"d": 10, "k": 4, "exact_k": 4})
    with pytest.raises(ValueError, match="bytes per position"):
        decode_distillkit_logprobs(np.zeros((2, 3), dtype=np.uint8), config)


def test_convert_distillkit(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    case = DISTILLKIT_ROWS["recommended_like"]
    config = DistillKitQuantization.from_dict(case["config"])
    logprob_rows = [list(bytes.fromhex(h)) for h in case["logprobs"]]
    index_rows = [list(bytes.fromhex(h)) for h in case["indices"]]
    source = tmp_path / "dk"
    source.mkdir()
    table = pa.table({"input_ids": pa.array([[11, 12, 13, 14]], pa.list_(pa.uint64())),
                      "compressed_logprobs": pa.array([logprob_rows], pa.list_(pa.list_(pa.uint8()))),
                      "bytepacked_indices": pa.array([index_rows], pa.list_(pa.list_(pa.uint8())))})
    pq.write_table(table, source / "data_0.parquet")
    with pytest.raises(ValueError, match="quantization"):
        convert_distillkit(source, tmp_path / "none", vocab_size=config.d)
    (source / "compression_config.json").write_text(json.dumps(case["config"]))
    count = convert_distillkit(source, tmp_path / "out", vocab_size=config.d,
                               quantization=str(source / "compression_config.json"), values_format="float32")
    cache = TopKCache(tmp_path / "out")
    assert count == len(cache) == 1 and cache.metadata["source"] == "distillkit"
    seq = cache[0]
    assert seq.tokens.tolist() == [11, 12, 13, 14] and seq.ids.shape == (3, config.k)  # R = T - 1
    np.testing.assert_array_equal(seq.ids.numpy(), np.array(case["ids"]))
    np.testing.assert_allclose(seq.values.numpy(), np.array(case["expected"]), rtol=2e-6, atol=2e-6)
    # raw rows, through the CLI; an id beyond vocab_size is rejected naming the row
    raw = pa.table({"input_ids": pa.array([[0], [1, 2, 3], [4, 5]], pa.list_(pa.int64())),  # a 1-token row first
                    "token_ids": pa.array([[], [[1, 2], [3, 4]], [[5, 6]]], pa.list_(pa.list_(pa.int64()))),
                    "top_values": pa.array([[], [[-0.5, -1.0], [-0.1, -3.0]], [[-0.2, -2.0]]],
                                           pa.list_(pa.list_(pa.float32())))})
    pq.write_table(raw, tmp_path / "raw.parquet")
    assert cli(["convert", str(tmp_path / "raw.parquet"), str(tmp_path / "raw_out"), "--vocab-size", "10"]) == 0
    converted = TopKCache(tmp_path / "raw_out")
    assert len(converted) == 3 and converted[0].ids.shape == (0, 2) and converted[2].ids.tolist() == [[5, 6]]
    with pytest.raises(ValueError, match="DistillKit row 2: ids must lie"):
        convert_distillkit(tmp_path / "raw.parquet", tmp_path / "small", vocab_size=6)


# -------------------------------------------------------------------------------------------- vLLM


class FakeLogprob:
    def __init__(self, logprob, rank):
        self.logprob, self.rank, self.decoded_token = logprob, rank, None


def test_vllm_prompt_logprobs(tmp_path):
    prompt = [None,
              {5: FakeLogprob(-0.1, 1), 9: FakeLogprob(-2.5, 2), 3: FakeLogprob(-7.0, 40)},  # 3: prompt token
              {4: FakeLogprob(-0.3, 2), 8: FakeLogprob(-0.2, 1)}]
    rows = from_vllm_prompt_logprobs(prompt, 2)
    assert rows.ids.tolist() == [[5, 9], [8, 4]] and rows.temperature == 1.0 and rows.values_kind == "logprobs"
    np.testing.assert_allclose(rows.values, [[-0.1, -2.5], [-0.2, -0.3]], rtol=1e-6)
    processed = from_vllm_prompt_logprobs([None, {1: -0.5, 2: -1.5, 3: -2.0}], 3, temperature=0.7,
                                          logprobs_mode="processed_logprobs")
    assert processed.temperature == 0.7 and processed.ids.tolist() == [[1, 2, 3]]
    short = from_vllm_prompt_logprobs([None, {1: -0.5}], 3)
    assert short.ids.tolist() == [[1, 0, 0]] and np.isneginf(short.values[0, 1:]).all()

    class Flat:  # vLLM's FlatLogprobs layout
        start_indices, end_indices = [0, 0, 2], [0, 2, 4]
        token_ids, logprobs, ranks = [7, 6, 2, 1], [-0.4, -1.2, -0.9, -0.6], [1, 2, 2, 1]

    flat = from_vllm_prompt_logprobs(Flat(), 2)
    assert flat.ids.tolist() == [[7, 6], [1, 2]]
    with TopKCacheWriter(tmp_path / "v", vocab_size=10, k=2, temperature=rows.temperature, durable=False) as writer:
        writer.add([1, 5, 8], rows.ids, rows.values, temperature=rows.temperature)
    with pytest.raises(ValueError, match="k must be"):
        from_vllm_prompt_logprobs(prompt, 0)


# --------------------------------------------------------------------------------- CLI and the example


def test_cli_build_inspect_verify(tmp_path, capsys):
    import transformers
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=300, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(tmp_path / "teacher")
    rng = np.random.default_rng(9)
    sequences = [rng.integers(0, 300, int(rng.integers(2, 30))).tolist() for _ in range(7)]
    data = tmp_path / "tokens.jsonl"
    data.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in sequences[:4]))
    out = tmp_path / "cache"
    common = ["build", "--model", str(tmp_path / "teacher"), "--input", str(data), "--out", str(out), "--k", "8",
              "--temperature", "2.0", "--device", "cpu", "--batch-size", "3", "--shard-tokens", "40", "--quiet"]
    assert cli(common) == 0
    assert len(TopKCache(out)) == 4
    data.write_text("".join(json.dumps(s) + "\n" for s in sequences))  # more data: resumes after 4
    assert cli(common) == 0
    cache = TopKCache(out)
    assert len(cache) == 7 and cache.metadata["temperature"] == 2.0 and cache.k == 8
    with torch.no_grad():
        for i, tokens in enumerate(sequences):
            logits = model(torch.tensor([tokens])).logits[0, :-1]
            ids, logprobs = topk_teacher(logits, 8, temperature=2.0)
            seq = cache[i]
            assert seq.tokens.tolist() == tokens and seq.ids.shape == (len(tokens) - 1, 8)
            # fp16 storage; ties in the top-k may order differently, so compare as sets of (id, value)
            for row in range(len(tokens) - 1):
                stored = dict(zip(seq.ids[row].tolist(), seq.values[row].tolist(), strict=True))
                for token, value in zip(ids[row].tolist(), logprobs[row].tolist(), strict=True):
                    assert abs(stored[token] - value) < 5e-3
    capsys.readouterr()
    assert cli(["inspect", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["sequences"] == 7 and summary["tokens"] == sum(map(len, sequences))
    assert summary["metadata"]["teacher"] == str(tmp_path / "teacher") and summary["bytes_per_token"] > 0
    assert cli(["verify", str(out)]) == 0 and "OK" in capsys.readouterr().out
    assert cli(["bench", str(out), "--reads", "5"]) == 0 and "tokens/s" in capsys.readouterr().out


def test_example_smoke():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KDLOSS_EXAMPLE_STEPS": "3"}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "teacher_cache.py"), "--sequences", "16"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "teacher cache: 16 sequences" in result.stdout
    curve = [line.split() for line in result.stdout.splitlines() if line[:4].strip().isdigit()]
    assert len(curve) == 3 and all(float(a) > 0 and abs(float(a) - float(b)) < 1e-3 for _, a, b in curve)
