#!/bin/bash
# A/B on one device machine: speed bench at 22eb45d (.ab/old) vs HEAD, 7B decoder bf16, alternating.
OUT=${1:?out}; R=/tmp/ab; rm -rf $R; mkdir -p $R
trap 'tar -czf "$OUT/ab.tar.gz" -C $R .' EXIT
source results/speed-gpu/device_env.sh
SITE=${PYTHONPATH%%:*}
run() { # tag code batch
  local pp=$PWD; [ $2 = old ] && pp=$PWD/.ab/old
  (cd $pp && PYTHONPATH=$SITE:$pp timeout 90 python3 -m mmaccel.cli bench speed --device cuda --dtype bfloat16 --llm 7b --batch $3 \
    --methods aim,random,fastv,mustdrop --retentions 0.25,0.11 --repeats 10 --warmup 3 --out $R/$1 > $R/$1.log 2>&1); local rc=$?
  python3 -c "import sys; sys.path[:0]=['$pp']; import mmaccel; print(mmaccel.__file__)" >> $R/$1.log
  echo "== $1 ($2, batch $3, rc $rc)"; grep "^| [a-z]" $R/$1/speed.md | grep -v method | cut -d'|' -f2,3,5,6,7,10,11
}
run b8_old1 old 8; run b8_new1 new 8; run b8_old2 old 8; run b8_new2 new 8
run b1_old1 old 1; run b1_new1 new 1
