"""Tests of `igdmfast.evaluate`: accuracies against independent loops, masking checks on real digits, GD/GC in float64,
the fastai metrics inside a real validation pass, and the report files."""
import json
import os
import time
import warnings

os.environ.setdefault('MPLBACKEND', 'Agg')

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastai.callback.progress import CSVLogger
import fastai.callback.schedule  # noqa: F401  (fit_one_cycle)

from igdmfast.core import ThreatModel, seed_everything
from igdmfast.data import get_dls
from igdmfast.attacks import fgsm, pgd, cw_linf
from igdmfast.evaluate import (EvaluationWarning, GradCosine, GradDistance, RobustAccuracy, RobustResult, accuracy_vs_eps,
                               eval_batches, grad_alignment, plot_acc_vs_eps, plot_grad_cosines, plot_training_curves,
                               pointwise_distance, robust_eval, save_report, taylor_remainder)

EPS_CURVE = [0, 8/255, 16/255, 32/255]
MASKING = 'random noise|does not fall'


def small_cnn():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 16, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.fixture(scope='module')
def dls():
    return get_dls('digits', bs=64, device='cpu')


@pytest.fixture(scope='module')
def net(dls):
    "A small CNN trained naturally (no attack) on the real scikit-learn digits with a fastai Learner."
    seed_everything(0)
    # its own loaders, made after the seed: the shared `dls` draws its batch order from Python's global random state,
    # which depends on the tests run before in this process (xdist's scheduling), and so would the trained weights
    train_dls = get_dls('digits', bs=64, device='cpu')
    m = small_cnn()
    learn = Learner(train_dls, m, loss_func=nn.CrossEntropyLoss(), metrics=accuracy)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(5, 3e-3)
    m.eval().zero_grad(set_to_none=True)
    return m


@pytest.fixture(scope='module')
def valid(dls):
    return dls.valid.dataset.x.float(), dls.valid.dataset.y


class RoundInput(nn.Module):
    "Quantize the input to 5 grey levels: its input gradient is exactly zero (a gradient-masking 'defense')."
    def forward(self, x): return torch.round(x * 4) / 4


class Scaled(nn.Module):
    "Logits multiplied by 1000: the softmax saturates in float32 and the cross-entropy gradient vanishes."
    def __init__(self, m, k=1000.): super().__init__(); self.m, self.k = m, k
    def forward(self, x): return self.m(x) * self.k


def hand_pgd(model, x, y, eps, step, n_steps, gen):
    "PGD written the way the reference scripts do (`.backward()`, explicit clamps), uniform start from `gen`."
    x_adv = (x + (2 * torch.rand(x.shape, generator=gen) - 1) * eps).clamp(0, 1)
    for _ in range(n_steps):
        x_adv = x_adv.detach().requires_grad_(True)
        F.cross_entropy(model(x_adv), y, reduction='sum').backward()
        with torch.no_grad():
            x_adv = x_adv + step * x_adv.grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    model.zero_grad(set_to_none=True)
    return x_adv.detach()


def hand_fgsm(model, x, y, eps):
    x = x.clone().requires_grad_(True)
    F.cross_entropy(model(x), y, reduction='sum').backward()
    model.zero_grad(set_to_none=True)
    return (x + eps * x.grad.sign()).clamp(0, 1).detach()


def no_eval_warnings(caught):
    msgs = [str(w.message) for w in caught if issubclass(w.category, EvaluationWarning)]
    assert not msgs, msgs


# ----------------------------------------------------------------------------------------- (a) the numbers

