#!/usr/bin/env bash
# One candidate run under run 34's rule, end to end (thirty-fourth session): check the CPU, train
# from a snapshot clone of HEAD, run the eval chain and print the gates. Written after run 42 was
# started on a CPU its rule did not name and stopped 40 minutes in (README.md, run 42).
#
# Usage: results/recipe-cpu/summary_tower/run_candidate.sh RUN [EXTRA TRAIN FLAGS...]
#   e.g. results/recipe-cpu/summary_tower/run_candidate.sh 43 --summary-weight 3 --vision-steps 3000
# The base command is run 39's (run 31's + --flash-stretch 0.30:0.56:0.25 + --data-parallel 2, which
# since the thirty-fifth session runs stage 1 in the two ranks too: 1.29x, the same steps).
# The shipped model since the forty-second session, run 56, is `run_candidate.sh 56 --summary-weight 3
# --vision-steps 3000 --seed 3` (shipped against its rule's floor: README.md, run 56); gates.py still
# judges against run 31's sweep, so a rule for the next candidate should name run 56's (fidelity_run56/).
# Results land in this folder under run 34's names (eval_seed15_n1800_runRUN.json, ...), the full
# test run with the candidate in place in runRUN_tests.txt; the model stays in /work/runRUN/model.
# FORCE=1 trains on a CPU without AVX-512 (its 57 minutes buy about half of runs 39-41's stage-2
# steps, so a verdict would measure the CPU).
# A smoke test of the script itself (not a candidate): FORCE=1 SMOKE=1 run_candidate.sh 0 --steps 20
# --vision-steps 10 shrinks every evaluation to a few samples.
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,/^set /{/^#/p}' "$0"; exit 2; }  # the header comment
RUN=$1; shift
REPO=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
HERE=$REPO/results/recipe-cpu/summary_tower
SNAP=/work/run$RUN

if ! grep -qw avx512f /proc/cpuinfo && [ "${FORCE:-0}" != 1 ]; then
    echo "refusing: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-) has no AVX-512;" \
         "run 34's rule is tuned to the AVX-512 Xeon (FORCE=1 to train anyway)" >&2
    exit 3
fi
# the host's steal time over 10 s: run 41's first start lost a quarter of the CPU to it
read -r _ u1 n1 s1 i1 w1 q1 sq1 st1 _ < /proc/stat; sleep 10
read -r _ u2 n2 s2 i2 w2 q2 sq2 st2 _ < /proc/stat
total=$(( (u2+n2+s2+i2+w2+q2+sq2+st2) - (u1+n1+s1+i1+w1+q1+sq1+st1) ))
steal=$(( 100 * (st2 - st1) / (total > 0 ? total : 1) ))
echo "CPU stolen by the host over 10 s: ${steal}%"
if [ "$steal" -gt 5 ] && [ "${FORCE:-0}" != 1 ]; then
    echo "refusing: more than 5% stolen; wait for a quiet host (FORCE=1 to train anyway)" >&2
    exit 3
fi

[ -e "$SNAP" ] && { echo "$SNAP exists; remove it or pick another run number" >&2; exit 2; }
git clone -q "$REPO" "$SNAP"
cd "$SNAP"
export PYTHONPATH=$SNAP  # the snapshot's mmaccel and scripts, not the editable install's tree
echo "snapshot $(git rev-parse --short HEAD) in $SNAP"
S=$SNAP/results/recipe-cpu/summary_tower

python -m mmaccel.embedded.train --out "$SNAP/model" --minutes 57 --seed 2 --eval-n 100 \
    --init-std 0.06 --order question-both --followups 8 \
    --vision-steps 2000 --vision-dense --freeze-tower \
    --extra-followups flash,caption --loss-mean tokens --bf16 --compile \
    --background-dropout 0.9 --content-from pixels --summary token --summary-channels 64 \
    --stop-rows 0.15 --decay-from 0.8 --stop-rows-media image --caption-stretch 0.62:0.78:1 \
    --flash-stretch 0.30:0.56:0.25 --data-parallel 2 "$@" \
    --log "$HERE/train_log_run$RUN.txt"
cp "$SNAP/model/train_config.json" "$HERE/run${RUN}_train_config.json"
[ -f "$SNAP/model/quick_eval.json" ] && cp "$SNAP/model/quick_eval.json" "$HERE/run${RUN}_quick_eval.json"

M=$SNAP/model
if [ "${SMOKE:-0}" = 1 ]; then sizes=(18 6 9 18); else sizes=(1800 600 450 900); fi
python -m mmaccel.embedded.evaluate --model "$M" --n "${sizes[0]}" --seed 15 --json "$HERE/eval_seed15_n1800_run$RUN.json"
N=${sizes[1]} OUT="$HERE/captions600_run$RUN.json" python "$S/caption_failures.py" "$M"
python -m mmaccel.embedded.evaluate --model "$M" --n "${sizes[2]}" --json "$HERE/eval_seed0_n450_run$RUN.json"
python -m mmaccel.embedded.evaluate --model "$M" --n "${sizes[2]}" --blank --json "$HERE/eval_seed0_n450_blank_run$RUN.json"
python -m mmaccel.cli bench fidelity --sweep --model "$M" --n "${sizes[3]}" --retentions 0.25,0.11 --out "$HERE/fidelity_run$RUN"
python "$S/gates.py" "$HERE/eval_seed15_n1800_run$RUN.json" "$HERE/fidelity_run$RUN/fidelity.json" \
    "$HERE/captions600_run$RUN.json" "$HERE/eval_seed0_n450_blank_run$RUN.json" | tee "$HERE/run${RUN}_gates.txt"
[ "${SMOKE:-0}" = 1 ] && { echo "SMOKE=1: no full test run (a smoke model is not meant to pass it)"; exit 0; }
# the rule's last gate: the full test run with the candidate in place of the shipped model, in the
# snapshot (its tree is the one the candidate would ship in)
cp "$M"/* "$SNAP/mmaccel/assets/default_model/"
git -C "$SNAP" status --short mmaccel/assets/default_model | sed 's/^/replaced in the snapshot: /'
set +e
python -m pytest -q -p no:cacheprovider "$SNAP/tests" > "$HERE/run${RUN}_tests.txt" 2>&1
rc=$?
set -e
tail -n 3 "$HERE/run${RUN}_tests.txt"
echo "full test run with run $RUN in place: exit $rc (log: run${RUN}_tests.txt)"
