#!/usr/bin/env bash
# Issue #29's measurement (README.md here, written before the first run): per seed, one `igdmfast train --keep swa`
# run of experiments/bn/grid.sh's digits ARD base setting, its four students (weights.py), AutoAttack on each.
# Usage (from anywhere): bash experiments/keep/run.sh        SEEDS="0 1" by default; DRY=1 prints the commands.
# Resumable: a finished step (its metrics.json / weights.json) is skipped, a killed training continues (--resume).
# The library is FROZEN at commit $COMMIT (an export of its igdmfast/ on PYTHONPATH), one process, one thread.
set -euo pipefail
cd "$(dirname "$0")/../.."
COMMIT=ef921a5   # the library of `--keep swa` (#29 item 1); this folder's own scripts are read from the working tree
FROZEN=/tmp/igdmfast-frozen-keep-$COMMIT
if [ ! -f "$FROZEN/igdmfast/__init__.py" ]; then mkdir -p "$FROZEN"; git archive $COMMIT igdmfast | tar -x -C "$FROZEN"; fi
export PYTHONPATH=$FROZEN MPLBACKEND=Agg OMP_NUM_THREADS=1
PY=${PY:-/work/main/.venv/bin/python}
IGDMFAST=${IGDMFAST:-/work/main/.venv/bin/igdmfast}   # the console script: `python -m` would put the working tree first on sys.path
got=$(cd / && "$PY" -c 'import igdmfast; print(igdmfast.__file__)')   # the console script and weights.py do not put the working tree on sys.path
[ "$got" = "$FROZEN/igdmfast/__init__.py" ] || { echo "FAIL: igdmfast imports from $got, not $FROZEN"; exit 1; }
OUT=experiments/keep/runs
T=experiments/convergent/grid/teacher/teacher.pt
run() { local log=$1; shift; if [ "${DRY:-0}" = 1 ]; then echo "$*"; else "$@" > "$log" 2>&1; fi; }
mkdir -p $OUT
for s in ${SEEDS:-0 1}; do
  r=$OUT/ard_s$s
  [ -f $r/metrics.json ] || run $r.log "$IGDMFAST" train --data digits --eps 64 --steps 10 --bs 128 --student tiny_mobilenet_cifar \
      --teacher $T --epochs 160 --method ard --no-igdm --seed $s --n-aa 0 --keep swa --holdout 0.1 --keep-every 1 --resume --out $r
  [ -f $r/weights/weights.json ] || run $r.weights.log "$PY" experiments/keep/weights.py $r
  for w in last best swa_adv swa_clean; do
    [ -f ${r}_aa/$w/metrics.json ] || run ${r}_aa.$w.log "$IGDMFAST" eval $r/weights/$w.pt --data digits --eps 64 \
        --attacks aa --seed 0 --out ${r}_aa/$w
  done
done