def test_accuracies_match_independent_loops(net, dls):
    "Every accuracy is what a loop written from scratch gives on the same seed; 'any' is the per-sample AND."
    res = robust_eval(net, dls, attacks=('clean', 'fgsm', 'pgd20', 'pgd5', 'cw'), seed=7, progress=False)
    g20, g5, gcw = (torch.Generator().manual_seed(7) for _ in range(3))
    ok = {k: [] for k in ('clean', 'fgsm', 'pgd20', 'pgd5', 'cw')}
    hand = {k: [] for k in ('fgsm', 'pgd20')}
    g_hand = torch.Generator().manual_seed(7)
    for xb, yb in dls.valid:
        xb, yb = xb.as_subclass(torch.Tensor), yb.as_subclass(torch.Tensor)
        xs = dict(clean=xb, fgsm=fgsm(net, xb, yb, 8/255),
                  pgd20=pgd(net, xb, yb, ThreatModel(n_steps=20), generator=g20),
                  pgd5=pgd(net, xb, yb, ThreatModel(n_steps=5), generator=g5),
                  cw=cw_linf(net, xb, yb, ThreatModel(n_steps=30), generator=gcw))
        hs = dict(fgsm=hand_fgsm(net, xb, yb, 8/255), pgd20=hand_pgd(net, xb, yb, 8/255, 2/255, 20, g_hand))
        with torch.no_grad():
            for k, xa in xs.items(): ok[k].append(net(xa).argmax(1) == yb)
            for k, xa in hs.items(): hand[k].append(net(xa).argmax(1) == yb)
    ok = {k: torch.cat(v).numpy() for k, v in ok.items()}
    hand = {k: torch.cat(v).numpy() for k, v in hand.items()}
    n = len(dls.valid.dataset)
    assert res.n == n and res.n_total == n and not res.subset
    for k, v in ok.items():
        assert res.correct[k] == int(v.sum()), k
        assert res[k] == pytest.approx(100 * v.sum() / n, abs=1e-12), k
        np.testing.assert_array_equal(res.per_sample[k], v)
    for k, v in hand.items():   # the hand-written loops, independent of the engine, agree sample by sample
        np.testing.assert_array_equal(res.per_sample[k], v)
    worst = ok['clean'] & ok['fgsm'] & ok['pgd20'] & ok['pgd5'] & ok['cw']
    np.testing.assert_array_equal(res.per_sample['any'], worst)
    assert res['any'] == pytest.approx(100 * worst.mean(), abs=1e-12) and res.correct['any'] == worst.sum()
    assert res['any'] <= min(res[k] for k in ok)
    assert set(res.seconds) == {'clean', 'fgsm', 'pgd20', 'pgd5', 'cw', 'total'}
    assert res.threat == ThreatModel() and res.labels['pgd20'] == 'PGD-20' and res.labels['cw'] == 'C&W∞'
    json.dumps(res.to_dict())


def test_seeded_subset_and_state(net, dls, valid):
    "Same call, same numbers; a subset is the same for every attack and every data form; model state untouched."
    m = small_cnn(); m.load_state_dict(net.state_dict()); m.train()
    m[0].weight.requires_grad_(False)
    bufs = [b.clone() for b in m.buffers()]
    kw = dict(attacks=('clean', 'fgsm', 'pgd10'), n=100, seed=3, progress=False)
    a = robust_eval(m, dls, **kw)
    b = robust_eval(m, valid, bs=17, **kw)
    c = robust_eval(m, dls.valid, **kw)
    assert m.training and all(sub.training for sub in m.modules())
    assert [p.requires_grad for p in m.parameters()] == [False] + [True] * (len(list(m.parameters())) - 1)
    assert all(p.grad is None for p in m.parameters())
    assert all(torch.equal(u, v) for u, v in zip(bufs, m.buffers()))
    assert a.to_dict()['accuracy'] == b.to_dict()['accuracy'] == c.to_dict()['accuracy']
    np.testing.assert_array_equal(a.indices, b.indices)
    assert a.subset and a.n == 100 and a.n_total == 360 and 'subset' in repr(a)
    x, y = valid
    sub = robust_eval(m, (x[a.indices], y[a.indices]), bs=100, **{**kw, 'n': None})
    assert sub.accuracy == a.accuracy and not sub.subset
    other = robust_eval(m, dls, **{**kw, 'seed': 4})
    assert not np.array_equal(other.indices, a.indices)


def test_data_forms_and_errors(net, dls, valid):
    x, y = valid
    assert [len(yb) for _, yb in eval_batches((x, y), bs=100)] == [100, 100, 100, 60]
    with pytest.raises(ValueError, match='Unknown attack'): robust_eval(net, dls, attacks=('pgd20', 'deepfool'), progress=False)
    with pytest.raises(ValueError, match='images must be in'): robust_eval(net, (x * 255, y), attacks=('clean',), progress=False)
    with pytest.raises(ValueError, match='samples'): robust_eval(net, (x[:3], y[:2]), progress=False)
    r = robust_eval(net, iter([(x[:50], y[:50]), (x[50:90], y[50:90])]), attacks='clean,fgsm', n=20, progress=False)
    assert r.n == 20 and r.subset and r.n_total == 90
    assert isinstance(r, RobustResult) and dict(r).keys() == {'clean', 'fgsm', 'any'}


