#!/bin/bash
# Device call of the sixth session: do the opt-in follow-up kinds (flash counts of the
# other objects, a caption turn on every small still scene), a token-mean loss or a
# larger flash share move `flash` and `caption` off their plateaus? Six variants of the
# fifth-session recipe side by side on one GPU, each 1,000 stage-1 steps and a STEPS-step
# stage 2 (about half the CPU run's 5,723), capped at CAP minutes, then a held-out
# evaluation of EVALN samples. Usage: [SET=1|2] run.sh OUTDIR [STEPS] [CAP]
OUT=${1:?outdir}; STEPS=${2:-3000}; CAP=${3:-7.3}; DEV=${DEV:-cuda}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
rm -rf /tmp/runs; mkdir -p "$OUT" /tmp/runs
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
RECIPE="--init-std 0.06 --order question-both --followups 8 --vision-dense --freeze-tower"
run() {
  name=$1; seed=$2; shift 2
  timeout $(python3 -c "print(int($CAP * 60 + 90))") python3 -m mmaccel.embedded.train --out /tmp/runs/$name \
    --device $DEV --workers 2 --stage1-workers 2 --threads 1 --eval-n ${EVALN:-450} --vision-steps ${VSTEPS:-1000} \
    --minutes $CAP --steps $STEPS --seed $seed $RECIPE --log /tmp/runs/$name.log "$@" > /tmp/runs/$name.out 2>&1 &
}
if [ "${SET:-1}" = 1 ]; then
  run A 0
  run B 0 --extra-followups flash,caption
  run C 0 --extra-followups flash,caption --loss-mean tokens
  run D 0 --extra-followups flash,caption --family-weights flash=2.4
  run E 1
  run F 1 --extra-followups flash,caption
else  # second call (SET=2): two more seeds of the base / extra / extra + token-mean triple
  for s in 2 3; do
    run G$s $s
    run H$s $s --extra-followups flash,caption
    run I$s $s --extra-followups flash,caption --loss-mean tokens
  done
fi
wait
for f in /tmp/runs/*.log; do echo "== $f"; grep -E "stage|held-out" $f; grep -A 16 "held-out" $f | tail -15; done
rm -f /tmp/runs/*/*.safetensors
cp /tmp/runs/*.log "$OUT"/
