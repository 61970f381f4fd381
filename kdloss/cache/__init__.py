"""Stored teachers: a durable, compact top-k teacher cache ("write once, train many").

* :class:`TopKCacheWriter` writes sequences (tokens + the teacher's top-k ids and values) in
  checksummed shards committed atomically; a killed writer loses at most the shard in flight
  and ``resume=True`` continues after the last committed sequence.
* :class:`TopKCache` opens a cache read-only in O(1) (only the manifest is read), memory-maps
  shards lazily per process, and serves sequences by index (a ``Dataset``, safe with
  ``DataLoader`` workers under fork and spawn).
* :class:`TopKCollator` pads a batch and lines the stored targets up with the student's logits
  (``shift_labels``), with an explicit policy for teacher ids outside the student's vocabulary.
* :func:`convert_distillkit` converts DistillKit Parquet datasets (raw or compressed rows);
  :func:`from_vllm_prompt_logprobs` turns vLLM prompt log-probs into rows;
  :func:`build_cache` runs a local Hugging Face teacher. ``python -m kdloss.cache`` offers
  ``inspect``, ``verify``, ``convert``, ``build`` and ``bench``.

The format stores JSON and raw little-endian numbers only (no pickle). See ``docs/cache.md``.
"""

from ._format import CorruptCacheError
from .build import build_cache, read_token_sequences
from .collate import VOCAB_POLICIES, TopKCollator, apply_vocab_policy
from .distillkit import DistillKitQuantization, convert_distillkit, read_distillkit_rows
from .reader import CachedSequence, TopKCache, verify_cache
from .vllm import VLLMTopK, from_vllm_prompt_logprobs
from .writer import TopKCacheWriter

__all__ = [
    "TopKCacheWriter", "TopKCache", "CachedSequence", "TopKCollator", "apply_vocab_policy", "VOCAB_POLICIES",
    "convert_distillkit", "read_distillkit_rows", "DistillKitQuantization", "from_vllm_prompt_logprobs", "VLLMTopK",
    "build_cache", "read_token_sequences", "verify_cache", "CorruptCacheError",
]
