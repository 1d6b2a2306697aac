"""The paper's tables as `igdmfast` commands, one per row: Tables 2, 3, 6, 10-11 and 12-13 (spec METHOD.md c, d.2-d.7).

    python experiments/paper/paper.py                  # print every command (as in commands.sh)
    python experiments/paper/paper.py --write          # rewrite experiments/paper/commands.sh
    python experiments/paper/paper.py --dry-run [N]    # the first N distinct training configurations (0: all), 2 batches each

The commands run as written on a GPU machine where the datasets are in `$IGDMFAST_DATA` (or ~/.igdmfast/data) and the
RobustBench teacher checkpoints are under `$TEACHERS` in RobustBench's own layout, `$TEACHERS/<dataset>/Linf/<name>.pt`.
The SVHN teacher (a PGD-AT WRN-34-10 the authors trained themselves, spec c.2) is trained by the first command.
A row that two tables share (Table 6's AdaAD and IGDM-AdaAD are rows of Tables 2 and 12-13) is one run.
"""
from __future__ import annotations
import argparse, shlex, sys
from dataclasses import dataclass
from pathlib import Path

from igdmfast.methods import ALPHA_TABLE

# The teachers of the CIFAR tables by their RobustBench names (spec c.2; the same names for CIFAR-10 and CIFAR-100).
# igdmfast knows each one's architecture and normalization (igdmfast.models.ROBUSTBENCH_TEACHERS).
RB_NAMES = {'LTD': 'Chen2021LTD_WRN34_10', 'BDM-AT': 'Wang2023Better_WRN-28-10', 'IKL-AT': 'Cui2023Decoupled_WRN-28-10'}
STUDENTS = {'resnet18': 'resnet18_cifar', 'mobilenetv2': 'mobilenetv2_cifar'}
# Spec c.1 (training) and c.3 (evaluation on the whole test set): epochs, the x0.1 decays, test images, classes.
PROTOCOL = {'cifar100': dict(epochs=200, milestones=(100, 150), n_test=10000, classes=100, short='c100'),
            'cifar10':  dict(epochs=200, milestones=(100, 150), n_test=10000, classes=10, short='c10'),
            'svhn':     dict(epochs=50, milestones=(40, 45), n_test=26032, classes=10, short='svhn')}
RSLAD_CIFAR = dict(epochs=300, milestones=(215, 260, 285))   # spec c.1: RSLAD trains 300 epochs on CIFAR (no SVHN exception)
# The SVHN teacher of Table 3: PGD-AT, WRN-34-10 (spec c.2), trained with SVHN's protocol (spec c.1).
SVHN_TEACHER = dict(arch='wrn34_10', method='pgd_at', name='svhn_teacher_wrn34_10_pgd_at')
OUT = 'runs/paper'

# The rows of a base-method column, in the tables' order: each method without and with IGDM; after AdaAD comes
# AdaIAD (no +IGDM row of its own) and then "+IGDM (on AdaAD)". Each entry: (method, igdm, inner maximization).
BASE_ROWS = tuple((m, ig, None) for m in ('pgd_at', 'trades', 'ard', 'iad', 'akd', 'rslad') for ig in (False, True)) + \
            (('adaad', False, None), ('adaiad', False, None), ('adaad', True, None))
# Table 6: AdaAD, AdaAD w/o teacher in inner max (PGD-CE on the student), IGDM-AdaAD, IGDM-AdaAD w/o teacher in inner max.
TABLE6_ROWS = (('adaad', False, None), ('adaad', False, 'student_ce'), ('adaad', True, None), ('adaad', True, 'student_ce'))

