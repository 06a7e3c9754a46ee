#!/bin/bash
# Device call of the fourth session: does the language model's init scale or the
# question's place in the prompt shorten the `exists` / `count` plateau? Six variants side
# by side, trained only on color / count / exists / where with at most two objects per
# scene (the curriculum's first phase), no follow-ups, 400 stage-1 steps, then a step
# schedule capped at CAP minutes. Usage: [SET=1|2] probe.sh OUTDIR [STEPS] [CAP]
OUT=${1:?outdir}; STEPS=${2:-4000}; CAP=${3:-8.0}; DEV=${DEV:-cuda}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
rm -rf /tmp/probe; mkdir -p "$OUT" /tmp/probe
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
run() {
  name=$1; shift
  timeout $(python3 -c "print(int($CAP * 60 + 20))") python3 -m mmaccel.embedded.train --out /tmp/probe/$name \
    --device $DEV --workers 2 --threads 1 --eval-n 0 --vision-steps 400 --minutes $CAP \
    --steps $STEPS --families exists,count,color,where --max-objects 2 --followups 0 \
    --log /tmp/probe/$name.log "$@" > /tmp/probe/$name.out 2>&1 &
}
if [ "${SET:-1}" = 1 ]; then  # first call, capped at 8.0 minutes
  run A --lr 1e-3
  run B --lr 1e-3 --init-std 0.06
  run C --lr 1e-3 --order question-first
  run D --lr 1e-3 --order question-first --init-std 0.06
  run E --lr 3e-4 --init-std 0.06
  run F --lr 1e-3 --order question-both --init-std 0.06
else  # second call (SET=2, capped at 4.3 minutes), around the first call's winner E
  run G --lr 3e-4 --init-std 0.1
  run H --lr 5e-4 --init-std 0.06
  run I --lr 3e-4 --init-std 0.06 --order question-both
  run J --lr 2e-4 --init-std 0.06
  run K --lr 3e-4 --init-std 0.06 --followups 8
  run L --lr 3e-4 --init-std 0.04
fi
wait
for f in /tmp/probe/*.log; do echo "== $f"; grep -E "stage" $f | tail -3; grep -E "step [0-9]+ loss" $f | awk 'NR%16==0'; done
rm -rf /tmp/probe/*/
cp /tmp/probe/*.log "$OUT"/
