#!/usr/bin/env python
"""The four students of one `igdmfast train --keep swa` run: last epoch, held-out-best epoch, SWA with BatchNorm
recomputed on x′ and on x, each as a checkpoint that `igdmfast eval` reads (issue #29, README.md here).

Usage (from the repository root, the same PYTHONPATH as the run):  python experiments/keep/weights.py RUN
Writes RUN/weights/{last,best,swa_adv,swa_clean}.pt and RUN/weights/weights.json. Everything comes from the run's
checkpoint.pt and config.json through the library's functions; the SWA path is the one `WeightAveraging.load_average`
takes at the end of the fit (the average's parameters into the last epoch's model, then `recalibrate_bn` over the
training images in order, seeded by the run's seed), so swa_<the run's bn_on>.pt must equal the run's student.pt bit
for bit: checked, as is that last.pt is the run's 'last epoch' row and that best.pt is its best held-out epoch.
"""
import json, random, sys
from pathlib import Path
import torch
from igdmfast.callback.adversarial import recalibrate_bn
from igdmfast.callback.averaging import holdout_split
from igdmfast.callback.checkpoint import load_checkpoint
from igdmfast.core import seed_everything
from igdmfast.learner import distill_learner
from igdmfast.options import parse_threat
from igdmfast.runs import build_model, load_teacher_arg, run_dls
from igdmfast.weights import read_checkpoint, save_weights

def same(a:dict, b:dict)->bool: return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

def bn_loader(dls, seed:int):
    "`WeightAveraging._bn_loader`'s batches: the training images in order, every one, augmentation seeded by `seed`."
    state = random.getstate()
    try: dl = dls.train.new(shuffle=False, drop_last=False)
    finally: random.setstate(state)
    dl.rng = random.Random(seed)
    return dl

def swa_student(cfg, dls, ck, on:str):
    "The SWA parameters in the last epoch's model, BatchNorm recomputed on `on` ('adv': the method's x′; 'clean': x)."
    model = build_model(cfg['student'], dls)
    model.load_state_dict(ck['model'])
    avg = ck['callbacks']['swa']['avg']
    params = list(model.parameters())
    assert len([k for k in avg if k.startswith('module.')]) == len(params), "the average does not fit the student"
    with torch.no_grad():
        for i, p in enumerate(params): p.copy_(avg[f'module.{i}'])
    teacher = load_teacher_arg(cfg['teacher'], 'cpu', cfg.get('teacher_arch'), cfg['data'], cfg.get('teacher_dir'), dls.c)
    learn = distill_learner(teacher, model, dls, method=cfg['method'], igdm=False, inner=cfg.get('inner'), check_teacher=False,
                            threat=parse_threat(cfg['eps'], cfg.get('step'), cfg['steps']), attack_dtype=cfg.get('attack_dtype', 'auto'))
    recalibrate_bn(learn, on=on, dl=bn_loader(learn.dls, cfg['seed']), seed=cfg['seed'])
    return model.eval()

def main(run:str):
    import igdmfast; print(f"igdmfast from {igdmfast.__file__}")
    run = Path(run)
    cfg = json.loads((run/'config.json').read_text())
    if cfg.get('keep') != 'swa' or not cfg.get('holdout'): sys.exit(f"{run}: not a --keep swa run with a hold-out.")
    ck, m = load_checkpoint(run/'checkpoint.pt'), json.loads((run/'metrics.json').read_text())
    if ck['next_epoch'] != cfg['epochs']: sys.exit(f"{run}: the checkpoint is at epoch {ck['next_epoch']} of {cfg['epochs']}.")
    seed_everything(cfg['seed'])
    dls, _ = holdout_split(run_dls(cfg, 'cpu'), n=cfg['holdout'], seed=cfg['seed'])
    sd, head = read_checkpoint(run/'student.pt')
    meta = {k: v for k, v in head['meta'].items() if k != 'kept'}
    out = run/'weights'; out.mkdir(exist_ok=True)
    best = ck['callbacks']['best_robust']
    kept = m['extra']['kept']
    info = dict(last=dict(epoch=cfg['epochs'] - 1), best=dict(epoch=best['best_epoch'], holdout_acc=best['best']),
                swa_adv=dict(start_epoch=kept['start_epoch'], n_averaged=kept['n_averaged'], bn_on='adv'),
                swa_clean=dict(start_epoch=kept['start_epoch'], n_averaged=kept['n_averaged'], bn_on='clean'))
    for name, state in (('last', ck['model']), ('best', best['best_state'])):
        model = build_model(cfg['student'], dls); model.load_state_dict(state)
        save_weights(model, out/f'{name}.pt', arch=cfg['student'], **meta, variant=name, **info[name])
    for on in ('adv', 'clean'):
        save_weights(swa_student(cfg, dls, ck, on), out/f'swa_{on}.pt', arch=cfg['student'], **meta, variant=f'swa_{on}', **info[f'swa_{on}'])
    swa_run = read_checkpoint(out/f"swa_{kept['bn_on']}.pt")[0]
    if not same(swa_run, sd): sys.exit(f"{run}: swa_{kept['bn_on']}.pt is not the run's student.pt: the post-hoc path differs.")
    info['checks'] = dict(swa_equals_student_pt=kept['bn_on'], best_epoch_in_metrics=kept.get('epoch', best['best_epoch']))
    (out/'weights.json').write_text(json.dumps(info, indent=1) + '\n')
    print(f"{run}: {', '.join(f'{k}.pt' for k in info if k != 'checks')} written; swa_{kept['bn_on']}.pt == student.pt bit for bit.")

if __name__ == '__main__': main(*sys.argv[1:])