# ----------------------------------------------------------------------------------------- (b) masking checks

def test_natural_model_no_masking_warning(net, dls):
    "Trained naturally on real digits: accuracy falls with eps, and no check fires."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        curve = accuracy_vs_eps(net, dls, EPS_CURVE, n=128, progress=False)
        res = robust_eval(net, dls, attacks=('clean', 'fgsm', 'pgd20', 'cw'), n=128, progress=False)
        res_aa = robust_eval(net, dls, attacks=('clean', 'pgd20', 'aa'), threat=ThreatModel.from_255(24, 6), n=32,
                             aa_version='custom', aa_attacks=('apgd-ce',), progress=False)
    print('natural:', curve, res, res_aa, sep='\n  ')
    no_eval_warnings(caught)
    assert curve.warnings == [] and res.warnings == [] and res_aa.warnings == []
    acc = curve.accuracy
    assert all(a >= b for a, b in zip(acc, acc[1:])) and acc[-1] < acc[0] - 20
    assert acc[-1] < curve.noise[-1] - 20   # PGD does far better than noise of the same size
    assert res['pgd20'] <= res['fgsm'] <= res['clean']
    assert res_aa['aa'] < res_aa['clean'] - 10   # AutoAttack does real damage at 24/255, and no check fires


def test_rounded_input_model_warns(net, dls):
    "Input rounding gives zero input gradients: the curve stays flat, and AutoAttack's DLR check sees the zeros."
    masked = nn.Sequential(RoundInput(), net).eval()
    with pytest.warns(EvaluationWarning, match=MASKING):
        curve = accuracy_vs_eps(masked, dls, EPS_CURVE, n=128, progress=False)
    print('rounded input:', curve)
    assert curve.accuracy == curve.noise   # PGD never leaves its random start
    assert curve.accuracy[-1] > curve.accuracy[0] - 2
    with pytest.warns(EvaluationWarning, match='zero input gradient'):
        res = robust_eval(masked, dls, attacks=('clean', 'fgsm', 'aa'), n=16, aa_version='custom',
                          aa_attacks=('apgd-ce', 'apgd-dlr'), progress=False)
    assert any('zero input gradient' in w for w in res.warnings)
    assert res['fgsm'] == res['clean']   # the gradient step does not move the input at all


def test_saturated_softmax_model_warns(net, dls):
    "Logits x1000 (defensive-distillation style): PGD on the cross-entropy stalls; the curve check catches it."
    masked = Scaled(net).eval()
    with pytest.warns(EvaluationWarning, match=MASKING):
        curve = accuracy_vs_eps(masked, dls, EPS_CURVE, n=128, progress=False)
    print('saturated softmax:', curve)
    assert any('random noise' in w for w in curve.warnings)
    natural = accuracy_vs_eps(net, dls, EPS_CURVE, n=128, progress=False, warn=False)
    assert curve.accuracy[-1] > natural.accuracy[-1] + 20   # it looks far more robust than the same network is


def test_fgsm_below_pgd_and_robust_above_clean_checks():
    "The two single-evaluation checks, on numbers that show them."
    from igdmfast.evaluate import masking_warnings
    assert any('one-step' in m for m in masking_warnings({'clean': 80., 'fgsm': 20., 'pgd20': 35., 'any': 20.}))
    assert any('above clean' in m for m in masking_warnings({'clean': 50., 'pgd20': 60., 'any': 50.}))
    assert masking_warnings({'clean': 80., 'fgsm': 40., 'pgd20': 35., 'any': 35.}) == []


def test_probability_output_warning_from_autoattack(net, dls):
    "AutoAttack's own check (outputs that are probabilities) is captured into the result and warned."
    probs = nn.Sequential(net, nn.Softmax(1)).eval()
    with pytest.warns(EvaluationWarning, match='probability distribution'):
        res = robust_eval(probs, dls, attacks=('aa',), n=8, aa_version='custom', aa_attacks=('apgd-ce',), progress=False)
    assert any(w.startswith('AutoAttack: ') and 'probability' in w for w in res.warnings)


