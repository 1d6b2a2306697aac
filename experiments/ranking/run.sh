#!/bin/bash
# experiments/ranking: teachers, then the ranking (before any student), then 8 ARD students and their AutoAttack.
# Resumable: every finished step is skipped. One process at a time, one thread.
set -e
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=$PWD
PY=${PY:-/work/main/.venv/bin/python}
E=experiments/ranking
TEACHERS="pgd_at_w16 trades_w16 pgd_at_w64 trades_w64"
COMMON="--data digits --eps 64 --steps 10 --bs 128 --device cpu --threads 1"
lscpu | grep 'Model name' || true
date; $PY $E/teachers.py
if [ ! -f $E/rank/ranking.json ]; then
  date; $PY -m igdmfast.cli rank-teachers --teachers $(for t in $TEACHERS; do printf "$E/teachers/$t/teacher.pt,"; done | sed 's/,$//') \
    --student tiny_mobilenet_cifar --ref-methods pgd_at,trades --ref-seeds 0 --ref-epochs 30 $COMMON --force --out $E/rank
fi
for s in 0 1; do for t in $TEACHERS; do
  d=$E/students/${t}_s$s
  if [ ! -f $d/metrics.json ]; then
    date; $PY -m igdmfast.cli train --teacher $E/teachers/$t/teacher.pt --student tiny_mobilenet_cifar --method ard --no-igdm \
      --epochs 30 --seed $s --n-aa 0 $COMMON $([ -f $d/config.json ] && echo --resume) --out $d
  fi
  if [ ! -f $d/aa/metrics.json ]; then
    date; $PY -m igdmfast.cli eval $d/student.pt --attacks aa --n 200 --seed 0 --eps 64 --data digits --device cpu --threads 1 --force --out $d/aa
  fi
done; done
date; echo done
