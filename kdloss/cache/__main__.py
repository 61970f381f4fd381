"""``python -m kdloss.cache``: inspect, verify, convert, build and bench top-k teacher caches."""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

from . import _format as fmt


def _inspect(args) -> int:
    from .reader import TopKCache

    cache = TopKCache(args.path)
    tokens, size = cache.num_tokens, cache.num_bytes
    summary = {"path": cache.path, "metadata": cache.metadata, "sequences": len(cache), "tokens": tokens,
               "rows": cache.num_rows, "shards": cache.num_shards, "bytes": size,
               "bytes_per_token": size / tokens if tokens else 0.0}
    if args.json:
        print(json.dumps(summary, indent=1, sort_keys=True))
        return 0
    for key, value in summary.items():
        if key != "metadata":
            print(f"{key:16s} {value:.2f}" if isinstance(value, float) else f"{key:16s} {value}")
    for key, value in summary["metadata"].items():
        print(f"  {key:14s} {json.dumps(value)}")
    return 0


def _verify(args) -> int:
    from .reader import verify_cache

    try:
        problems = verify_cache(args.path)
    except (fmt.CorruptCacheError, FileNotFoundError) as error:
        print(f"DAMAGED {error}", file=sys.stderr)
        return 1
    for problem in problems:
        print(f"DAMAGED {problem}", file=sys.stderr)
    if not problems:
        print(f"OK {args.path}")
    return 1 if problems else 0


def _convert(args) -> int:
    from .distillkit import convert_distillkit

    kwargs = {} if args.shard_tokens is None else {"shard_tokens": args.shard_tokens}
    count = convert_distillkit(args.source, args.out, vocab_size=args.vocab_size, quantization=args.quantization,
                               temperature=args.temperature, values_format=args.values_format, resume=args.resume,
                               **kwargs)
    print(f"wrote {count} sequences to {args.out}")
    return 0


def _build(args) -> int:
    from .build import build_cache, read_token_sequences

    count = build_cache(args.model, read_token_sequences(args.input), args.out, k=args.k, temperature=args.temperature,
                        device=args.device, batch_size=args.batch_size, dtype=args.dtype,
                        shard_tokens=args.shard_tokens, resume=not args.no_resume, values_format=args.values_format,
                        progress=not args.quiet)
    print(f"cache {args.out}: {count} sequences")
    return 0


def _bench(args) -> int:
    from .reader import TopKCache

    started = time.perf_counter()
    cache = TopKCache(args.path)
    opened = time.perf_counter() - started
    order = list(range(len(cache)))
    random.Random(0).shuffle(order)
    order = order[: args.reads]
    tokens, started = 0, time.perf_counter()
    for index in order:
        tokens += len(cache[index].tokens)
    elapsed = max(time.perf_counter() - started, 1e-9)
    print(f"open {opened * 1e3:.2f} ms; {len(order)} random reads, {tokens} tokens in {elapsed:.3f} s: "
          f"{tokens / elapsed:,.0f} tokens/s, {len(order) / elapsed:,.0f} sequences/s")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kdloss.cache", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="metadata, sequences, tokens, size, bytes/token")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    verify = sub.add_parser("verify", help="check every checksum; exit 1 naming the damaged shard")
    verify.add_argument("path")
    convert = sub.add_parser("convert", help="DistillKit Parquet -> kdloss cache")
    convert.add_argument("source", help="a .parquet file or a directory of them")
    convert.add_argument("out")
    convert.add_argument("--vocab-size", type=int, required=True)
    convert.add_argument("--quantization", help="DistillKit's compression config (YAML or JSON); default: "
                         "compression_config.yaml next to the data")
    convert.add_argument("--temperature", type=float, default=1.0)
    convert.add_argument("--values-format", default="auto")
    convert.add_argument("--shard-tokens", type=int)
    convert.add_argument("--resume", action="store_true")
    build = sub.add_parser("build", help="run a local Hugging Face causal LM teacher over token ids")
    build.add_argument("--model", required=True, help="local model directory (AutoModelForCausalLM)")
    build.add_argument("--input", required=True, help="token ids: .jsonl (lists or {'input_ids': [...]}), .json, "
                       ".parquet")
    build.add_argument("--out", required=True)
    build.add_argument("--k", type=int, default=64)
    build.add_argument("--temperature", type=float, default=1.0)
    build.add_argument("--device", default="cpu")
    build.add_argument("--dtype", help="torch dtype to load the teacher in, e.g. bfloat16")
    build.add_argument("--batch-size", type=int, default=8)
    build.add_argument("--shard-tokens", type=int, default=1 << 18)
    build.add_argument("--values-format", default="auto")
    build.add_argument("--no-resume", action="store_true", help="refuse to continue an existing cache")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    bench = sub.add_parser("bench", help="open time and random-read throughput")
    bench.add_argument("path")
    bench.add_argument("--reads", type=int, default=1000)
    return parser


COMMANDS = {"inspect": _inspect, "verify": _verify, "convert": _convert, "build": _build, "bench": _bench}


def main(argv=None) -> int:
    """Entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
