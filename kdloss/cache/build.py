"""Running a local Hugging Face causal LM teacher over token ids into a cache (resumable)."""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import torch

from ..sparse import topk_teacher
from .writer import DEFAULT_SHARD_TOKENS, TopKCacheWriter

__all__ = ["build_cache", "read_token_sequences"]


def read_token_sequences(path) -> list[list[int]]:
    """Token-id sequences from a file: JSON lines (each a list of ints or an object with
    ``input_ids``), a ``.json`` list of lists, or a ``.parquet`` file with an ``input_ids`` column
    (needs pyarrow).

    Args:
        path: the file.

    Returns:
        A list of token-id lists.

    Example::

        sequences = read_token_sequences("tokens.jsonl")   # lines like {"input_ids": [1, 2, 3]}
    """
    path = os.fspath(path)
    if path.endswith(".parquet"):
        from .distillkit import _need_pyarrow

        table = _need_pyarrow().parquet.read_table(path, columns=["input_ids"])
        return [list(map(int, row)) for row in table.column("input_ids").to_pylist()]
    with open(path, encoding="utf-8") as handle:
        if path.endswith(".json"):
            rows = json.load(handle)
        else:
            rows = [json.loads(line) for line in handle if line.strip()]
    sequences = []
    for number, row in enumerate(rows):
        ids = row.get("input_ids") if isinstance(row, dict) else row
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError(f"{path}: sequence {number} must be a non-empty list of ints (or {{'input_ids': [...]}})")
        sequences.append(ids)
    return sequences


def _load_model(model, device: str, dtype: str | None):
    if isinstance(model, torch.nn.Module):
        return model.to(device).eval()
    from transformers import AutoModelForCausalLM

    kwargs = {} if dtype is None else {"dtype": getattr(torch, dtype)}
    return AutoModelForCausalLM.from_pretrained(os.fspath(model), **kwargs).to(device).eval()


class _Progress:
    """A tqdm bar when tqdm is installed and enabled, else nothing."""

    def __init__(self, enabled: bool, total: int, initial: int) -> None:
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=initial, unit="seq", file=sys.stderr, desc="teacher")
            except ImportError:
                pass

    def update(self, count: int, tokens: int) -> None:
        if self.bar is not None:
            self.bar.update(count)
            self.bar.set_postfix(tokens=tokens, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@torch.no_grad()
def build_cache(model, sequences, out_path, *, k: int, temperature: float = 1.0, device: str = "cpu",
                batch_size: int = 8, dtype: str | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                resume: bool = True, values_format: str = "auto", metadata: dict | None = None,
                progress: bool = True) -> int:
    """Runs a causal LM teacher over ``sequences`` and stores its top-k log-probs.

    Each sequence of T tokens gets ``T - 1`` rows: row t holds the top-k of
    ``log_softmax(logits[t] / temperature)``, the teacher's distribution of token t + 1.

    Args:
        model: a local Hugging Face model directory (``AutoModelForCausalLM``) or an ``nn.Module``
            whose output has ``.logits`` (``[B, T, V]``) given ``input_ids`` and ``attention_mask``.
        sequences: a list of token-id lists.
        out_path: cache directory.
        k: top-k slots per position.
        temperature: generation temperature of the stored log-probs.
        device: where the teacher runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``, …).
        batch_size: sequences per forward pass (right-padded).
        dtype: optional torch dtype name to load the model in (``"bfloat16"``, …).
        shard_tokens, values_format, metadata: as in :class:`~kdloss.cache.TopKCacheWriter`.
        resume: continue an existing cache at ``out_path`` after its last committed sequence
            (default True); False refuses to touch an existing cache.
        progress: show a progress bar on stderr (tqdm).

    Returns:
        The number of sequences in the cache.

    Example::

        build_cache("models/teacher", read_token_sequences("tokens.jsonl"), "cache/", k=64, device="cuda")
    """
    teacher = _load_model(model, device, dtype)
    vocab_size = int(getattr(getattr(teacher, "config", None), "vocab_size", 0) or 0)
    info = {"teacher": os.fspath(model) if not isinstance(model, torch.nn.Module) else type(model).__name__}
    info.update(metadata or {})
    sequences = list(sequences)
    with TopKCacheWriter(out_path, vocab_size=vocab_size or _probe_vocab(teacher, device), k=k, values="logprobs",
                         temperature=temperature, shard_tokens=shard_tokens, resume=resume, metadata=info,
                         values_format=values_format) as writer:
        done = len(writer)
        bar = _Progress(progress, len(sequences), done)
        tokens_done, started = 0, time.perf_counter()
        try:
            for start in range(done, len(sequences), batch_size):
                batch = sequences[start: start + batch_size]
                for tokens, ids, logprobs in _teacher_rows(teacher, batch, k, temperature, device):
                    writer.add(tokens, ids, logprobs)
                tokens_done += sum(len(s) for s in batch)
                bar.update(len(batch), tokens_done)
        finally:
            bar.close()
        if progress:
            elapsed = max(time.perf_counter() - started, 1e-9)
            print(f"stored {len(writer)} sequences ({tokens_done} new tokens, {tokens_done / elapsed:.0f} tokens/s)",
                  file=sys.stderr)
        return len(writer)


def _probe_vocab(teacher, device: str) -> int:
    logits = teacher(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device)).logits
    return int(logits.shape[-1])


def _teacher_rows(teacher, batch: list[list[int]], k: int, temperature: float, device: str):
    lengths = [len(s) for s in batch]
    width = max(lengths)
    input_ids = np.zeros((len(batch), width), dtype=np.int64)
    mask = np.zeros((len(batch), width), dtype=np.int64)
    for row, tokens in enumerate(batch):
        input_ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
    logits = teacher(input_ids=torch.from_numpy(input_ids).to(device),
                     attention_mask=torch.from_numpy(mask).to(device)).logits
    for row, length in enumerate(lengths):
        ids, logprobs = topk_teacher(logits[row, : length - 1], k, temperature)
        yield np.asarray(batch[row], dtype=np.int64), ids.cpu(), logprobs.float().cpu()