# One column of a table per entry: (table, what it shows, dataset, student, teacher, its rows).
TABLES = (
    ('2', 'ResNet-18, CIFAR-100', 'cifar100', 'resnet18', 'BDM-AT', BASE_ROWS),
    ('2', 'ResNet-18, CIFAR-100', 'cifar100', 'resnet18', 'LTD', BASE_ROWS),
    ('3', 'ResNet-18, CIFAR-10', 'cifar10', 'resnet18', 'LTD', BASE_ROWS),
    ('3', 'ResNet-18, SVHN', 'svhn', 'resnet18', 'PGD-AT', BASE_ROWS),
    ('10-11', 'MobileNetV2, CIFAR-100', 'cifar100', 'mobilenetv2', 'BDM-AT', BASE_ROWS),
    ('10-11', 'MobileNetV2, CIFAR-100', 'cifar100', 'mobilenetv2', 'LTD', BASE_ROWS),
    ('10-11', 'MobileNetV2, CIFAR-10', 'cifar10', 'mobilenetv2', 'BDM-AT', BASE_ROWS),
    ('10-11', 'MobileNetV2, CIFAR-10', 'cifar10', 'mobilenetv2', 'LTD', BASE_ROWS),
    ('12-13', 'ResNet-18, CIFAR-100', 'cifar100', 'resnet18', 'IKL-AT', BASE_ROWS),
    ('12-13', 'MobileNetV2, CIFAR-100', 'cifar100', 'mobilenetv2', 'IKL-AT', BASE_ROWS),
    ('12-13', 'ResNet-18, CIFAR-10', 'cifar10', 'resnet18', 'IKL-AT', BASE_ROWS),
    ('12-13', 'MobileNetV2, CIFAR-10', 'cifar10', 'mobilenetv2', 'IKL-AT', BASE_ROWS),
    ('6', 'cost, ResNet-18, CIFAR-100', 'cifar100', 'resnet18', 'BDM-AT', TABLE6_ROWS),
    ('6', 'cost, ResNet-18, CIFAR-100', 'cifar100', 'resnet18', 'LTD', TABLE6_ROWS),
    ('6', 'cost, ResNet-18, CIFAR-100', 'cifar100', 'resnet18', 'IKL-AT', TABLE6_ROWS),
)
_TEACHER_SLUG = {'LTD': 'ltd', 'BDM-AT': 'bdm', 'IKL-AT': 'ikl', 'PGD-AT': 'pgdat'}


def svhn_teacher_file(out=OUT):
    "Where the SVHN teacher command writes the teacher (`igdmfast teacher` saves `teacher.pt` in its run folder)."
    return f"{out}/{SVHN_TEACHER['name']}/teacher.pt"


def teacher_argv(out=OUT):
    "The `igdmfast teacher` arguments of the SVHN teacher: PGD-AT on a WRN-34-10 with SVHN's schedule (spec c.1, c.2)."
    p = PROTOCOL['svhn']
    return ['teacher', '--data', 'svhn', '--arch', SVHN_TEACHER['arch'], '--method', SVHN_TEACHER['method'], '--protocol', 'paper',
            '--epochs', str(p['epochs']), '--milestones', ','.join(map(str, p['milestones'])), '--bs', '128', '--eps', '8',
            '--step', '2', '--steps', '10', '--n-aa', str(p['n_test']), '--seed', '0', '--out', f"{out}/{SVHN_TEACHER['name']}",
            '--resume']


@dataclass(frozen=True)
class Row:
    "One row of a paper table: a student distilled from a teacher with a method, with or without IGDM."
    dataset: str   # 'cifar100', 'cifar10' or 'svhn'
    student: str   # 'resnet18' or 'mobilenetv2' (a key of STUDENTS)
    teacher: str   # 'LTD', 'BDM-AT', 'IKL-AT' (RobustBench, RB_NAMES) or 'PGD-AT' (SVHN, trained by `teacher_argv`)
    method: str    # a key of igdmfast's METHODS
    igdm: bool
    inner: str | None = None   # None: the method's own inner maximization; 'student_ce': Table 6's teacher-free one

    @property
    def alpha(self): return ALPHA_TABLE[(self.dataset, self.student, self.teacher)][self.method]
    @property
    def schedule(self):
        return RSLAD_CIFAR if self.method == 'rslad' and self.dataset != 'svhn' else PROTOCOL[self.dataset]
    @property
    def epochs(self): return self.schedule['epochs']
    @property
    def milestones(self): return tuple(self.schedule['milestones'])
    @property
    def config(self):
        "What the dry run builds: rows differing only in the teacher (and so α) share a configuration."
        return (self.dataset, self.student, self.method, self.igdm, self.inner)
    @property
    def name(self):
        inner = f'_{self.inner}' if self.inner else ''
        return (f"{PROTOCOL[self.dataset]['short']}_{self.student}_{_TEACHER_SLUG[self.teacher]}_{self.method}{inner}"
                f"{'_igdm' if self.igdm else ''}")

    def teacher_args(self, teachers='$TEACHERS', out=OUT):
        "`--teacher NAME --teacher-dir DIR` for a RobustBench teacher, `--teacher FILE` for the SVHN teacher trained first."
        if self.teacher in RB_NAMES: return ['--teacher', RB_NAMES[self.teacher], '--teacher-dir', teachers]
        return ['--teacher', svhn_teacher_file(out)]

    def argv(self, teachers='$TEACHERS', out=OUT):
        "The `igdmfast train` arguments of this row (spec c.1 training, c.3 evaluation on the full test set)."
        a = ['train', '--data', self.dataset, *self.teacher_args(teachers, out), '--student', STUDENTS[self.student],
             '--method', self.method, '--igdm' if self.igdm else '--no-igdm']
        if self.igdm: a += ['--alpha', f'{self.alpha:g}']
        if self.inner: a += ['--inner', self.inner]
        a += ['--protocol', 'paper', '--epochs', str(self.epochs), '--milestones', ','.join(map(str, self.milestones)),
              '--bs', '128', '--eps', '8', '--step', '2', '--steps', '10', '--n-aa', str(PROTOCOL[self.dataset]['n_test']),
              '--seed', '0', '--out', f'{out}/{self.name}', '--resume']
        return a


