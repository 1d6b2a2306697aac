#!/usr/bin/env python
"""Pilot runs of the convergent CPU setting (issue #18 item 3): the exact commands, one process and one thread at a time.

Usage (from the repository root):  .venv/bin/python experiments/convergent/pilot.py [NAME ...]   (no NAME: all, in order)
                                   .venv/bin/python experiments/convergent/pilot.py --summary    (the table of README.md)
Every pilot is an `igdmfast` CLI command (run in a child process). Pilots marked `curve` additionally record the
student's PGD-20 accuracy on the whole validation set after every epoch (a `pgd20_acc` column in history.csv, drawn in
training_curves.png): the child adds igdmfast's own `RobustAccuracy` metric to the learner the CLI builds. That is the
only difference from the plain command printed for each pilot; the pre-registered grid uses the plain commands.
Only base students are trained here (no IGDM): the pilots fix the setting before any IGDM-vs-base result is seen.
"""
import os, sys, subprocess, time, json
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PILOT = HERE/'pilot'
EPS, STEPS = 64, 10            # Linf 64/255 (0.251), step eps/4 = 16/255, 10 steps for training; eval PGD-20 at the same eps/step
COMMON = ['--data', 'digits', '--eps', str(EPS), '--steps', str(STEPS), '--bs', '128', '--seed', '0', '--resume']
TEACHER = PILOT/'teacher'/'teacher.pt'
STUDENT = ['--student', 'tiny_mobilenet_cifar', '--no-igdm']

def _eval(run, attacks='clean,pgd20,aa'):
    "`igdmfast eval` of a pilot's student on all 360 validation images at the setting's radius."
    return ['eval', f'experiments/convergent/pilot/{run}/student.pt', '--data', 'digits', '--eps', str(EPS), '--attacks', attacks]

def _train(method, epochs, n_aa=0, teacher=TEACHER):
    "`igdmfast train` of a base student (no IGDM) of `method` distilled from `teacher` (PGD-AT ignores it)."
    return ['train', *COMMON, *STUDENT, '--teacher', str(teacher.relative_to(ROOT)), '--method', method,
            '--epochs', str(epochs), '--n-aa', str(n_aa)]

# name -> (argv of `igdmfast`, record a per-epoch PGD-20 curve)
PILOTS = {
    # the rejected radius: 32/255 leaves the teacher too robust (AA 82.5% on the 360 validation images)
    'teacher_eps32': (['teacher', '--data', 'digits', '--eps', '32', '--steps', '10', '--bs', '128', '--seed', '0', '--resume',
                       '--arch', 'small_cnn', '--method', 'pgd_at', '--epochs', '20', '--n-aa', '360'], False),
    # the chosen teacher: small_cnn (65,834 parameters), PGD-AT, 30 epochs, fastai one cycle
    'teacher': (['teacher', *COMMON, '--arch', 'small_cnn', '--method', 'pgd_at', '--epochs', '30', '--n-aa', '360'], False),
    # base students (tiny_mobilenet_cifar, 54,522 parameters), PGD-20 on the 360 validation images after every epoch.
    # ard_e10 ran with --n-aa 360 and showed that `train` re-evaluates the teacher (AutoAttack included) in every run;
    # the others train with --n-aa 0 and get AutoAttack on all 360 validation images from `igdmfast eval` (`*_aa` pilots).
    'ard_e10': (_train('ard', 10, n_aa=360), True),
    'ard_e20': (_train('ard', 20), True),
    'ard_e20_aa': (_eval('ard_e20'), False),
    'pgd_at_e20': (_train('pgd_at', 20), True),           # the same student trained without a teacher
    'pgd_at_e20_aa': (_eval('pgd_at_e20'), False),
    # 20 epochs left PGD-20 still rising and AA far below PGD-20: 40 epochs, and 80 for ARD as the convergence check
    'ard_e40': (_train('ard', 40), True),
    'ard_e40_aa': (_eval('ard_e40'), False),
    'pgd_at_e40': (_train('pgd_at', 40), True),
    'pgd_at_e40_aa': (_eval('pgd_at_e40'), False),
    'adaad_e40': (_train('adaad', 40), True),
    'adaad_e40_aa': (_eval('adaad_e40'), False),
    'ard_e80': (_train('ard', 80), True),                 # twice the epochs: has the 40-epoch student converged?
    'ard_e80_aa': (_eval('ard_e80'), False),
    # ard_e80 passed the 30-epoch teacher's PGD-20 (58%): the teacher had not converged either. A 100-epoch teacher,
    # and the PGD-AT student (which does not use the teacher) at 80 epochs against 40
    'teacher_e100': (['teacher', *COMMON, '--arch', 'small_cnn', '--method', 'pgd_at', '--epochs', '100', '--n-aa', '360'], False),
    'pgd_at_e80': (_train('pgd_at', 80), True),
    'pgd_at_e80_aa': (_eval('pgd_at_e80'), False),
    # the grid's teacher (100 epochs) distilled into the 80-epoch ARD student
    'ard_e80_t100': (_train('ard', 80, teacher=PILOT/'teacher_e100'/'teacher.pt'), True),
    'ard_e80_t100_aa': (_eval('ard_e80_t100'), False),
    # the gate's ARD half, piloted: 160 epochs against ard_e80_t100
    'ard_e160_t100': (_train('ard', 160, teacher=PILOT/'teacher_e100'/'teacher.pt'), True),
    'ard_e160_t100_aa': (_eval('ard_e160_t100'), False),
    # seconds per epoch without the per-epoch PGD-20 metric (5-epoch runs; their accuracies are not used)
    'time_ard': (_train('ard', 5), False),
    'time_rslad': (_train('rslad', 5), False),
    'time_adaad': (_train('adaad', 5), False),
    # a (nearly) naturally trained student: --eps must be >= 1, so 1/255 with one step; then evaluated at 64/255
    'natural_e10': (['train', '--data', 'digits', '--eps', '1', '--steps', '1', '--bs', '128', '--seed', '0', '--resume',
                     '--student', 'tiny_mobilenet_cifar', '--method', 'pgd_at', '--no-igdm', '--epochs', '10', '--n-aa', '0'], False),
    'natural_e10_aa': (_eval('natural_e10'), False),
}

