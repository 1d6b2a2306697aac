#!/usr/bin/env bash
# Issue #26: while the lanes run, commit every finished run (its folder and its _aa folder both have metrics.json) every
# 5 minutes, with decide.py's regenerated decision.json and results.md. It commits through a private index and a
# compare-and-swap on HEAD, so it never touches what the main index has staged and never loses a concurrent commit; a
# finished run's committed resume checkpoint is removed from the tree. Usage: nohup setsid bash experiments/bn/commit_runs.sh &
cd "$(dirname "$0")/../.."
while true; do
  names=()
  for d in experiments/bn/runs/digits/*/ experiments/bn/runs/fashion/size_*/*/ experiments/bn/runs/cifar/size_*/*/ experiments/bn/runs/cifar/size_*/students_*/*/; do
    d=${d%/}; n=$(basename $d); case $n in *_aa) continue;; esac
    [ -f $d/metrics.json ] && [ -f ${d}_aa/metrics.json ] || continue
    git cat-file -e HEAD:$d/metrics.json 2>/dev/null && git cat-file -e HEAD:${d}_aa/metrics.json 2>/dev/null && continue
    names+=($d)
  done
  if [ ${#names[@]} -gt 0 ]; then
    paths=(); ckpts=()
    for d in "${names[@]}"; do
      for f in config.json history.csv teacher_history.csv metrics.json report.md student.pt teacher.pt; do [ -f $d/$f ] && paths+=($d/$f); done
      for f in $d/*.png; do [ -f $f ] && paths+=($f); done
      for f in config.json metrics.json report.md; do [ -f ${d}_aa/$f ] && paths+=(${d}_aa/$f); done
      git cat-file -e HEAD:$d/checkpoint.pt 2>/dev/null && ckpts+=($d/checkpoint.pt)
    done
    PYTHONPATH= .venv/bin/python experiments/bn/decide.py >> /tmp/commit_loop.log 2>&1
    paths+=(experiments/bn/decision.json experiments/bn/results.md)
    short=$(for d in "${names[@]}"; do echo -n "${d#experiments/bn/runs/} "; done)
    for i in 1 2 3 4 5 6; do
      parent=$(git rev-parse HEAD)
      export GIT_INDEX_FILE=/tmp/loop.index
      git read-tree $parent && git add -f "${paths[@]}" && { [ ${#ckpts[@]} = 0 ] || git rm -q --cached "${ckpts[@]}"; }
      tree=$(git write-tree); unset GIT_INDEX_FILE
      c=$(git commit-tree $tree -p $parent -m "experiments/bn: finished runs ${short% } (decision.json/results.md regenerated)")
      if git update-ref HEAD $c $parent; then
        git reset -q -- "${paths[@]}" "${ckpts[@]}"   # the main index follows HEAD for these paths
        echo "$(date) committed $short as $c" >> /tmp/commit_loop.log; break
      fi
      sleep 5
    done
  fi
  sleep 300
done
