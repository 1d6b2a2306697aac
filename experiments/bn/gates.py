#!/usr/bin/env python
"""Setting 2's gates (README.md, "Setting 2's sizing pilot", steps 3-4), read from the run folders: `gates.json`.

Usage (from the repository root):  .venv/bin/python experiments/bn/gates.py [fashion|cifar [N E]]   (default: fashion 3000 20)
Teacher gate: in the plan's order (ORDERS: Fashion-MNIST small_cnn for E epochs, for 2E, tiny_resnet_cifar for 2E; the
CIFAR-10 subset tiny_resnet_cifar for 2E, 4E on the students' N, then on all 10,000 images), the first teacher
whose AutoAttack accuracy on the 1,000 seeded test images beats the PGD-AT student's (E epochs, same images) by at
least 5 points is the teacher. Convergence gate: with that teacher, the ARD base student of 2E epochs must not move
PGD-20 (in training, on the 1,000 validation images) by 5 points or more from the E-epoch student. Nothing is typed
by hand; a gate whose runs have not finished says so.
"""
import json, sys
from pathlib import Path
from igdmfast.core import atomic_write

HERE = Path(__file__).resolve().parent
TEACHER_MARGIN, CONVERGENCE = 5.0, 5.0   # AutoAttack points; PGD-20 points
# README.md, each plan's step 3 / 1: (arch, epochs, the teacher's training images: None = the students' N); the CIFAR-10
# plan's last two are its amendment's teachers, trained on all 10,000 images
ORDERS = {'fashion': lambda e: [('small_cnn', e, None), ('small_cnn', 2 * e, None), ('tiny_resnet_cifar', 2 * e, None)],
          'cifar': lambda e: [('tiny_resnet_cifar', 2 * e, None), ('tiny_resnet_cifar', 4 * e, None),
                              ('tiny_resnet_cifar', 2 * e, 10000), ('tiny_resnet_cifar', 4 * e, 10000)]}

def _numbers(f:Path)->dict|None:
    "The first model's numbers of a metrics.json, or None if the run has not finished."
    if not f.is_file(): return None
    return next(iter(json.loads(f.read_text())['models'].values()))['numbers']

def _student(f:Path)->dict|None:
    "The student's numbers of a `train` metrics.json (in-training, on the validation images), or None if not finished."
    if not f.is_file(): return None
    m = json.loads(f.read_text())['models']
    return m[next(k for k in m if k.startswith('student'))]['numbers']

def gates(n:int, e:int, dataset:str='fashion')->dict:
    d = HERE/'runs'/dataset/f'size_n{n}_e{e}'
    pgdat = _numbers(d/'pgdat_student_aa'/'metrics.json')
    order = ORDERS[dataset](e)
    teachers, chosen = [], None
    for arch, te, tn in order:
        suffix = '' if tn is None or tn == n else f'_n{tn}'   # grid.sh's TN folders
        t = _numbers(d/f'teacher_{arch}_e{te}{suffix}_aa'/'metrics.json')
        row = dict(arch=arch, epochs=te, n_train=tn or n, folder=f'teacher_{arch}_e{te}{suffix}',
                   aa=None if t is None else t['aa'], clean=None if t is None else t['clean'])
        if t is not None and pgdat is not None:
            row['margin'] = t['aa'] - pgdat['aa']
            row['passes'] = row['margin'] >= TEACHER_MARGIN
        teachers.append(row)
    for row in teachers:   # in the plan's order: an undecided teacher blocks every later one
        if row.get('passes') is None: break
        if row['passes']: chosen = row; break
    conv = None
    if chosen is not None:
        st = d/chosen['folder'].replace('teacher_', 'students_', 1)
        a, b = _student(st/'ard_s0'/'metrics.json'), _student(st/'ard_2e_s0'/'metrics.json')
        conv = dict(pgd20_e=None if a is None else a['pgd20'], pgd20_2e=None if b is None else b['pgd20'])
        if a is not None and b is not None:
            conv['difference'] = b['pgd20'] - a['pgd20']
            conv['passes'] = abs(conv['difference']) < CONVERGENCE
    none_passes = {'fashion': 'no teacher passes: setting 2 moves to the CIFAR-10 subset (README, step 3)',
                   'cifar': "no teacher passes: setting 2 cannot be run here, the default stays 'update' (README, CIFAR-10 plan step 5)"}
    outcome = ('teacher chosen' if chosen else none_passes[dataset]
               if pgdat is not None and all(t.get('passes') is False for t in teachers) else 'undecided')
    return dict(dataset=dataset, n=n, e=e, outcome=outcome, pgdat_student=None if pgdat is None else dict(aa=pgdat['aa'], clean=pgdat['clean']),
                teacher_margin=TEACHER_MARGIN, teachers=teachers, teacher=chosen, convergence=conv,
                rule=__doc__.split('\n\n')[1].replace('\n', ' '))

def main(argv=sys.argv[1:]):
    dataset = argv[0] if argv else 'fashion'
    n, e = (int(argv[1]), int(argv[2])) if len(argv) > 1 else (3000, 20)
    g = gates(n, e, dataset)
    atomic_write(HERE/('gates.json' if dataset == 'fashion' else f'gates_{dataset}.json'), lambda f: f.write((json.dumps(g, indent=1) + '\n').encode()))
    p = g['pgdat_student']
    print(f"PGD-AT student: AA {p['aa'] if p else 'not finished'}")
    for t in g['teachers']:
        print(f"teacher {t['arch']} {t['epochs']} epochs on {t['n_train']} images: AA {t['aa']}, margin {t.get('margin')}, passes {t.get('passes')}")
    print(f"{g['outcome']}: {g['teacher']['arch'] + ' ' + str(g['teacher']['epochs']) if g['teacher'] else '-'}; convergence: {g['convergence']}")

if __name__ == '__main__': main()
