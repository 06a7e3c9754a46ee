#!/bin/bash
# Tenth session: does a deeper language model learn flash's binding? Flash-only fine-tunes of the
# shipped model (run 13) on this 2-core CPU, 2,000 steps each, 1-3 objects throughout (the
# ninth session's P1 protocol), as it is (4 layers) and with two fresh layers inserted after
# layers 1 and 3 (6 layers); then flash_shortcut.py on each. Usage: run.sh OUTDIR
OUT=${1:?outdir}; mkdir -p "$OUT" /tmp/depth_ft
export PYTHONUNBUFFERED=1
for arm in "L4:" "L6:1,3"; do
  name=${arm%%:*}; grow=${arm#*:}
  python results/recipe-cpu/flash_finetune.py /tmp/depth_ft/$name --steps 2000 --minutes 60 \
      ${grow:+--grow-after $grow} > "$OUT/$name.log" 2>&1
  python results/recipe-cpu/flash_shortcut.py /tmp/depth_ft/$name --n 80 >> "$OUT/$name.log" 2>&1
done
