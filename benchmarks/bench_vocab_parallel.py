"""Vocabulary-parallel top-k KL and fused head on CPU (gloo): time, per-rank peak memory and
communication per step, against the single-process loss on the full vocabulary.

    python benchmarks/bench_vocab_parallel.py --world 2 --rows 128 --vocab 151936 --k 64 --hidden 256

Every process (the W ranks, and one more for the single-process baseline) runs with one thread, so a
rank gets the compute a single process gets; on a machine with fewer than W + 1 free cores the times
are contended (the point on CPU is memory and communication, not time). Peak memory is the extra
resident memory of one steady-state forward + backward (VmHWM after a reset, fixed mmap threshold),
inputs excluded. Communication is counted by wrapping the ``torch.distributed`` collectives: bytes
this rank contributes and bytes it receives, per step.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kdloss.bench import step_peak_rss_mib
from kdloss.functional import fused_linear_topk_kl_loss, topk_kl_loss


def _inputs(args):
    gen = torch.Generator().manual_seed(0)
    top = torch.randn(args.rows, args.vocab, generator=gen).log_softmax(-1).topk(args.k)
    logits = torch.randn(args.rows, args.vocab, generator=gen)
    hidden = torch.randn(args.rows, args.hidden, generator=gen)
    weight = torch.randn(args.vocab, args.hidden, generator=gen) / args.hidden ** 0.5
    return top.indices, top.values, logits, hidden, weight


class _Traffic:
    """Wraps the collectives kdloss calls and adds up their payloads."""

    NAMES = ("all_gather_into_tensor", "all_gather", "all_reduce")

    def __init__(self):
        self.sent = self.received = self.calls = 0
        self._originals = {name: getattr(dist, name) for name in self.NAMES}
        for name in self.NAMES:
            setattr(dist, name, self._wrap(name))

    def _wrap(self, name):
        original = self._originals[name]

        def counted(*a, **k):
            out = original(*a, **k)
            self.calls += 1
            if name == "all_gather_into_tensor":
                self.sent += a[1].numel() * a[1].element_size()
                self.received += a[0].numel() * a[0].element_size()
            elif name == "all_gather":
                self.sent += a[1].numel() * a[1].element_size()
                self.received += sum(t.numel() * t.element_size() for t in a[0])
            else:
                self.sent += a[0].numel() * a[0].element_size()
                self.received += a[0].numel() * a[0].element_size()
            return out

        return counted

    def reset(self):
        self.sent = self.received = self.calls = 0


def _median_ms(fn, inputs, repeat):
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        loss = fn(*inputs)
        torch.autograd.grad(loss, [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad])
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def _steps(args, group, shard):
    ids, vals, logits, hidden, weight = _inputs(args)
    local_logits = logits[:, shard].contiguous().requires_grad_()
    local_weight = weight[shard].contiguous().requires_grad_()
    hidden.requires_grad_()
    extra = {} if group is None else {"vocab_parallel_group": group}
    return {
        "topk_kl": (lambda z, i, v: topk_kl_loss(z, i, v, temperature=2.0, **extra), (local_logits, ids, vals)),
        "fused": (lambda h, w, i, v: fused_linear_topk_kl_loss(h, w, i, v, temperature=2.0, **extra),
                  (hidden, local_weight, ids, vals)),
    }


def _measure(args, group, shard, traffic=None):
    rows = {}
    for name, (fn, inputs) in _steps(args, group, shard).items():
        for _ in range(2):
            _median_ms(fn, inputs, 1)
        ms = _median_ms(fn, inputs, args.repeat)
        if traffic is not None:
            traffic.reset()
            _median_ms(fn, inputs, 1)
            comm = (traffic.calls, traffic.sent, traffic.received)
        else:
            comm = (0, 0, 0)
        rows[name] = (ms, step_peak_rss_mib(fn, inputs), *comm)
    return rows


def _worker(rank, world, port, args, queue):
    torch.set_num_threads(1)
    if rank == world:  # the single-process baseline, after the ranks are done
        queue.put(("single", _measure(args, None, slice(None))))
        return
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=1800))
    traffic = _Traffic()
    sizes = [args.vocab // world + (r < args.vocab % world) for r in range(world)]
    start = sum(sizes[:rank])
    queue.put((rank, _measure(args, dist.group.WORLD, slice(start, start + sizes[rank]), traffic)))
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the spawned interpreters (see kdloss.bench)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    ranks = [ctx.Process(target=_worker, args=(r, args.world, port, args, queue)) for r in range(args.world)]
    for p in ranks:
        p.start()
    results = dict(queue.get() for _ in ranks)
    for p in ranks:
        p.join()
    baseline = ctx.Process(target=_worker, args=(args.world, args.world, port, args, queue))
    baseline.start()
    results.update([queue.get()])
    baseline.join()
    print(f"N={args.rows}, V={args.vocab}, k={args.k}, H={args.hidden} (fused), fp32, W={args.world}, "
          f"1 thread per process, torch {torch.__version__}")
    print("| loss | process | fwd+bwd ms | peak extra RSS MiB | collectives/step | sent B/step | received B/step |")
    print("|---|---|---|---|---|---|---|")
    for loss in ("topk_kl", "fused"):
        for who in ["single", *range(args.world)]:
            ms, rss, calls, sent, received = results[who][loss]
            label = "single process" if who == "single" else f"rank {who}"
            print(f"| {loss} | {label} | {ms:.1f} | {rss:.1f} | {calls} | {sent} | {received} |")


if __name__ == "__main__":
    main()
