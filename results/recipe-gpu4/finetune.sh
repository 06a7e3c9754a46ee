#!/bin/bash
# Second device call of the ninth session: flash-only fine-tunes of the shipped model
# (flash_finetune.py) side by side, MIN minutes each, with and without one-object videos first,
# then flash_shortcut.py on each. Usage: finetune.sh OUTDIR [MIN]
OUT=${1:?outdir}; MIN=${2:-4.5}; DEV=${DEV:-cuda}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
rm -rf /tmp/ft; mkdir -p "$OUT" /tmp/ft
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
ft() {
  name=$1; shift
  ( timeout $(python3 -c "print(int($MIN * 60 + 60))") python3 results/recipe-cpu/flash_finetune.py /tmp/ft/$name \
      --minutes $MIN --device $DEV "$@" > "$OUT/ft_$name.log" 2>&1
    python3 results/recipe-cpu/flash_shortcut.py /tmp/ft/$name --n ${FLASHN:-80} >> "$OUT/ft_$name.log" 2>&1 ) &
}
ft P1
ft P2 --stages 0.3
ft P3 --stages 0.5
ft P4 --stages 0.33,0.67
ft P5 --stages 0.3 --lr 1e-3
ft P6 --stages 0.33,0.67 --seed 8
wait
for f in "$OUT"/ft_*.log; do echo "== $f"; grep -E "^step" "$f" | awk 'NR%4==0'; grep -E "object|same" "$f"; done