def test_autoattack_standard_small(net, dls):
    "The standard version (APGD-CE, APGD-T, FAB-T, Square) on 16 images at 32/255, seeded: the same twice, >= PGD-20."
    t = time.time()
    kw = dict(attacks=('clean', 'pgd20', 'aa'), threat=ThreatModel.from_255(32, 8), n=16, progress=False)
    a = robust_eval(net, dls, **kw)
    print(f'standard AutoAttack on 16 digits: {a.seconds["aa"]:.1f} s; {a}')
    b = robust_eval(net, dls, **kw)
    assert a.accuracy == b.accuracy
    np.testing.assert_array_equal(a.per_sample['aa'], b.per_sample['aa'])
    assert a['aa'] <= a['clean'] and a['any'] <= a['aa'] and a['aa'] <= a['pgd20'] + 100 / 16
    assert a['aa'] < a['clean']
    assert 'standard' in a.attacks['aa']


# ----------------------------------------------------------------------------------------- (c) GD / GC

def _double_pair():
    torch.manual_seed(0)
    s, t = small_cnn().double(), small_cnn().double()
    for m in (s, t):   # non-trivial BatchNorm statistics, used in eval mode
        with torch.no_grad(): m.train()(torch.rand(64, 1, 8, 8, dtype=torch.float64))
    return s, t


def test_grad_alignment_matches_per_sample_float64_loop():
    s, t = _double_pair()
    s.train(); t.eval(); s[0].weight.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(23, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (23,), generator=g)
    flags = [p.requires_grad for p in [*s.parameters(), *t.parameters()]]
    bufs = [b.clone() for b in [*s.buffers(), *t.buffers()]]
    ga = grad_alignment(s, t, (x, y), bs=7)
    gd, gc = [], []
    for i in range(len(x)):
        grads = []
        for m in (t, s):
            was = m.training; m.eval()
            xi = x[i:i+1].clone().requires_grad_(True)
            gi, = torch.autograd.grad(F.cross_entropy(m(xi), y[i:i+1]), xi)
            m.train(was); grads.append(gi.flatten())
        gt, gs = grads
        gd.append((gt - gs).norm().item()); gc.append((gt @ gs / (gt.norm() * gs.norm())).item())
    np.testing.assert_allclose(ga['per_sample_gd'], gd, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(ga['per_sample_gc'], gc, rtol=1e-10, atol=1e-14)
    assert ga['gd'] == pytest.approx(np.mean(gd), rel=1e-12) and ga['gc'] == pytest.approx(np.mean(gc), rel=1e-12)
    assert ga['n'] == 23 and not ga['subset']
    # nothing changed on the models
    assert s.training and not t.training
    assert [p.requires_grad for p in [*s.parameters(), *t.parameters()]] == flags
    assert all(p.grad is None for p in [*s.parameters(), *t.parameters()])
    assert all(torch.equal(u, v) for u, v in zip(bufs, [*s.buffers(), *t.buffers()]))
    # a model with itself
    same = grad_alignment(s, s, (x, y))
    assert same['gd'] == 0 and same['gc'] == pytest.approx(1, abs=1e-12)
    np.testing.assert_allclose(same['per_sample_gc'], 1, atol=1e-12)


def test_grad_alignment_on_subset_and_under_no_grad(net, dls):
    seed_everything(1)
    other = small_cnn().eval()
    with torch.no_grad(): ga = grad_alignment(other, net, dls, n=50, seed=2)
    assert ga['n'] == 50 and ga['subset'] and -1 <= ga['gc'] <= 1 and ga['gd'] > 0


def test_taylor_remainder_matches_explicit_jacobian():
    s, _ = _double_pair(); s.eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(6, 1, 8, 8, generator=g, dtype=torch.float64), torch.zeros(6, dtype=torch.long)
    tr = taylor_remainder(s, (x, y), eps=8/255, seed=5)
    gen = torch.Generator().manual_seed(5)
    e = (x + (2 * torch.rand(x.shape, generator=gen, dtype=x.dtype) - 1) * 8/255).clamp(0, 1) - x
    for i in range(6):
        J = torch.autograd.functional.jacobian(s, x[i:i+1]).reshape(10, -1)
        with torch.no_grad():
            f0, f1 = s(x[i:i+1])[0], s(x[i:i+1] + e[i:i+1])[0]
        r = ((f1 - f0 - J @ e[i].flatten()).norm() / f1.norm()).item()
        assert tr['per_sample'][i] == pytest.approx(r, rel=1e-8)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).double().eval()
    assert taylor_remainder(lin, (x, y))['mean'] < 1e-12


