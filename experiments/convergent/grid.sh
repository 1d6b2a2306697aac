#!/usr/bin/env bash
# The PRE-REGISTERED grid of the convergent digits setting (README.md): written before any IGDM-vs-base result was seen.
# Usage (from anywhere): bash experiments/convergent/grid.sh [teacher|gate|main|alpha|table6|all|bn]   (default: all; bn is exploratory)
#   EPOCHS=320 bash ... trains the students for 320 epochs instead of 160 (the rule of `gate`, README.md).
#   LANE=k LANES=n runs only every n-th student of the sequence (k = 0..n-1): n such processes, one thread each, run
#   the grid in parallel without touching each other's folders (a scheduling option; the grid is the same).
#   SEEDS="1 2" runs only those seeds' students (default 0-4). CLAIMS=DIR makes processes share the work dynamically:
#   each student is claimed by creating DIR/<name> (mkdir, atomic) and skipped by every other process that finds it
#   claimed; start every process with the same DIR, and empty DIR after an interruption (a claim is not a result).
#   DRY=1 prints the commands without running them. Resumable: a finished run (its metrics.json) is skipped and a killed
#   one continues from its last complete epoch (--resume); rerun the same line after an interruption.
# One process, one thread (OMP_NUM_THREADS=1); logs in experiments/convergent/grid/*.log (not committed).
set -euo pipefail
cd "$(dirname "$0")/../.."
IGDMFAST=${IGDMFAST:-.venv/bin/igdmfast}
OUT=experiments/convergent/grid
export MPLBACKEND=Agg OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
SEEDS=(${SEEDS:-0 1 2 3 4})
# the setting: sklearn digits (1,437 train / 360 validation, 8x8x1), Linf 64/255, step 16/255, 10 steps, batch 128
COMMON=(--data digits --eps 64 --steps 10 --bs 128 --resume)
T=$OUT/teacher/teacher.pt
EPOCHS=${EPOCHS:-160}   # the pilot's 80 -> 160 epochs gained 5.8 points of PGD-20 (README.md)
STUDENT=(--student tiny_mobilenet_cifar --teacher $T --n-aa 0)
# IGDM's alpha per method, fixed in advance: igdmfast's default for data outside the paper's table (its CIFAR-10 /
# ResNet-18 / LTD row), written out so that a later change of that default does not change the grid
declare -A ALPHA=([ard]=5 [rslad]=0.9 [adaad]=5)

run() {  # run a command unless DRY=1
  if [ "${DRY:-0}" = 1 ]; then echo "$*"; else "$@"; fi
}
N_STUDENT=0
student() {  # NAME, then the train options of the variant: train (unless finished), then AutoAttack on all 360 images
  local name=$1; shift
  N_STUDENT=$((N_STUDENT + 1))
  [ $(((N_STUDENT - 1) % ${LANES:-1})) = "${LANE:-0}" ] || return 0
  if [ -n "${CLAIMS:-}" ]; then mkdir -p "$CLAIMS"; mkdir "$CLAIMS/${name//\//_}" 2>/dev/null || return 0; fi
  [ -f $OUT/$name/metrics.json ] || run "$IGDMFAST" train "${COMMON[@]}" "${STUDENT[@]}" --epochs $EPOCHS "$@" --out $OUT/$name
  [ -f $OUT/${name}_aa/metrics.json ] || run "$IGDMFAST" eval $OUT/$name/student.pt --data digits --eps 64 --attacks aa --seed 0 --out $OUT/${name}_aa
}
teacher() {  # small_cnn, PGD-AT, 100 epochs, seed 0; then AutoAttack on all 360 validation images (a separate eval)
  [ -f $OUT/teacher/metrics.json ] || run "$IGDMFAST" teacher "${COMMON[@]}" --arch small_cnn --method pgd_at --epochs 100 --seed 0 --n-aa 0 --out $OUT/teacher
  [ -f $OUT/teacher_aa/metrics.json ] || run "$IGDMFAST" eval $OUT/teacher/teacher.pt --data digits --eps 64 --attacks aa --seed 0 --out $OUT/teacher_aa
}
gate() {  # the convergence gate, before main: base ARD, AdaAD and PGD-AT students of seed 0 at 160 and at 320 epochs
  for e in 160 320; do
    for m in ard adaad pgd_at; do EPOCHS=$e student gate/${m}_e${e} --method $m --no-igdm --seed 0; done
  done
}
main() {  # ARD, RSLAD, AdaAD, each without and with IGDM (alpha above), seeds 0-4; plus the PGD-AT student of each seed
  for s in "${SEEDS[@]}"; do
    for m in ard rslad adaad; do
      student main/${m}_s$s --method $m --no-igdm --seed $s
      student main/${m}_igdm_s$s --method $m --igdm --alpha ${ALPHA[$m]} --seed $s
    done
    student main/pgd_at_s$s --method pgd_at --no-igdm --seed $s
  done
}
alpha() {  # ARD+IGDM with alpha in {0, 1, 2, 10, 20, 50}, seeds 0-4 (alpha 5 and the base are main's runs)
  for s in "${SEEDS[@]}"; do
    for a in 0 1 2 10 20 50; do student alpha/ard_igdm_a${a}_s$s --method ard --igdm --alpha $a --seed $s; done
  done
}
table6() {  # AdaAD with the teacher-free inner maximization (--inner student_ce), without and with IGDM, seeds 0-4
  for s in "${SEEDS[@]}"; do
    student table6/adaad_tf_s$s --method adaad --inner student_ce --no-igdm --seed $s
    student table6/adaad_tf_igdm_s$s --method adaad --inner student_ce --igdm --alpha ${ALPHA[adaad]} --seed $s
  done
}
bn() {  # EXPLORATORY, outside the pre-registered grid: added on 2026-12-03 after the alpha = 0 runs and bn_check.py (README.md).
        # ARD+IGDM with --igdm-bn keep (IGDM's student forward at x − δ leaves BatchNorm's running statistics alone), at the
        # main grid's alpha 5 and at alpha 0, seeds 0 and 1. Needs a library with --igdm-bn (bef67cc or later), not 32ea369.
  for s in 0 1; do student bn/ard_igdm_a5_keep_s$s --method ard --igdm --alpha 5 --igdm-bn keep --seed $s; done
  for s in 0 1; do student bn/ard_igdm_a0_keep_s$s --method ard --igdm --alpha 0 --igdm-bn keep --seed $s; done
}
what=${1:-all}
case $what in
  teacher) teacher ;;
  gate) teacher; gate ;;
  main) teacher; main ;;
  alpha) teacher; alpha ;;
  table6) teacher; table6 ;;
  all) teacher; gate; main; alpha; table6 ;;
  bn) teacher; bn ;;   # exploratory, not part of 'all'
  *) echo "usage: bash experiments/convergent/grid.sh [teacher|gate|main|alpha|table6|all|bn]"; exit 2 ;;
esac
