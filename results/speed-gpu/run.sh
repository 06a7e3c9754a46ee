#!/bin/bash
# Device call of the fifteenth session: the CUDA tests (every method on a CUDA copy of each
# tiny model against the CPU, the Triton kernel compiled), then the prefill speed benchmark in
# bf16 on LLaVA-1.5-shaped decoders of 0.5B and 7B at batch 1 and 8. Each part has its own
# timeout so one failure leaves the others; everything lands in OUT/results.tar.gz.
# Usage: [CONFIGS="7b 1,7b 8"] run.sh OUT [REPEATS]
OUT=${1:?outdir}; REPEATS=${2:-10}
R=/tmp/speed-gpu; rm -rf $R; mkdir -p $R
trap 'tar -czf "$OUT/results.tar.gz" -C $R .' EXIT
source results/speed-gpu/device_env.sh
# TRITON_INTERPRET=0: compile the kernel for the GPU (conftest only defaults it to 1)
TRITON_INTERPRET=0 timeout ${TEST_S:-200} python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_gpu.py \
  tests/test_kernels.py 2>&1 | tee $R/gpu_tests.log | tail -n 25
M=fastv,pool,random,aim,visionzip,mustdrop
IFS=, read -ra CFGS <<< "${CONFIGS:-0.5b 1,0.5b 8,7b 1,7b 8}"
for cfg in "${CFGS[@]}"; do
  set -- $cfg
  timeout ${SPEED_S:-120} python3 -m mmaccel.cli bench speed --device cuda --dtype bfloat16 --llm $1 --batch $2 \
    --methods $M --retentions 0.25,0.11 --repeats $REPEATS --warmup 3 --out $R/speed_$1_b$2 > $R/speed_$1_b$2.log 2>&1
  echo "== $1 batch $2 (rc $?)"; tail -n 14 $R/speed_$1_b$2.log
done
