#!/bin/bash
# Second device call (2026-11-26): what moves `exists` off its chance plateau? Five
# variants side by side, trained only on color / count / exists / where with at most two
# objects per scene (the curriculum's first phase), 400 stage-1 steps, then a step
# schedule capped at CAP minutes, each followed by a held-out evaluation.
# Usage: probe.sh OUTDIR [SCALE] [CAP]
OUT=${1:?outdir}; SCALE=${2:-1.0}; CAP=${3:-5.6}; DEV=${DEV:-cuda}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
mkdir -p "$OUT" /tmp/probe
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
steps() { python3 -c "print(max(10, int($1 * $SCALE)))"; }
run() {
  name=$1; n=$(steps $2); shift 2
  timeout $(python3 -c "print(int($CAP * 60 + 60))") python3 -m mmaccel.embedded.train --out /tmp/probe/$name \
    --device $DEV --workers 2 --threads 1 --eval-n ${EVALN:-180} --vision-steps ${VSTEPS:-400} --minutes $CAP \
    --steps $n --families exists,count,color,where --max-objects 2 \
    --log /tmp/probe/$name.log "$@" > /tmp/probe/$name.out 2>&1 &
}
run P1 3600 --followups 0
run P2 3600 --followups 8
run P3 3600 --followups 8 --lr 1e-3
run P4 3600 --followups 8 --summary mean
run P5 3600 --followups 8 --summary token
wait
for f in /tmp/probe/*.log; do echo "== $f"; grep -E "stage|summary acc" $f | tail -2; grep -E "^\[.*step [0-9]+ loss" $f | awk 'NR%20==0'; grep -A6 "quick eval" $f | tail -4; done
rm -f /tmp/probe/*/*.safetensors
tar czf "$OUT/probe.tar.gz" -C /tmp/probe .
