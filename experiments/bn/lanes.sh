#!/usr/bin/env bash
# Issue #26: start the grid's remaining runs on two lanes (one process, one thread each), as the session log prescribes.
# Lane 1 runs setting 2's grid (the CIFAR-10 subset); lane 2 runs setting 1's digits grid, then joins setting 2's grid.
# The lanes share runs through claims (an atomic mkdir per run in CLAIMS), so nothing runs twice; a killed run resumes
# from its last complete epoch. Claims of killed runs would block them, so CLAIMS is emptied first: start this only
# when no lane is running. Logs: /tmp/lane_c.log and /tmp/lane0.log.   Usage: bash experiments/bn/lanes.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
if pgrep -f "experiments/bn/grid.sh" > /dev/null; then echo "a grid.sh lane is running: stop it first (lanes.sh empties the claims)"; exit 1; fi
CLAIMS=${CLAIMS:-/tmp/claims}; rm -rf "$CLAIMS"; mkdir -p "$CLAIMS"; export CLAIMS VARIANT=keep
CIFAR=(DATASET=cifar N=3000 E=20 TEACHER=tiny_resnet_cifar TE=40 TN=10000)
nohup setsid env "${CIFAR[@]}" bash experiments/bn/grid.sh fashion > /tmp/lane_c.log 2>&1 &
nohup setsid bash -c "bash experiments/bn/grid.sh digits; env ${CIFAR[*]} bash experiments/bn/grid.sh fashion" > /tmp/lane0.log 2>&1 &
echo "lanes started: setting 2 (/tmp/lane_c.log); digits, then setting 2 (/tmp/lane0.log)"
