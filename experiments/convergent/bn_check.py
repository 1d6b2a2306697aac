"""An exploratory check, outside the pre-registered grid: does IGDM's drop come from BatchNorm's running statistics?

The question (README.md, tutorial 06): ARD+IGDM lowered AutoAttack accuracy, and so did alpha = 0, where the IGDM term
is off but its path still runs the extra student forward at x − δ (unclamped) in train mode. That forward updates
BatchNorm's running statistics, which evaluation uses, and which ARD's attack uses during training (eval mode).

The check, fixed before running it (second version; see below): load a trained student and replace every BatchNorm's
running mean and variance by their cumulative average over one pass of the 1,437 training images (train mode, no
augmentation, no gradient, weights untouched), computed on one of three image sets:
- 'adv': x′, ARD's inner attack on the student itself (PGD-10 on the cross-entropy, uniform start, eps 64/255, step
  16/255, student in eval mode with its own statistics), the images a base ARD step forwards in train mode;
- 'adv+minus': x′ and x − δ (δ = x′ − x, not clamped) in alternate batches, what the IGDM path forwards in train mode;
- 'clean': x.
Then evaluate clean, FGSM, PGD-20, C&W (10 steps) and AutoAttack (standard) on all 360 validation images, seed 0.
Runs: ARD base (adv and adv+minus; clean for seed 0), ARD+IGDM alpha 0 and alpha 5 (adv), seeds 0 and 1.

Reading: 'adv' on the base should leave its numbers about where they are (the control). If the IGDM runs recover to
the base's level under 'adv', and the base falls under 'adv+minus', the running statistics carry the drop; if not,
the trained weights do. Two seeds, so a direction, not an interval.

A first version recalibrated on clean images only: the base ARD student of seed 0 fell from 55.0 to 25.6 AutoAttack
accuracy, so clean statistics are not a neutral control here; the 'clean' entry of seed 0 repeats that measurement.
The numbers before recalibration are recomputed on this machine; the run's own (some runs ran in other sessions, on
other CPUs) are kept beside them, and AutoAttack before is the run's own evaluation.

Usage: PYTHONPATH=/work/frozen OMP_NUM_THREADS=1 .venv/bin/python -P experiments/convergent/bn_check.py
(the library frozen at the grid's commit, 32ea369). Resumable: each result is written to bn_check.json as it ends.
"""
import copy, json, time
from pathlib import Path
import torch
from torch import nn
from igdmfast.attacks import pgd
from igdmfast.core import ThreatModel
from igdmfast.data import get_dls
from igdmfast.evaluate import robust_eval
from igdmfast.models import load_teacher

HERE = Path(__file__).parent
GRID, OUT = HERE/'grid', HERE/'bn_check.json'
THREAT = ThreatModel(eps=64/255, step_size=16/255, n_steps=10)   # the grid's --eps 64 --steps 10 (step eps/4)
PLAN = {'main/ard_s0': ('adv', 'adv+minus', 'clean'), 'main/ard_s1': ('adv', 'adv+minus'),
        'alpha/ard_igdm_a0_s0': ('adv',), 'alpha/ard_igdm_a0_s1': ('adv',),
        'main/ard_igdm_s0': ('adv',), 'main/ard_igdm_s1': ('adv',)}

def recalibrate_bn(model:nn.Module, # the student; its weights are not changed
                   batches, # image batches to average the statistics over
                  )->nn.Module:
    "Replace every BatchNorm's running statistics by their cumulative average over `batches` in train mode."
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns: m.reset_running_stats(); m.momentum = None   # None: a cumulative average over the batches
    model.train()
    with torch.no_grad():
        for xb in batches: model(xb)
    for m, mo in zip(bns, saved): m.momentum = mo
    return model.eval()

def image_sets(model, dl)->dict:
    "The three recalibration sets of the training images: x′, x′ and x − δ alternating, x."
    g = torch.Generator().manual_seed(0)
    xs, advs = [], []
    for xb, yb in dl: xs.append(xb); advs.append(pgd(model, xb, yb, THREAT, generator=g))
    minus = [x - (a - x) for x, a in zip(xs, advs)]
    return {'adv': advs, 'adv+minus': [b for pair in zip(advs, minus) for b in pair], 'clean': xs}

def numbers(model, dls, aa:bool)->dict:
    "Clean/FGSM/PGD-20/C&W (and AutoAttack) accuracy in % on all validation images."
    attacks = ('clean', 'fgsm', 'pgd20', 'cw') + (('aa',) if aa else ())
    r = robust_eval(model, dls.valid, attacks=attacks, threat=THREAT, seed=0, progress=False, warn=False)
    return {k: r[k] for k in attacks}

def run_numbers(name:str)->dict:
    "The numbers a run recorded: its training evaluation and its AutoAttack evaluation."
    trained = next(v['numbers'] for k, v in json.loads((GRID/name/'metrics.json').read_text())['models'].items() if k.startswith('student'))
    aa = json.loads((GRID/f'{name}_aa'/'metrics.json').read_text())['models']['student.pt']['accuracy']['aa']
    return {**{k: trained[k] for k in ('clean', 'fgsm', 'pgd20', 'cw')}, 'aa': aa}

def main():
    torch.manual_seed(0)
    dls = get_dls('digits', bs=128, device='cpu', augment=False, seed=0)
    done = json.loads(OUT.read_text()) if OUT.exists() else {}
    for name, recals in PLAN.items():
        model = load_teacher(GRID/name/'student.pt').eval()
        r = done.setdefault(name, {})
        if 'recorded' not in r: r.update(recorded=run_numbers(name), before=numbers(model, dls, aa=False))
        sets = None
        for rc in recals:
            if rc in r: continue
            sets = sets or image_sets(model, dls.train.new(shuffle=False, drop_last=False))
            t0 = time.perf_counter()
            r[rc] = dict(numbers(recalibrate_bn(copy.deepcopy(model), sets[rc]), dls, aa=True), seconds=round(time.perf_counter() - t0, 1))
            OUT.write_text(json.dumps(done, indent=1) + '\n')
            print(name, rc, r[rc], flush=True)
    print("| run | recalibration | clean | PGD-20 | AA |\n|---|---|---|---|---|")
    for name, r in done.items():
        for rc in ('recorded', 'before') + PLAN[name]:
            n = r[rc]
            print(f"| {name} | {rc} | {n['clean']:.2f} | {n['pgd20']:.2f} | {n['aa']:.2f} |" if 'aa' in n else
                  f"| {name} | {rc} | {n['clean']:.2f} | {n['pgd20']:.2f} | |")

if __name__ == '__main__': main()
