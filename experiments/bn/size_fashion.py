#!/usr/bin/env python
"""Setting 2's size (README.md, "Setting 2's sizing pilot", steps 1-2), computed from `runs/fashion/timing/cpu_seconds.csv`.

Usage (from the repository root): .venv/bin/python experiments/bn/size_fashion.py
One epoch's CPU seconds = CPU(2-epoch run) - CPU(1-epoch run), both on 2,000 images; AutoAttack's per image = the
200-image eval's CPU seconds / 200. Prints the per-1,000-image costs, the grid's CPU hours for each candidate, and the choice.
"""
import csv
from pathlib import Path

TIMING = Path(__file__).resolve().parent/'runs'/'fashion'/'timing'/'cpu_seconds.csv'
CANDIDATES, FALLBACK, BUDGET_H, SEEDS = (23000, 12000, 6000, 3000), (3000, 20), 12.0, 3

def cpu_seconds(path=TIMING)->dict:
    "name -> user + system CPU seconds (the last line of each name)."
    return {r[0]: float(r[1]) + float(r[2]) for r in csv.reader(path.open())}

def per_epoch_per_1000(t:dict, kinds=('teacher', 'ard', 'ard_igdm_keep', 'adaad'))->dict:
    "One epoch's CPU seconds per 1,000 training images of each kind (2,000-image runs: 2 epochs minus 1 epoch)."
    c = {k: (t[f'{k}_e2'] - t[k]) / 2 for k in kinds}
    c['adaad_igdm'] = c['adaad'] * c['ard_igdm_keep'] / c['ard']   # the plan's assumption for AdaAD + IGDM
    return c

def grid_hours(c:dict, aa_per_image:float, n:int, epochs:int)->float:
    "CPU hours of setting 2's grid: ARD and AdaAD x (base, update, keep) x 3 seeds, plus 18 AutoAttacks of 1,000 images."
    per_seed = c['ard'] + 2*c['ard_igdm_keep'] + c['adaad'] + 2*c['adaad_igdm']   # `update` costed as `keep`
    return (SEEDS * epochs * n/1000 * per_seed + 6*SEEDS * 1000*aa_per_image) / 3600

if __name__ == '__main__':
    t = cpu_seconds(); c = per_epoch_per_1000(t); aa = t['ard_aa'] / 200
    print('one epoch, CPU s per 1,000 images: ' + ', '.join(f'{k} {v:.1f}' for k, v in c.items()) + f'; AutoAttack {aa:.2f} s/image')
    choice = None
    for n in CANDIDATES:   # the largest N that fits at E = 30
        h = grid_hours(c, aa, n, 30); print(f'N={n:>6} E=30: {h:6.1f} CPU hours')
        if choice is None and h <= BUDGET_H: choice = (n, 30)
    n, e = choice or FALLBACK   # else N = 3,000 and E = 20, whether or not it fits (the overrun is stated)
    print(f'choice: N={n}, E={e}' + ('' if choice else f' (nothing fits {BUDGET_H:g} h at E=30: the plan\'s smallest '
                                      f'setting, {grid_hours(c, aa, n, e):.1f} CPU hours)'))
