#!/bin/bash
# Device call of the seventeenth session: the CUDA tests again (the code changed since the
# fifteenth session's call), then profile_methods.py on the 7B decoder at batch 1 and 8.
# Usage: run_profile.sh OUT   (everything lands in OUT/profile.tar.gz)
OUT=${1:?outdir}
R=/tmp/profile-gpu; rm -rf $R; mkdir -p $R
trap 'tar -czf "$OUT/profile.tar.gz" -C $R .' EXIT
source results/speed-gpu/device_env.sh
TRITON_INTERPRET=0 timeout ${TEST_S:-150} python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_gpu.py \
  tests/test_kernels.py 2>&1 | tee $R/gpu_tests.log | tail -n 6
for b in 1 8; do
  timeout ${PROF_S:-90} python3 results/speed-gpu/profile_methods.py $R/7b_b$b --llm 7b --batch $b \
    --methods fastv,random,aim,mustdrop,visionzip 2>&1 | grep -v USDT | tail -n 8
done
# then the speed benchmark (SPEED=1), as in run.sh, 7B only
M=fastv,pool,random,aim,visionzip,mustdrop
for b in ${SPEED:+1 8}; do
  timeout ${SPEED_S:-100} python3 -m mmaccel.cli bench speed --device cuda --dtype bfloat16 --llm 7b --batch $b \
    --methods $M --retentions 0.25,0.11 --repeats ${REPEATS:-5} --warmup 3 --out $R/speed_7b_b$b > $R/speed_7b_b$b.log 2>&1
  echo "== 7b batch $b (rc $?)"; tail -n 14 $R/speed_7b_b$b.log
done