def table_rows():
    "Every (table, row) of the tables in the paper's order; a row two tables share appears under each."
    return [(t, Row(ds, st, te, m, ig, inner)) for t, _, ds, st, te, variants in TABLES for m, ig, inner in variants]


def rows():
    "Every distinct row (one run each), in the order of their first table."
    return list(dict.fromkeys(r for _, r in table_rows()))


def tables_of(row):
    "The tables a row appears in."
    return list(dict.fromkeys(t for t, r in table_rows() if r == row))


def configs():
    "One row per distinct training configuration (the first of the rows that differ only in the teacher and its α)."
    first = {}
    for r in rows(): first.setdefault(r.config, r)
    return list(first.values())


def _line(argv):
    return 'igdmfast ' + ' '.join(a if a.startswith('$') else shlex.quote(a) for a in argv)


def command(row): return _line(row.argv())


def commands_sh():
    "The text of commands.sh: the SVHN teacher first, then one section per table column, each row's run once."
    head = ['#!/usr/bin/env bash',
            "# Generated by `python experiments/paper/paper.py --write`: one command per row of the paper's Tables 2, 3, 6,",
            '# 10-11 and 12-13 (spec METHOD.md d.2-d.7; protocol c.1, teachers c.2, alpha a.3). Needs a GPU, the datasets in',
            '# $IGDMFAST_DATA and the RobustBench checkpoints under $TEACHERS in RobustBench\'s layout',
            '# ($TEACHERS/<dataset>/Linf/<name>.pt). Each run resumes with --resume; a row two tables share is run once.',
            'set -euo pipefail', 'TEACHERS=${TEACHERS:-${IGDMFAST_TEACHERS:-models}}', '',
            '# The SVHN teacher of Table 3 (spec c.2: PGD-AT, WRN-34-10, trained by the authors; SVHN schedule of c.1)',
            _line(teacher_argv())]
    done, lines = {}, []
    for t, what, ds, st, te, variants in TABLES:
        who = f'{te} teacher ({RB_NAMES[te]})' if te in RB_NAMES else f'{te} teacher ({svhn_teacher_file()})'
        lines += ['', f"# Table{'s' if '-' in t else ''} {t}: {what}, {who}"]
        for m, ig, inner in variants:
            r = Row(ds, st, te, m, ig, inner)
            if r in done: lines.append(f"# {r.name}: the run of Table{'s' if '-' in done[r] else ''} {done[r]} above"); continue
            done[r] = t
            lines.append(command(r))
    return '\n'.join(head + lines) + '\n'


def _two_batches(losses, n_batches):
    "A callback that records each training loss and stops the fit after `n_batches` batches."
    from fastai.callback.core import Callback, CancelFitException
    class TwoBatches(Callback):
        order = 90
        def after_loss(self): losses.append(self.loss.item())
        def after_batch(self):
            if self.iter + 1 >= n_batches: raise CancelFitException()
    return TwoBatches()


