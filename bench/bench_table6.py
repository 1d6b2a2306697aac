"""The cost axis of Table 6 on one machine in one run: seconds per training epoch of AdaAD with its own inner
maximization and with the teacher-free one (`inner='student_ce'`), each with and without IGDM, in the setting of
`experiments/convergent` (digits, Linf 64/255, step 16/255, 10 steps, batch 128, `tiny_mobilenet_cifar` student,
the grid's `small_cnn` teacher). The grid's own seconds per epoch come from runs spread over sessions, CPUs and a
shared machine; this script times the four variants interleaved (ABBA order), so that their ratios are comparable.

    python bench/bench_table6.py [--epochs 2] [--repeats 3] [--threads 1] [--n-train N]
                                 [--teacher experiments/convergent/grid/teacher/teacher.pt]

Each timed call is a fresh `distill_learner` fit of `--epochs` epochs (its clean validation included, as in the
grid's runs); the figure is the median over `--repeats` rounds, in seconds per epoch, and its ratio to AdaAD.
"""
from __future__ import annotations
from pathlib import Path
import torch
from _common import base_parser, setup, describe, machine, interleaved, med, table, dump

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {'AdaAD': dict(inner=None, igdm=False), 'AdaAD + IGDM': dict(inner=None, igdm=True),
            'AdaAD, teacher-free inner': dict(inner='student_ce', igdm=False),
            'AdaAD, teacher-free inner + IGDM': dict(inner='student_ce', igdm=True)}


def fitter(variant, teacher, dls, epochs, seed, dev):
    "A callable that fits a fresh student of `variant` for `epochs` epochs (the grid's options: α 5, one cycle)."
    import timm
    from igdmfast.core import ThreatModel, seed_everything
    from igdmfast.learner import distill_learner

    def run():
        seed_everything(seed)
        student = timm.create_model('tiny_mobilenet_cifar', num_classes=dls.c, in_chans=dls.in_chans).to(dev)
        learn = distill_learner(teacher, student, dls, method='adaad', alpha=5., threat=ThreatModel.from_255(64, 16, n_steps=10),
                                check_teacher=False, **VARIANTS[variant])
        with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs)
    return run


def main(argv=None):
    p = base_parser(__doc__, bs=128, repeats=3)
    p.add_argument('--epochs', type=int, default=2, help='epochs per timed fit')
    p.add_argument('--n-train', type=int, default=None, help='a seeded subset of the 1,437 training images (default: all)')
    p.add_argument('--teacher', default=str(ROOT/'experiments'/'convergent'/'grid'/'teacher'/'teacher.pt'))
    args = p.parse_args(argv)
    dev = setup(args)
    from igdmfast.data import get_dls
    from igdmfast.models import load_teacher
    info = machine(dev)
    print(describe(info))
    dls = get_dls('digits', bs=args.bs, device=dev, n_train=args.n_train)
    teacher = load_teacher(args.teacher).to(dev).eval().requires_grad_(False)
    wall, cpu = interleaved({v: fitter(v, teacher, dls, args.epochs, args.seed, dev) for v in VARIANTS}, args.repeats, dev)
    base = med(wall['AdaAD']) / args.epochs
    rows = [dict(variant=v, s_per_epoch=med(wall[v]) / args.epochs, cpu_s_per_epoch=med(cpu[v]) / args.epochs,
                 vs_adaad=med(wall[v]) / args.epochs / base) for v in VARIANTS]
    print(f"{args.epochs} epochs per fit, median of {args.repeats} interleaved rounds (one warm-up round more), batch {args.bs}")
    print(table(rows, ['variant', 's_per_epoch', 'cpu_s_per_epoch', 'vs_adaad']))
    dump(args, dict(machine=info, epochs=args.epochs, repeats=args.repeats, rows=rows, wall=wall, cpu=cpu))
    return rows


if __name__ == '__main__': main()
