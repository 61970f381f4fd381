#!/usr/bin/env bash
# The CPU performance targets of the top-k, fused-head, SinKD and TRG losses, with and without
# torch's THP switch: bash benchmarks/cpu_targets.sh (from the repository root, kdloss installed;
# run on an idle machine, ~10 min on 2 cores).
set -u

export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$(mktemp -d)}"
O="${KDLOSS_BENCH_OUT:-$(mktemp -d)}"
for thp in 0 1; do
  if [ $thp = 1 ]; then export THP_MEM_ALLOC_ENABLE=1; else unset THP_MEM_ALLOC_ENABLE; fi
  for dt in float32 bfloat16; do
    echo "=== topk thp=$thp $dt"; timeout 400 python -m kdloss.bench.topk_kl --threads 2 --repeat 9 --dtype $dt --only "N=2048 V=32000" 2>&1 | grep -v "^kdloss: comp"
  done
  echo "=== topk shifted thp=$thp"; timeout 300 python -m kdloss.bench.topk_kl --threads 2 --repeat 9 --dtype float32 --only "T=512" 2>&1 | grep -v "^kdloss: comp"
  echo "=== fused thp=$thp"; timeout 600 python -m kdloss.bench.fused_linear_topk_kl --shape 1024,1024,32000,64 --dtype float32 --threads 2 --repeat 5 2>&1 | grep -v "^kdloss: comp"
done
unset THP_MEM_ALLOC_ENABLE
echo "=== fused rss"; timeout 600 python -m kdloss.bench.fused_linear_topk_kl --shape 1024,1024,32000,64 --dtype float32 --threads 2 --repeat 2 --rss 2>&1 | grep -v "^kdloss: comp"
echo "=== sinkhorn"; timeout 400 python -m kdloss.bench --loss sinkhorn --dtype float32 --threads 2 --no-plot --out $O/sinkhorn 2>&1 | grep -v "^kdloss: comp"
echo "=== contextual"; timeout 400 python -m kdloss.bench --loss token_contextual --dtype float32 --dtype bfloat16 --threads 2 --no-plot --out $O/ctx 2>&1 | grep -v "^kdloss: comp"
echo "=== graph"; timeout 500 python -m kdloss.bench --loss token_graph --dtype float32 --threads 2 --repeat 5 --no-plot --out $O/graph 2>&1 | grep -v "^kdloss: comp"
echo "=== contrastive"; timeout 500 python -m kdloss.bench --loss token_contrastive --dtype float32 --threads 2 --repeat 5 --no-plot --out $O/con 2>&1 | grep -v "^kdloss: comp"