def out_of(name): return PILOT/name

def argv_of(name):
    argv, curve = PILOTS[name]
    return [*argv, '--out', str(out_of(name).relative_to(ROOT))], curve

def child(name):
    "Run one pilot in this process (called in a child): the plain CLI, plus the per-epoch PGD-20 metric for `curve` pilots."
    argv, curve = argv_of(name)
    if curve:
        import igdmfast.learner as L
        from igdmfast.evaluate import RobustAccuracy
        from igdmfast.core import ThreatModel
        make = L._learner
        threat = ThreatModel.from_255(EPS, EPS/4, n_steps=20)
        def with_pgd(model, dls, cbs, metrics, *args, **kwargs):
            return make(model, dls, cbs, [*metrics, RobustAccuracy(threat, n_steps=20, seed=0)], *args, **kwargs)
        L._learner = with_pgd
    from igdmfast.cli import main
    return main(argv)

def run(name):
    argv, curve = argv_of(name)
    print(f"== {name}: igdmfast {' '.join(argv)}" + ("   (+ per-epoch PGD-20 curve)" if curve else ''), flush=True)
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'MPLBACKEND': 'Agg'}
    t = time.time()
    rc = subprocess.call([sys.executable, __file__, '--child', name], cwd=ROOT, env=env)
    wall = time.time() - t
    print(f"== {name}: exit {rc}, {wall:.0f} s wall", flush=True)
    walls = PILOT/'wall_seconds.json'
    d = json.loads(walls.read_text()) if walls.is_file() else {}
    d[name] = round(wall, 1); walls.write_text(json.dumps(d, indent=1) + '\n')
    if rc: sys.exit(rc)

def _numbers(name):
    "The accuracies (%) of a pilot's model (the student's row of a train run, the teacher's of a teacher run, the eval's)."
    f = out_of(name)/'metrics.json'
    if not f.is_file(): return {}
    models = json.loads(f.read_text())['models']
    key = next((k for k in models if k.startswith('student')), next(iter(models)))
    return models[key]['numbers']

def _epoch_seconds(name):
    "Training seconds per epoch (the run's `metrics.json`: seconds of training over its epochs), or None."
    f = out_of(name)/'metrics.json'
    if not f.is_file(): return None
    extra = json.loads(f.read_text())['extra']
    secs, epochs = extra.get('seconds', {}), extra.get('config', {}).get('epochs')
    t = secs.get('student') or secs.get('teacher')
    return round(t / epochs, 2) if t and epochs else None

def summary():
    "A Markdown table of every finished pilot: accuracies, training seconds per epoch, wall seconds of the command."
    walls = json.loads((PILOT/'wall_seconds.json').read_text()) if (PILOT/'wall_seconds.json').is_file() else {}
    cols = ('clean', 'fgsm', 'pgd20', 'cw', 'aa')
    print('| pilot | ' + ' | '.join(cols) + ' | s/epoch | wall s |')
    print('|---' * (len(cols) + 3) + '|')
    for n in PILOTS:
        nums = _numbers(n)
        if not nums: continue
        cell = lambda v: '–' if v is None else f"{v:.2f}"
        e = _epoch_seconds(n)
        print(f"| {n} | " + ' | '.join(cell(nums.get(c)) for c in cols) + f" | {'–' if e is None else e} | {walls.get(n, '–')} |")

if __name__ == '__main__':
    if sys.argv[1:2] == ['--child']: sys.exit(child(sys.argv[2]))
    if sys.argv[1:2] == ['--summary']: sys.exit(summary())
    for n in (sys.argv[1:] or list(PILOTS)): run(n)