def test_pointwise_distance_random_matches_manual():
    s, t = _double_pair(); s.eval(); t.eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(9, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (9,), generator=g)
    pw = pointwise_distance(s, t, (x, y), 'random', seed=4)
    gen = torch.Generator().manual_seed(4)
    xa = (x + (2 * torch.rand(x.shape, generator=gen, dtype=x.dtype) - 1) * 8/255).clamp(0, 1)
    with torch.no_grad(): ref = (t(xa) - s(xa)).norm(dim=1).numpy()
    np.testing.assert_allclose(pw['per_sample'], ref, rtol=1e-12)
    adv = pointwise_distance(s, t, (x, y), 'adversarial', threat=ThreatModel(n_steps=3))
    xa = pgd(s, x, y, ThreatModel(n_steps=3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(): ref = (t(xa) - s(xa)).norm(dim=1).numpy()
    np.testing.assert_allclose(adv['per_sample'], ref, rtol=1e-12)
    assert pointwise_distance(s, s, (x, y), 'rslad', threat=ThreatModel(n_steps=2))['mean'] == 0


# ----------------------------------------------------------------------------------------- (d) fastai metrics

def test_robust_accuracy_metric_equals_robust_eval(net, dls, valid):
    m = small_cnn(); m.load_state_dict(net.state_dict())
    learn = Learner(dls, m, loss_func=nn.CrossEntropyLoss(),
                    metrics=[accuracy, RobustAccuracy(), RobustAccuracy(n_steps=5, n=100, seed=3), GradCosine(net), GradDistance(net)])
    with learn.no_bar(), learn.no_logging(): vals = learn.validate()
    names = [mt.name for mt in learn.metrics]
    assert names == ['accuracy', 'pgd20_acc', 'pgd5_acc', 'grad_cos', 'grad_dist']
    got = dict(zip(names, vals[1:]))
    res = robust_eval(m, dls, attacks=('clean', 'pgd20'), progress=False)
    assert got['pgd20_acc'] * 100 == pytest.approx(res['pgd20'], abs=1e-9)
    assert got['accuracy'] * 100 == pytest.approx(res['clean'], abs=1e-4)
    x, y = valid
    sub = robust_eval(m, (x[:100], y[:100]), attacks=('pgd5',), bs=64, seed=3, progress=False)
    assert got['pgd5_acc'] * 100 == pytest.approx(sub['pgd5'], abs=1e-9)
    assert got['grad_cos'] == pytest.approx(1, abs=1e-6) and got['grad_dist'] == pytest.approx(0, abs=1e-6)  # same weights as the teacher
    # the same numbers on a second validation pass (the generator restarts every pass)
    with learn.no_bar(), learn.no_logging(): vals2 = learn.validate()
    assert vals2[2] == vals[2] and vals2[3] == vals[3]


def test_metrics_during_fit_and_adv_training(net, dls):
    "In `fit`: metric values of the last epoch equal the library functions at the final weights; also with an AdvLearner."
    from igdmfast.learner import adv_learner
    seed_everything(2)
    stu = small_cnn()
    learn = Learner(dls, stu, loss_func=nn.CrossEntropyLoss(), lr=3e-3,
                    metrics=[accuracy, RobustAccuracy(n=128), GradCosine(net, n=128)])
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    vals = dict(zip(learn.recorder.metric_names[3:-1], learn.recorder.values[-1][2:]))
    stu.eval()
    x, y = dls.valid.dataset.x.float(), dls.valid.dataset.y
    assert vals['pgd20_acc'] * 100 == pytest.approx(robust_eval(stu, (x[:128], y[:128]), attacks=('pgd20',), bs=64,
                                                                 progress=False)['pgd20'], abs=1e-9)
    assert vals['grad_cos'] == pytest.approx(grad_alignment(stu, net, (x[:128], y[:128]))['gc'], abs=1e-6)
    seed_everything(3)
    al = adv_learner(small_cnn(), dls, threat=ThreatModel(n_steps=3), metrics=[accuracy, RobustAccuracy(n=64)])
    with al.no_bar(), al.no_logging(): al.fit(1)
    names = al.recorder.metric_names
    assert 'pgd20_acc' in names and 0 <= al.recorder.values[-1][names.index('pgd20_acc') - 1] <= 1
    assert all(p.grad is None for p in net.parameters())


# ----------------------------------------------------------------------------------------- (e) reports

def _is_png(p):
    import matplotlib.image as mpimg
    data = p.read_bytes()
    img = mpimg.imread(p)
    return data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 1000 and img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_report_files(net, dls, tmp_path):
    masked = nn.Sequential(RoundInput(), net).eval()
    res = robust_eval(net, dls, attacks=('clean', 'fgsm', 'pgd20', 'cw', 'pgd5'), n=64, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        res_m = robust_eval(masked, dls, attacks=('clean', 'fgsm', 'pgd20'), n=64, progress=False)
        curves = {'natural': accuracy_vs_eps(net, dls, n=64, progress=False),
                  'rounded input': accuracy_vs_eps(masked, dls, n=64, progress=False)}
    seed_everything(1)
    other = small_cnn().eval()
    ga = grad_alignment(other, net, dls, n=64)
    learn = Learner(dls, other, loss_func=nn.CrossEntropyLoss(), metrics=accuracy, path=tmp_path)
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-3, cbs=CSVLogger(fname='history.csv'))
    pngs = [plot_acc_vs_eps(curves, tmp_path/'acc_vs_eps.png'),
            plot_grad_cosines({'untrained vs natural': ga['per_sample_gc']}, tmp_path/'grad_cos.png'),
            plot_training_curves(tmp_path/'history.csv', tmp_path/'training.png'),
            plot_training_curves(learn.recorder, tmp_path/'plots'/'training_rec.png')]
    for p in pngs: assert p.is_file() and _is_png(p), p
    assert curves['natural'].eps[0] == 0 and curves['natural'].eps[-1] == pytest.approx(16/255)
    out = save_report({'natural CNN': res, 'rounded input': res_m, 'from a dict': {'clean': 50.0, 'aa': 12.5}}, tmp_path,
                      name='Digits', alignment={'natural CNN': ga}, plots=pngs, extra={'curves': curves})
    assert out['metrics'] == tmp_path/'metrics.json' and out['report'] == tmp_path/'report.md'
    md = out['report'].read_text()
    lines = md.splitlines()
    assert '| Model | Clean | FGSM | PGD-20 | C&W∞ | AA | GD | GC |' in lines
    row = next(l for l in lines if l.startswith('| natural CNN |'))
    cells = [c.strip() for c in row.strip('|').split('|')]
    assert cells == ['natural CNN', f"{res['clean']:.2f}", f"{res['fgsm']:.2f}", f"{res['pgd20']:.2f}", f"{res['cw']:.2f}", '–',
                     f"{ga['gd']:.3f}", f"{ga['gc']:.3f}"]
    assert '| from a dict | 50.00 | – | – | – | 12.50 | – | – |' in lines
    assert 'PGD-5' in md and 'seeded subset' in md and '![acc_vs_eps](acc_vs_eps.png)' in md
    assert '![training_rec](plots/training_rec.png)' in md
    m = json.loads(out['metrics'].read_text())
    assert m['models']['natural CNN']['accuracy']['pgd20'] == pytest.approx(res['pgd20'])
    assert m['models']['natural CNN']['numbers']['gc'] == pytest.approx(ga['gc'])
    assert m['models']['natural CNN']['threat']['eps'] == pytest.approx(8/255)
    assert m['extra']['curves']['natural']['accuracy'] == curves['natural'].accuracy
    assert not list(tmp_path.rglob('*.tmp'))


def test_plot_errors(tmp_path):
    (tmp_path/'empty.csv').write_text('epoch,train_loss,valid_loss,time\n')
    with pytest.raises(ValueError, match='empty'): plot_training_curves(tmp_path/'empty.csv', tmp_path/'x.png')
    assert not (tmp_path/'x.png').exists()


# --- issue #18 item 6: the paper's table keyed by (method, igdm); issue #18 item 2 and #14 items 6 and 11: the report's
# intervals and columns, data of another size than the model's training size

def wilson(c, n, z=1.959963984540054):
    "The Wilson score interval worked by hand, in %."
    p = c / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 100 * (centre - half), 100 * (centre + half)


def test_paper_table_keeps_both_igdm_rows_of_the_same_alpha():
    "ARD+IGDM and AdaAD+IGDM both at α=5: a table keyed by '+IGDM (α=5)' kept one row and showed ARD's AA 12 under AdaAD."
    from igdmfast.evaluate import paper_table
    vs = {'ard': dict(method='ard', igdm=False, alpha=None, aa=11.0, pgd20=20.1), 'ard_igdm': dict(method='ard', igdm=True, alpha=5, aa=12.0, pgd20=21.0),
          'adaad': dict(method='adaad', igdm=False, alpha=None, aa=9.0, pgd20=19.0), 'adaad_igdm': dict(method='adaad', igdm=True, alpha=5, aa=8.0, pgd20=18.5)}
    old = {('  +IGDM (α=%g)' % v['alpha']) if v['igdm'] else v['method'].upper(): v for v in vs.values()}   # the tutorial's keying
    assert len(old) == 3 and old['  +IGDM (α=5)']['aa'] == 8.0   # the collision: one row lost
    t = paper_table(vs, teacher=dict(name='tiny_resnet_cifar', aa=15.0, pgd20=24.4))
    assert list(t) == ['Teacher (tiny_resnet_cifar)', 'ARD', 'ARD + IGDM (α=5)', 'ADAAD', 'ADAAD + IGDM (α=5)']
    for label, key in [('ARD', 'ard'), ('ARD + IGDM (α=5)', 'ard_igdm'), ('ADAAD', 'adaad'), ('ADAAD + IGDM (α=5)', 'adaad_igdm')]:
        assert t[label]['aa'] == vs[key]['aa'] and t[label]['pgd20'] == vs[key]['pgd20'], label
    assert t['Teacher (tiny_resnet_cifar)']['aa'] == 15.0 and t['ARD']['clean'] is None
    with pytest.raises(ValueError, match='aggregate_compare'): paper_table(list(vs.values()) + [dict(vs['ard'], seed=1)])
    with pytest.raises(ValueError, match="'method' and 'igdm'"): paper_table([dict(aa=1.0)])


def test_paper_table_matches_the_cifar10_run_folder():
    "The committed CIFAR-10 comparison: every variant's row holds that variant's own result.json numbers."
    from pathlib import Path
    from igdmfast.evaluate import paper_table
    exp = Path(__file__).resolve().parents[1]/'experiments'/'cifar10'/'compare'
    if not exp.is_dir(): pytest.skip('experiments/cifar10/compare is not in this checkout')
    vs = {}
    for d in sorted(p for p in exp.iterdir() if (p/'result.json').is_file() and (p/'config.json').is_file()):
        cfg = json.loads((d/'config.json').read_text())
        vs[d.name] = dict(json.loads((d/'result.json').read_text()), method=cfg['method'], igdm=cfg['igdm'], alpha=cfg.get('alpha_used'))
    t = paper_table(vs)
    assert len(t) == len(vs) == 6
    for name, v in vs.items():
        label = v['method'].upper() + (f" + IGDM (α={v['alpha']:g})" if v['igdm'] else '')
        assert t[label]['aa'] == v['aa'] and t[label]['pgd20'] == v['pgd20'], label


def test_report_gives_each_accuracy_its_interval_and_image_count(tmp_path, dls):
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    res = robust_eval(net, dls, attacks=('clean', 'fgsm', 'pgd5'), n=100, progress=False, warn=False)
    nums = dict(clean=80.0, pgd20=41.3, aa=15.0, any=40.1, n=1000, n_aa=100, seconds=12.5)
    out = save_report({'eval': res, 'numbers': nums, 'no counts': {'clean': 50.0, 'aa': 12.5}}, tmp_path)
    lines = out['report'].read_text().splitlines()
    head = lines.index('## Uncertainty of each accuracy')
    table = [l for l in lines[head:] if l.startswith('| ')][:4]
    cols = [c.strip() for c in table[0].strip('|').split('|')]
    assert cols == ['Model', 'Clean', 'FGSM', 'PGD-20', 'AA', 'PGD-5', 'Worst case']
    cell = lambda row, col: [c.strip() for c in row.strip('|').split('|')][cols.index(col)]
    fmt = lambda c, n: '%.1f–%.1f (n=%d)' % (*wilson(c, n), n)
    for k, col in [('clean', 'Clean'), ('fgsm', 'FGSM'), ('pgd5', 'PGD-5'), ('any', 'Worst case')]:
        assert cell(table[1], col) == fmt(res.correct[k], 100), col
    assert cell(table[1], 'AA') == '–' and cell(table[1], 'PGD-20') == '–'
    assert cell(table[2], 'Clean') == fmt(800, 1000) and cell(table[2], 'PGD-20') == fmt(413, 1000) and cell(table[2], 'AA') == fmt(15, 100)
    assert cell(table[3], 'Clean') == 'n unknown' and any('No image count' in l and 'no counts' in l for l in lines)
    m = json.loads(out['metrics'].read_text())['models']
    assert m['numbers']['intervals']['aa']['n'] == 100 and m['numbers']['intervals']['aa']['correct'] == 15
    assert 'n' not in m['numbers']['numbers'] and 'n_aa' not in m['numbers']['numbers'] and m['no counts']['intervals'] == {}
    lo, hi = wilson(res.correct['pgd5'], 100)
    assert (m['eval']['intervals']['pgd5']['low'], m['eval']['intervals']['pgd5']['high']) == pytest.approx((lo, hi), abs=1e-9)


def test_report_other_numbers_are_named_explained_and_never_empty(tmp_path):
    "#14 item 11: 'Other numbers' had an unexplained 'any' column and Samples/Seconds columns of '–' only."
    out = save_report({'teacher': {'clean': 40.5, 'aa': 15.0, 'any': 21.2}, 'student': {'clean': 33.2, 'any': 11.6}}, tmp_path/'a')
    md = out['report'].read_text()
    assert '| Model | Worst case |' in md and '| teacher | 21.20 |' in md and '| any ' not in md
    assert 'Samples' not in md and 'Seconds' not in md and '**Worst case**: the % of images that every attack' in md
    md = save_report({'s': dict(clean=33.2, any=11.6, n=1000, seconds=7.25)}, tmp_path/'b')['report'].read_text()
    assert '| Model | Worst case | Samples | Seconds |' in md and '| s | 11.60 | 1000 | 7.2 |' in md
    assert '**Samples**' in md and '**Seconds**' in md


def test_robust_eval_refuses_data_of_another_size_than_the_training_size(tmp_path):
    "#14 item 6: an 8x8 digits model with global pooling runs on 28x28 MNIST and scores near chance with no word."
    from igdmfast.evaluate import checkpoint_input_size
    from igdmfast.models import save_weights
    gap = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    mnist_like = (torch.rand(6, 1, 28, 28), torch.arange(6))
    assert robust_eval(gap, mnist_like, attacks=['clean'], progress=False).n == 6   # no size check: it runs
    f = save_weights(gap, tmp_path/'digits_student.pt', input_size=[1, 8, 8])
    size = checkpoint_input_size(f)
    assert size == (1, 8, 8)
    with pytest.raises(ValueError, match=r'trained on 1x8x8 images but the data.s images are 1x28x28'):
        robust_eval(gap, mnist_like, attacks=['clean', 'pgd20'], input_size=size, progress=False)
    assert robust_eval(gap, (torch.rand(6, 1, 8, 8), torch.arange(6)), attacks=['clean'], input_size=size, progress=False).n == 6
    assert robust_eval(gap, (torch.rand(6, 1, 8, 8), torch.arange(6)), attacks=['clean'], input_size=(8, 8), progress=False).n == 6
    with pytest.raises(ValueError, match='trained on 8x8'):
        robust_eval(gap, mnist_like, attacks=['clean'], input_size=(8, 8), progress=False)
    assert checkpoint_input_size(save_weights(gap, tmp_path/'old.pt')) is None
    with pytest.raises(ValueError, match='input_size must be'): robust_eval(gap, mnist_like, attacks=['clean'], input_size=(8,), progress=False)
