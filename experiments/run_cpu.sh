#!/usr/bin/env bash
# Both CPU experiments, one after the other (about 1-2 hours on 2 cores); resumable. Logs in experiments/*/log.txt.
set -euo pipefail
cd "$(dirname "$0")"
export MPLBACKEND=Agg OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread: steadier on a shared 2-core machine
bash cifar10/run.sh > cifar10/log.txt 2>&1
bash mnist/run.sh > mnist/log.txt 2>&1
