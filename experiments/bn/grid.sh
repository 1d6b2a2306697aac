#!/usr/bin/env bash
# Issue #26: BatchNorm-safe IGDM. The pilot and the PRE-REGISTERED grid of README.md (written before any run of either).
# Usage (from anywhere): bash experiments/bn/grid.sh [pilot|digits|all|fashion_time|fashion_size|cifar_time|fashion]   (default: pilot)
#   pilot:  ARD + IGDM (alpha 5) with each igdm_bn candidate, and the ARD base, seeds 100 and 101 (not the grid's seeds)
#   digits: the main grid of setting 1 (digits, 64/255), with VARIANT=<the pilot's choice> (README.md, "Pilot rule")
# Options, as in experiments/convergent/grid.sh: SEEDS="0 1" (grid seeds, default 0-4), CLAIMS=DIR (processes share the
# runs: each is claimed by an atomic mkdir), DRY=1 (print the commands). Resumable: a finished run (its metrics.json) is
# skipped, a killed one continues from its last complete epoch (--resume); rerun the same line after an interruption.
# The library is FROZEN at commit $COMMIT: an export of its igdmfast/ goes on PYTHONPATH (the console script does not
# put the working tree first), so work on the library in the same tree cannot change a run half-way.
# One process, one thread (OMP_NUM_THREADS=1); logs in experiments/bn/runs/*.log (not committed).
set -euo pipefail
cd "$(dirname "$0")/../.."
COMMIT=af87a3c
FROZEN=${FROZEN:-/tmp/igdmfast-frozen-$COMMIT}
if [ ! -f "$FROZEN/igdmfast/__init__.py" ]; then mkdir -p "$FROZEN"; git archive $COMMIT igdmfast | tar -x -C "$FROZEN"; fi
export PYTHONPATH=$FROZEN MPLBACKEND=Agg OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
IGDMFAST=${IGDMFAST:-.venv/bin/igdmfast}
PY="$(dirname "$(readlink -f "$IGDMFAST")")/python"
got=$(cd / && "$PY" -c 'import igdmfast; print(igdmfast.__file__)')
[ "$got" = "$FROZEN/igdmfast/__init__.py" ] || { echo "FAIL: igdmfast imports from $got, not the frozen $FROZEN"; exit 1; }
OUT=experiments/bn/runs
SEEDS=(${SEEDS:-0 1 2 3 4})
# setting 1 = experiments/convergent: sklearn digits (1,437 train / 360 validation, 8x8x1), Linf 64/255, step 16/255,
# 10 steps, batch 128, its committed 100-epoch small_cnn PGD-AT teacher, tiny_mobilenet_cifar students of 160 epochs
COMMON=(--data digits --eps 64 --steps 10 --bs 128 --resume)
T=experiments/convergent/grid/teacher/teacher.pt
STUDENT=(--student tiny_mobilenet_cifar --teacher $T --n-aa 0 --epochs 160)
declare -A ALPHA=([ard]=5 [rslad]=0.9 [adaad]=5)   # the convergent grid's alphas, unchanged

