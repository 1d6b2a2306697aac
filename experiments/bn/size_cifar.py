#!/usr/bin/env python
"""Setting 2's size on the CIFAR-10 subset (README.md, "Setting 2 on the CIFAR-10 subset", steps 2-3), from CPU seconds.

Usage (from the repository root): .venv/bin/python experiments/bn/size_cifar.py TEACHER_RUN
  TEACHER_RUN: the gate's chosen teacher folder name, e.g. teacher_tiny_resnet_cifar_e40
One epoch's CPU seconds = CPU(2-epoch run) - CPU(1-epoch run), both on 2,000 images (`grid.sh cifar_time`,
runs/cifar/timing<_nTN>/cpu_seconds.csv); AutoAttack's CPU seconds per image = the chosen teacher's AutoAttack run on the
1,000 gate images (`runs/cifar/size_n3000_e20/cpu_seconds.csv`, timed by `grid.sh fashion_size` with TIMEFILE) / 1,000.
Prints the per-1,000-image costs, the grid's CPU hours for each N at E = 20, and the plan's choice: the largest N that
fits 20 CPU hours, else N = 3,000 with the overrun stated. A teacher trained on all 10,000 images (folder `..._n10000`,
the amended plan) fixes N = 3,000: the hours are printed, nothing is chosen.
"""
import re, sys
from pathlib import Path

from size_fashion import cpu_seconds, per_epoch_per_1000, grid_hours   # the same costing as Fashion-MNIST's sizing

RUNS = Path(__file__).resolve().parent/'runs'/'cifar'
CANDIDATES, E, FALLBACK, BUDGET_H, N_AA = (10000, 6000, 3000), 20, 3000, 20.0, 1000
KINDS = ('ard', 'ard_igdm_keep', 'adaad')   # the student kinds of `grid.sh cifar_time` (no teacher is trained there)

def main(teacher_run:str):
    tn = re.search(r'_n(\d+)$', teacher_run)   # the amended plan's all-data teachers: their own timing folder, N fixed
    c = per_epoch_per_1000(cpu_seconds(RUNS/f"timing{tn.group(0) if tn else ''}"/'cpu_seconds.csv'), KINDS)
    aa = cpu_seconds(RUNS/'size_n3000_e20'/'cpu_seconds.csv')[f'{teacher_run}_aa'] / N_AA
    print('one epoch, CPU s per 1,000 images: ' + ', '.join(f'{k} {v:.1f}' for k, v in c.items()) + f'; AutoAttack {aa:.2f} s/image')
    if tn:
        h = grid_hours(c, aa, FALLBACK, E)
        print(f"N={FALLBACK} E={E} (fixed by the amended plan): {h:.1f} CPU hours" + (f", over the {BUDGET_H:g}-hour budget" if h > BUDGET_H else ''))
        return
    choice = None
    for n in CANDIDATES:
        h = grid_hours(c, aa, n, E); print(f'N={n:>6} E={E}: {h:6.1f} CPU hours')
        if choice is None and h <= BUDGET_H: choice = n
    n = choice or FALLBACK
    print(f'choice: N={n}, E={E}' + ('' if choice else f' (nothing fits {BUDGET_H:g} h: N={FALLBACK}, '
                                      f'{grid_hours(c, aa, FALLBACK, E):.1f} CPU hours, the overrun stated)'))

if __name__ == '__main__':
    if len(sys.argv) != 2: sys.exit(__doc__)
    main(sys.argv[1])
