#!/usr/bin/env bash
# The same on MNIST (shared/data/mnist.npz) in the classic setting: Linf eps 0.3 (= 76.5/255), step 0.075, 10 steps.
# Resumable: rerun this script after an interruption. Run from anywhere: `bash experiments/mnist/run.sh`.
# The teacher (small_cnn, PGD-AT) sees a seeded class-balanced 10,000 of the 60,000 training images, each student a
# seeded 5,000, for 3 epochs; evaluation on a seeded 1,000-image test subset, AutoAttack (standard) on 100 of them.
# After the teacher, two lanes run side by side (one per CPU core, one thread each); logs in experiments/mnist/*.log.
set -euo pipefail
cd "$(dirname "$0")/../.."
IGDMFAST=${IGDMFAST:-.venv/bin/igdmfast}
DATA=${DATA:-../shared/data/mnist.npz}
OUT=experiments/mnist
export MPLBACKEND=Agg OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
COMMON=(--data "$DATA" --eps 76.5 --steps 10 --bs 128 --n-valid 1000 --n-aa 100 --resume)
STUDENT=(--student tiny_mobilenet_cifar --n-train 5000 --epochs 3)
time "$IGDMFAST" teacher "${COMMON[@]}" --n-train 10000 --arch small_cnn --method pgd_at --epochs 6 --seed 0 --out $OUT/teacher
T=$OUT/teacher/teacher.pt
lane_a() {  # ARD and RSLAD with and without IGDM, then the PGD-AT student
  "$IGDMFAST" compare "${COMMON[@]}" "${STUDENT[@]}" --teacher $T --methods ard,rslad --seed 0 --out $OUT/compare
  "$IGDMFAST" train "${COMMON[@]}" "${STUDENT[@]}" --teacher $T --method pgd_at --no-igdm --seed 0 --out $OUT/pgd_at
}
lane_b() {  # AdaAD with and without IGDM, then the second seed of ARD
  "$IGDMFAST" compare "${COMMON[@]}" "${STUDENT[@]}" --teacher $T --methods adaad --seed 0 --out $OUT/compare_adaad
  "$IGDMFAST" compare "${COMMON[@]}" "${STUDENT[@]}" --teacher $T --methods ard --seed 1 --out $OUT/compare_seed1
}
side_by_side() {  # run two commands at once (one per core); fail if either fails, pointing at its log
  $1 > $OUT/$3.log 2>&1 & local a=$!; $2 > $OUT/$4.log 2>&1 & local b=$!; local ra=0 rb=0
  wait $a || ra=$?; wait $b || rb=$?
  [ $ra = 0 ] && [ $rb = 0 ] || { echo "failed (exit $ra, $rb): see $OUT/$3.log and $OUT/$4.log"; exit 1; }
}
time side_by_side lane_a lane_b lane_a lane_b
# AutoAttack (standard) on a seeded 500 of the 10,000 test images for the ARD pair of seed 0 (the other rows: 100).
aa500() { [ -f $OUT/aa500/$1/metrics.json ] || "$IGDMFAST" eval $OUT/compare/$1/student.pt --data "$DATA" --eps 76.5 --attacks aa --n 500 --out $OUT/aa500/$1; }
aa_ard() { aa500 ard; }; aa_ard_igdm() { aa500 ard_igdm; }
time side_by_side aa_ard aa_ard_igdm aa500_ard aa500_ard_igdm
