#!/bin/bash
# One device call (2026-11-26): the GPU kernel test and timings, then five stage-2 recipe
# variants side by side on one GPU, each a step schedule of about half the shipped CPU
# run's budget (step counts scaled by each variant's measured CPU cost per step), capped
# at CAP minutes, each followed by a held-out evaluation. Usage: run.sh OUTDIR [SCALE] [CAP]
OUT=${1:?outdir}; SCALE=${2:-1.0}; CAP=${3:-6.3}; DEV=${DEV:-cuda}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
mkdir -p "$OUT" /tmp/runs
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
if [ "$DEV" = cuda ]; then
  nvidia-smi -L
  TRITON_INTERPRET=0 timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -5 | tee "$OUT/pytest.txt"
  timeout 150 python3 -m mmaccel.bench.kernels --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.md"
fi
steps() { python3 -c "print(max(10, int($1 * $SCALE)))"; }
run() {
  name=$1; n=$(steps $2); shift 2
  timeout $(python3 -c "print(int($CAP * 60 + 150))") python3 -m mmaccel.embedded.train --out /tmp/runs/$name \
    --device $DEV --workers 2 --threads 1 --eval-n ${EVALN:-270} --vision-steps ${VSTEPS:-800} --minutes $CAP --steps $n \
    --log /tmp/runs/$name.log "$@" > /tmp/runs/$name.out 2>&1 &
}
run A 3800 --followups 0
run B 3200 --followups 4
run C 2900 --followups 8
run D 2450 --followups 8 --text-layers 6
run E 2900 --followups 8 --lr 6e-4
wait
for f in /tmp/runs/*.log; do echo "== $f"; grep -v "vision pretrain" $f | tail -4; done
rm -f /tmp/runs/*/*.safetensors
tar czf "$OUT/runs.tar.gz" -C /tmp/runs .
