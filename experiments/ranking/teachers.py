"Train the four digits teachers of experiments/ranking (small_cnn of width 16 and 64, PGD-AT and TRADES); finished ones are skipped."
import json, sys, time
from pathlib import Path
import timm
import igdmfast.models  # noqa: F401 (registers small_cnn)
from igdmfast.core import ThreatModel, seed_everything
from igdmfast.data import get_dls
from igdmfast.evaluate import robust_eval
from igdmfast.learner import adv_learner
from igdmfast.options import run_versions
from igdmfast.weights import save_weights

HERE = Path(__file__).parent
THREAT = ThreatModel.from_255(64, 16, n_steps=10)
EPOCHS, SEED = 30, 0
TEACHERS = {f'{m}_w{w}': (m, w) for w in (16, 64) for m in ('pgd_at', 'trades')}

def train(name):
    "Train one teacher into teachers/<name>/ (teacher.pt, config.json, metrics.json), unless it is there."
    out = HERE/'teachers'/name
    if (out/'metrics.json').is_file(): print(f"{name}: finished earlier, kept."); return
    method, width = TEACHERS[name]
    seed_everything(SEED)
    dls = get_dls('digits', bs=128, seed=SEED)
    model = timm.create_model('small_cnn', num_classes=dls.c, in_chans=dls.in_chans, width=width)
    learn = adv_learner(model, dls, method=method, threat=THREAT)
    t = time.time()
    with learn.no_bar(): learn.fit_one_cycle(EPOCHS)
    secs = time.time() - t
    model = learn.model.eval().requires_grad_(False)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out/'teacher.pt', arch='small_cnn', method=method, epochs=EPOCHS, seed=SEED, input_size=[1, 8, 8])
    res = robust_eval(model, dls.valid, attacks=('pgd20',), threat=THREAT, seed=0, progress=False, warn=False)
    cfg = dict(arch='small_cnn', width=width, method=method, epochs=EPOCHS, seed=SEED, bs=128, data='digits', eps=64, step=16,
               steps=10, protocol='fastai one cycle (lr 3e-3)', versions=run_versions())
    (out/'config.json').write_text(json.dumps(cfg, indent=2))
    (out/'metrics.json').write_text(json.dumps(dict(clean=res['clean'], pgd20=res['pgd20'], n=res.n, warnings=res.warnings,
                                                    seconds=round(secs, 1)), indent=2))
    print(f"{name}: clean {res['clean']:.2f}%, PGD-20 {res['pgd20']:.2f}% on {res.n}; {secs:.0f} s of training.", flush=True)

if __name__ == '__main__':
    for name in (sys.argv[1:] or TEACHERS): train(name)