run() {  # LOG, then the command; with TIMEFILE set, its CPU seconds are appended there
  local log=$1; shift
  if [ "${DRY:-0}" = 1 ]; then echo "$*"
  elif [ -n "${TIMEFILE:-}" ]; then /usr/bin/time -f "$(basename $log .log),%U,%S,%e" -a -o $TIMEFILE "$@" > "$log" 2>&1
  else "$@" > "$log" 2>&1; fi
}
student() {  # NAME, then the variant's train options: train (unless finished), then AutoAttack on all 360 images
  local name=$1; shift
  if [ -n "${CLAIMS:-}" ]; then mkdir -p "$CLAIMS"; mkdir "$CLAIMS/${name//\//_}" 2>/dev/null || return 0; fi
  mkdir -p "$(dirname $OUT/$name)"
  [ -f $OUT/$name/metrics.json ] || run $OUT/$name.log "$IGDMFAST" train "${COMMON[@]}" "${STUDENT[@]}" "$@" --out $OUT/$name
  [ -f $OUT/${name}_aa/metrics.json ] || run $OUT/${name}_aa.log "$IGDMFAST" eval $OUT/$name/student.pt --data digits --eps 64 --attacks aa --seed 0 --out $OUT/${name}_aa
}
pilot() {  # the ARD base, then ARD + IGDM (alpha 5) with each candidate; seeds 100, 101
  for s in 100 101; do
    student pilot/ard_s$s --method ard --no-igdm --seed $s
    for v in update keep eval recalibrate; do student pilot/ard_igdm_${v}_s$s --method ard --igdm --alpha 5 --igdm-bn $v --seed $s; done
  done
}
digits() {  # setting 1's grid (README.md): base, update and VARIANT for ARD, RSLAD, AdaAD; ARD's alpha 1 and 20 with
            # VARIANT; Table 6's teacher-free inner: base, update, VARIANT
  : "${VARIANT:?set VARIANT to the choice of the pilot (README.md)}"
  for s in "${SEEDS[@]}"; do
    for m in ard rslad adaad; do
      student digits/${m}_s$s --method $m --no-igdm --seed $s
      student digits/${m}_igdm_update_s$s --method $m --igdm --alpha ${ALPHA[$m]} --igdm-bn update --seed $s
      student digits/${m}_igdm_${VARIANT}_s$s --method $m --igdm --alpha ${ALPHA[$m]} --igdm-bn $VARIANT --seed $s
    done
    for a in 1 20; do student digits/ard_igdm_${VARIANT}_a${a}_s$s --method ard --igdm --alpha $a --igdm-bn $VARIANT --seed $s; done
    student digits/adaad_tf_s$s --method adaad --inner student_ce --no-igdm --seed $s
    student digits/adaad_tf_igdm_update_s$s --method adaad --inner student_ce --igdm --alpha 5 --igdm-bn update --seed $s
    student digits/adaad_tf_igdm_${VARIANT}_s$s --method adaad --inner student_ce --igdm --alpha 5 --igdm-bn $VARIANT --seed $s
  done
}
# setting 2 (README.md, "Setting 2's sizing pilot"): Fashion-MNIST (the shared .npz: 23,000 train, 10,000 test) at 0.1
# DATASET=cifar: the same steps on the CIFAR-10 subset at 8/255 (README.md, "Setting 2 on the CIFAR-10 subset"), in runs/cifar
case ${DATASET:-fashion} in
  fashion) FDATA=../shared/data/fashion_mnist.npz FEPS=25.5 FDIR=fashion ;;
  cifar) FDATA=../shared/data/cifar10_subset.npz FEPS=8 FDIR=cifar ;;
  *) echo "DATASET is fashion or cifar, got ${DATASET}"; exit 2 ;;
