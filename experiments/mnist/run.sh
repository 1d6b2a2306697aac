#!/usr/bin/env bash
# The same on MNIST (shared/data/mnist.npz) in the classic setting: Linf eps 0.3 (= 76.5/255), step 0.075, 10 steps.
# Resumable: rerun this script after an interruption. Run from anywhere: `bash experiments/mnist/run.sh`.
set -euo pipefail
cd "$(dirname "$0")/../.."
IGDMFAST=${IGDMFAST:-.venv/bin/igdmfast}
DATA=${DATA:-../shared/data/mnist.npz}
OUT=experiments/mnist
COMMON=(--data "$DATA" --eps 76.5 --steps 10 --bs 128 --n-train 10000 --n-valid 1000 --n-aa 100 --resume)
time "$IGDMFAST" teacher "${COMMON[@]}" --arch small_cnn --method pgd_at --epochs 6 --seed 0 --out $OUT/teacher
T=$OUT/teacher/teacher.pt
time "$IGDMFAST" compare "${COMMON[@]}" --teacher $T --student tiny_mobilenet_cifar --methods ard,rslad,adaad --epochs 3 --seed 0 --out $OUT/compare
time "$IGDMFAST" train "${COMMON[@]}" --teacher $T --student tiny_mobilenet_cifar --method pgd_at --no-igdm --epochs 3 --seed 0 --out $OUT/pgd_at
time "$IGDMFAST" compare "${COMMON[@]}" --teacher $T --student tiny_mobilenet_cifar --methods ard --epochs 3 --seed 1 --out $OUT/compare_seed1