def teacher_path(args):
    "The checkpoint `igdmfast train` reads for the parsed `args`: RobustBench's layout for a name, else the file itself."
    from igdmfast import cli, runs
    from igdmfast.models import robustbench_path
    if args.teacher in RB_NAMES.values():
        return robustbench_path(args.teacher, runs.robustbench_datasets(args.teacher, args.data)[0], args.teacher_dir)
    return Path(args.teacher)


def stand_in_teacher(n_classes, arch='tiny_resnet_cifar', seed=0, device='cpu'):
    "A small randomly initialized teacher that stands in for the real one in a dry run (it only has to give logits)."
    import timm, torch
    import igdmfast.models  # noqa: F401
    torch.manual_seed(seed)
    return timm.create_model(arch, num_classes=n_classes).to(device).eval()


def dry_run(row, teacher, tmp, n_batches=2, bs=2, device='cpu', teachers='teachers'):
    "Build `row`'s configuration from its command line with a stand-in `teacher` and data of the dataset's shape; train `n_batches`."
    from igdmfast import cli, runs
    from igdmfast.data import synth_dls
    from igdmfast.learner import distill_learner, StepLR
    args = cli._parser().parse_args(row.argv(teachers=teachers))   # the command line parses ...
    threat = runs.parse_threat(args.eps, args.step, args.steps)
    sched = runs.parse_schedule(args.protocol, args.milestones, args.epochs)
    runs.check_inner_arg(args.inner)
    dls = synth_dls(n_train=n_batches * bs, n_valid=bs, n_classes=PROTOCOL[args.data]['classes'], bs=bs, device=device)
    dls.name = args.data
    student = runs.build_model(args.student, dls)                      # ... and the configuration builds and trains
    learn = distill_learner(teacher, student, dls, method=args.method, igdm=args.igdm, alpha=args.alpha, threat=threat,
                            inner=args.inner, check_teacher=False, **runs.learner_kwargs(False, args.lr, sched))
    losses = []
    learn.add_cb(_two_batches(losses, n_batches))
    with learn.no_bar(), learn.no_logging(): runs.fit_epochs(learn, args.epochs, Path(tmp)/'none.pt', False, sched)
    step = [cb for cb in learn.cbs if isinstance(cb, StepLR)]
    return dict(losses=losses, alpha=learn.alpha, lr=learn.lr, epochs=args.epochs, threat=threat, opt=type(learn.opt).__name__,
                method=learn.method, inner=learn.inner, igdm=learn.igdm, n_classes=dls.c,
                milestones=[int(m * args.epochs) for m in step[0].milestones] if step else None,
                teacher_path=teacher_path(args))


def dry_run_teacher(out=OUT):
    "Check the SVHN teacher command: it parses, its schedule and threat are the spec's and its architecture builds."
    import timm
    from igdmfast import cli, runs
    from igdmfast.methods import get_method
    args = cli._parser().parse_args(teacher_argv(out))
    sched = runs.parse_schedule(args.protocol, args.milestones, args.epochs)
    model = timm.create_model(args.arch, num_classes=PROTOCOL[args.data]['classes'])
    return dict(threat=runs.parse_threat(args.eps, args.step, args.steps), sched=sched, epochs=args.epochs, method=get_method(args.method),
                arch=model.pretrained_cfg.get('architecture'), n_classes=model.num_classes, file=Path(args.out)/'teacher.pt')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--write', action='store_true', help='rewrite experiments/paper/commands.sh')
    p.add_argument('--dry-run', type=int, nargs='?', const=0, default=None,
                   help='dry-run the first N distinct training configurations (0: all)')
    a = p.parse_args(argv)
    if a.write: (Path(__file__).parent / 'commands.sh').write_text(commands_sh()); return 0
    if a.dry_run is not None:
        import tempfile, time
        print(f"SVHN teacher: {dry_run_teacher()['arch']}")
        teachers = {n: stand_in_teacher(n) for n in {p['classes'] for p in PROTOCOL.values()}}
        with tempfile.TemporaryDirectory() as d:
            for r in configs()[:a.dry_run or None]:
                t = time.time()
                res = dry_run(r, teachers[PROTOCOL[r.dataset]['classes']], d)
                print(f"{r.name}: alpha {res['alpha']}, losses {[round(l, 4) for l in res['losses']]}, {time.time() - t:.1f} s")
        return 0
    print(commands_sh(), end='')
    return 0


if __name__ == '__main__': sys.exit(main())