esac
FCOMMON=(--data $FDATA --eps $FEPS --steps 10 --bs 128 --resume)
# TN=<images>: the teacher trains on TN images, not the students' N (README.md, the amended CIFAR-10 plan); its folders
# (teacher_<arch>_e<TE>_n<TN>, students_<arch>_e<TE>_n<TN>) carry the suffix, and without TN nothing changes
TSUF=""; [ -n "${TN:-}" ] && [ "${TN}" != "${N:-}" ] && TSUF=_n$TN
faa() {  # RUN_FOLDER WEIGHTS N: AutoAttack on the same seeded N test images for every run
  [ -f ${1}_aa/metrics.json ] || run ${1}_aa.log "$IGDMFAST" eval $1/$2 --data $FDATA --eps $FEPS --attacks aa --n $3 --seed 0 --out ${1}_aa
}
fashion_time() {  # step 1: one epoch of each kind on 2,000 images, AutoAttack on 200 (timing only): CPU seconds in *.time
  local d=$OUT/fashion/timing; mkdir -p $d
  local TIMEFILE=$d/cpu_seconds.csv   # run() appends "name,user s,system s,wall s" per command
  [ -f $d/teacher/metrics.json ] || run $d/teacher.log "$IGDMFAST" teacher "${FCOMMON[@]}" --arch small_cnn --method pgd_at --epochs 1 --n-train 2000 --n-valid 200 --n-aa 0 --seed 0 --out $d/teacher
  local S=(--student tiny_mobilenet_cifar --teacher $d/teacher/teacher.pt --n-aa 0 --epochs 1 --n-train 2000 --n-valid 200 --seed 0)
  [ -f $d/ard/metrics.json ] || run $d/ard.log "$IGDMFAST" train "${FCOMMON[@]}" "${S[@]}" --method ard --no-igdm --out $d/ard
  [ -f $d/ard_igdm_keep/metrics.json ] || run $d/ard_igdm_keep.log "$IGDMFAST" train "${FCOMMON[@]}" "${S[@]}" --method ard --igdm --alpha 5 --igdm-bn keep --out $d/ard_igdm_keep
  [ -f $d/adaad/metrics.json ] || run $d/adaad.log "$IGDMFAST" train "${FCOMMON[@]}" "${S[@]}" --method adaad --no-igdm --out $d/adaad
  faa $d/ard student.pt 200
  # the same runs with 2 epochs: one epoch's CPU seconds = the difference (start-up and final evaluation cancel)
  [ -f $d/teacher_e2/metrics.json ] || run $d/teacher_e2.log "$IGDMFAST" teacher "${FCOMMON[@]}" --arch small_cnn --method pgd_at --epochs 2 --n-train 2000 --n-valid 200 --n-aa 0 --seed 0 --out $d/teacher_e2
  S=(--student tiny_mobilenet_cifar --teacher $d/teacher/teacher.pt --n-aa 0 --epochs 2 --n-train 2000 --n-valid 200 --seed 0)
  [ -f $d/ard_e2/metrics.json ] || run $d/ard_e2.log "$IGDMFAST" train "${FCOMMON[@]}" "${S[@]}" --method ard --no-igdm --out $d/ard_e2
  [ -f $d/ard_igdm_keep_e2/metrics.json ] || run $d/ard_igdm_keep_e2.log "$IGDMFAST" train "${FCOMMON[@]}" "${S[@]}" --method ard --igdm --alpha 5 --igdm-bn keep --out $d/ard_igdm_keep_e2
  [ -f $d/adaad_e2/metrics.json ] || run $d/adaad_e2.log "$IGDMFAST" train "${FCOMMON[@]}" "${S[@]}" --method adaad --no-igdm --out $d/adaad_e2
}
cifar_time() {  # the CIFAR-10 plan's step 2, with the teacher the gate chose (TEACHER=<arch> TE=<epochs>): one and two
                # epochs of each student kind on 2,000 images (one epoch = the difference); CPU seconds in cpu_seconds.csv.
                # AutoAttack's CPU seconds per image come from the gate's timed runs (size_n3000_e20/cpu_seconds.csv).
  [ "$FDIR" = cifar ] || { echo "cifar_time needs DATASET=cifar"; exit 2; }
  : "${TEACHER:?set TEACHER to the teacher of the gate}" "${TE:?set TE}"
  local t=$OUT/cifar/size_n3000_e20/teacher_${TEACHER}_e$TE$TSUF/teacher.pt d=$OUT/cifar/timing$TSUF; mkdir -p $d
  [ -f $t ] || { echo "no teacher at $t: run the gate (fashion_size) first"; exit 2; }
  local TIMEFILE=$d/cpu_seconds.csv k
  for e in 1 2; do
    local S=(--student tiny_mobilenet_cifar --teacher $t --n-aa 0 --epochs $e --n-train 2000 --n-valid 200 --seed 0)
    local x=""; [ $e = 2 ] && x=_e2
    [ -f $d/ard$x/metrics.json ] || run $d/ard$x.log "$IGDMFAST" train "${FCOMMON[@]}" "${S[@]}" --method ard --no-igdm --out $d/ard$x
    [ -f $d/ard_igdm_keep$x/metrics.json ] || run $d/ard_igdm_keep$x.log "$IGDMFAST" train "${FCOMMON[@]}" "${S[@]}" --method ard --igdm --alpha 5 --igdm-bn keep --out $d/ard_igdm_keep$x
    [ -f $d/adaad$x/metrics.json ] || run $d/adaad$x.log "$IGDMFAST" train "${FCOMMON[@]}" "${S[@]}" --method adaad --no-igdm --out $d/adaad$x
  done
}
fashion_size() {  # steps 3-4 with N=<images> E=<epochs> [TEACHER=small_cnn] [TE=<teacher epochs, default E>] [STUDENTS=0|1]
                  # with CLAIMS=DIR several processes share the steps. Each teacher's students live in their own folder
                  # (students_<arch>_e<TE>), so a fallback teacher never reuses another teacher's students. STUDENTS=0:
                  # the teacher gate only (the teacher, the PGD-AT student, their AutoAttack), no ARD students.
  : "${N:?set N (README.md step 2)}" "${E:?set E}"; local TA=${TEACHER:-small_cnn} TE=${TE:-$E}
  local d=$OUT/$FDIR/size_n${N}_e${E}; mkdir -p $d
  local t=$d/teacher_${TA}_e$TE$TSUF st=$d/students_${TA}_e$TE$TSUF
  mine() { [ -z "${CLAIMS:-}" ] || { mkdir -p "$CLAIMS"; mkdir "$CLAIMS/${FDIR}_size_n${N}_e${E}_$1" 2>/dev/null; }; }
  if mine teacher_${TA}_e$TE$TSUF; then
    [ -f $t/metrics.json ] || run $t.log "$IGDMFAST" teacher "${FCOMMON[@]}" --arch $TA --method pgd_at --epochs $TE --n-train ${TN:-$N} --n-valid 1000 --n-aa 0 --seed 0 --out $t
  fi
  [ -f $t/teacher.pt ] || { echo "$t is being trained by another process: rerun when it has finished"; return 0; }
  if mine teacher_${TA}_e$TE${TSUF}_aa; then faa $t teacher.pt 1000; fi
  if mine pgdat_student; then
    [ -f $d/pgdat_student/metrics.json ] || run $d/pgdat_student.log "$IGDMFAST" teacher "${FCOMMON[@]}" --arch tiny_mobilenet_cifar --method pgd_at --epochs $E --n-train $N --n-valid 1000 --n-aa 0 --seed 0 --out $d/pgdat_student
    faa $d/pgdat_student teacher.pt 1000
  fi
  [ "${STUDENTS:-1}" = 1 ] || return 0
  mkdir -p $st
  local S=(--student tiny_mobilenet_cifar --teacher $t/teacher.pt --n-aa 0 --n-train $N --n-valid 1000 --seed 0 --method ard --no-igdm)
  if mine students_${TA}_e$TE${TSUF}_ard_s0; then
    [ -f $st/ard_s0/metrics.json ] || run $st/ard_s0.log "$IGDMFAST" train "${FCOMMON[@]}" "${S[@]}" --epochs $E --out $st/ard_s0
    faa $st/ard_s0 student.pt 1000
  fi
  if [ "${GATE:-0}" = 1 ] && mine students_${TA}_e$TE${TSUF}_ard_2e_s0; then
    [ -f $st/ard_2e_s0/metrics.json ] || run $st/ard_2e_s0.log "$IGDMFAST" train "${FCOMMON[@]}" "${S[@]}" --epochs $((2*E)) --out $st/ard_2e_s0
  fi
}
fashion() {  # setting 2's grid (README.md), with the teacher the gates chose: N=<images> E=<epochs> TEACHER=<arch> TE=<epochs>
            # VARIANT; ARD and AdaAD, each base, IGDM update and IGDM VARIANT (alpha 5), seeds 0-2; AutoAttack on the 1,000 images
  : "${N:?set N (README.md)}" "${E:?set E}" "${VARIANT:?set VARIANT to the choice of the pilot}"; local TA=${TEACHER:-small_cnn} TE=${TE:-$E}
  local d=$OUT/$FDIR/size_n${N}_e${E}; local st=$d/students_${TA}_e$TE$TSUF
  local S=(--student tiny_mobilenet_cifar --teacher $d/teacher_${TA}_e$TE$TSUF/teacher.pt --n-aa 0 --n-train $N --n-valid 1000 --epochs $E)
  [ -f $d/teacher_${TA}_e$TE$TSUF/teacher.pt ] || { echo "no teacher at $d/teacher_${TA}_e$TE$TSUF: run fashion_size first"; exit 2; }
  mkdir -p $st
  fstudent() {  # NAME, then the variant's options (claimed, trained unless finished, then its AutoAttack)
    local name=$1; shift
    if [ -n "${CLAIMS:-}" ]; then mkdir -p "$CLAIMS"; mkdir "$CLAIMS/${FDIR}_${TA}_e$TE${TSUF}_${name}" 2>/dev/null || return 0; fi
    [ -f $st/$name/metrics.json ] || run $st/$name.log "$IGDMFAST" train "${FCOMMON[@]}" "${S[@]}" "$@" --out $st/$name
    faa $st/$name student.pt 1000
  }
  for s in "${SEEDS[@]:0:3}"; do
    for m in ard adaad; do
      fstudent ${m}_s$s --method $m --no-igdm --seed $s
      fstudent ${m}_igdm_update_s$s --method $m --igdm --alpha 5 --igdm-bn update --seed $s
      fstudent ${m}_igdm_${VARIANT}_s$s --method $m --igdm --alpha 5 --igdm-bn $VARIANT --seed $s
    done
  done
}
case ${1:-pilot} in
  pilot) pilot ;;
  digits) digits ;;
  all) pilot; digits ;;
  fashion_time) fashion_time ;;
  fashion_size) fashion_size ;;
  cifar_time) cifar_time ;;
  fashion) fashion ;;
  *) echo "usage: bash experiments/bn/grid.sh [pilot|digits|all|fashion_time|fashion_size|cifar_time|fashion]"; exit 2 ;;
esac
