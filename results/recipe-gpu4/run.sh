#!/bin/bash
# Device call of the ninth session: does a flash-only stretch of the curriculum (8-frame flash
# videos alone, optionally of one object) teach the model to count an object's missing
# frames? Six variants of the background-dropout recipe with shuffled turns side by side on
# one GPU, each VSTEPS stage-1 steps and a STEPS-step stage 2 (under half the CPU run's
# ~7,500), capped at CAP minutes, then a held-out evaluation of EVALN samples and
# flash_shortcut.py (80 videos, each asked about the vanishing and a steady object).
# Logs go straight to OUT, so a run cut short still leaves its losses.
# Usage: run.sh OUTDIR [STEPS] [CAP]
OUT=${1:?outdir}; STEPS=${2:-3000}; CAP=${3:-5.0}; DEV=${DEV:-cuda}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
rm -rf /tmp/runs; mkdir -p "$OUT" /tmp/runs
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
RECIPE="--init-std 0.06 --order question-both --followups 8 --vision-dense --freeze-tower
  --extra-followups flash,caption --loss-mean tokens --bf16 --background-dropout 0.9 --shuffle-turns"
run() {
  name=$1; seed=$2; shift 2
  ( timeout $(python3 -c "print(int($CAP * 60 + 90))") python3 -m mmaccel.embedded.train --out /tmp/runs/$name \
      --device $DEV --workers 2 --stage1-workers 2 --threads 1 --eval-n ${EVALN:-450} --vision-steps ${VSTEPS:-1000} \
      --minutes $CAP --steps $STEPS --seed $seed $RECIPE --log "$OUT/$name.log" "$@" > /tmp/runs/$name.out 2>&1
    python3 results/recipe-cpu/flash_shortcut.py /tmp/runs/$name --n ${FLASHN:-80} >> "$OUT/$name.log" 2>&1 ) &
}
run A 0
run B 0 --flash-stretch 0.35:0.55:0.5
run C 0 --flash-stretch 0.35:0.55:0.5:1
run D 0 --flash-stretch 0.15:0.55:0.4:1
run E 0 --flash-stretch 0.35:1.0:0.25
run F 1 --flash-stretch 0.15:0.55:0.4:1
wait
for f in "$OUT"/*.log; do echo "== $f"; grep -E "stage|all |flash|same answer|object " "$f" | tail -12; done
for n in A B C D E F; do tail -3 /tmp/runs/$n.out; done
