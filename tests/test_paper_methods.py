"""Issue #16 items 3-5 and issue #14 items 9-11 (learner): the official random start of the KL-type inner maximizations
on real images, AdaIAD and the teacher-free inner maximization in the registry, and the learner's messages.

1. The official start. TRADES, RSLAD and AdaAD start their attack at x + 0.001·N(0,I) without clamping to [0,1]
   (`trades.py`, `rslad_loss.py`). On real CIFAR-10 images that hold pixels at 0 and at 255, one float64 step of
   igdmfast with IGDM must equal the official scripts' step written as they are (`bench/reference.py` for RSLAD and
   AdaAD, the `trades.py` step below for TRADES) from the same noise tensor: the same x′, loss and gradients. The
   same check run on the old behaviour (the start clamped) must fail, so it can see that departure.
2. AdaIAD shares AdaAD's α in every row of the table; the teacher-free option is validated with the choices listed.
   (The steps of both against hand-written float64 steps and their forward passes are in test_distill_steps.py.)
3. `distill_learner` / `adv_learner`: a float threat and a tensor as dls are refused with what was expected;
   `help()` shows the parameter comments; a trainable teacher is frozen without a message.
"""
import copy, pydoc, re, sys, warnings
from pathlib import Path
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fastai.callback.core import Callback
import fastai.callback.progress  # noqa: F401  (no_bar)

import igdmfast.attacks as attacks
from igdmfast.core import ThreatModel
from igdmfast.data import tensor_dls, synth_dls
from igdmfast.learner import distill_learner, adv_learner
from igdmfast.methods import METHODS, ALPHA_TABLE, INNERS, table_alpha, check_inner
from igdmfast.callback.adversarial import AdvExamples

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'bench'))
import reference   # noqa: E402  (the official scripts' steps, written from the scripts)

DATA = Path(__file__).resolve().parents[2] / 'shared' / 'data'
K, ALPHA, SEED = 5, 30.0, 11
THREAT = ThreatModel(n_steps=K)   # 8/255, step 2/255, as the scripts


# ------------------------------------------------------------------------------------------------ real images

def saturated_batch(n=8):
    """n real images that each hold pixels at 0 and at 255, as uint8 NHWC, and their labels: the first such images of
    the lossless CIFAR-10 file, or (without it) scikit-learn's digits (0..16, saturated too) as 3x32x32."""
    f = DATA / 'cifar10_lossless_train4000.npz'
    if f.is_file():
        d = np.load(f)
        x, y = d['x_train'], d['y_train']
    else:
        from sklearn.datasets import load_digits
        dg = load_digits()
        x = np.repeat(np.kron(dg.images, np.ones((4, 4))), 3).reshape(-1, 32, 32, 3)
        x, y = np.round(x * 255 / 16).astype(np.uint8), dg.target
    both = np.where((x == 0).reshape(len(x), -1).any(1) & (x == 255).reshape(len(x), -1).any(1))[0][:n]
    assert len(both) == n
    return x[both], torch.as_tensor(y[both]) % 10


class Net(nn.Module):
    "conv-BN-ReLU ×2, pool, linear, in its own dtype (the learner probes it with float32 zeros)."
    def __init__(self, width, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.c1, self.b1 = nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.c2, self.b2 = nn.Conv2d(width, width, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, 10)
    def forward(self, x):
        x = x.to(self.fc.weight.dtype)
        return self.fc(F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x)))))).mean((2, 3)))

def teacher_net():
    t = Net(12, 2)
    with torch.no_grad():   # non-trivial eval-mode statistics
        for m in t.modules():
            if isinstance(m, nn.BatchNorm2d): m.running_mean.uniform_(-0.2, 0.2); m.running_var.uniform_(0.5, 2.0)
    return t.eval()


# ------------------------------------------------------------------------ TRADES + IGDM, as trades.py writes it

def trades_igdm_step(student, teacher, X, y, alpha, noise, epsilon=8/255, step_size=2/255, steps=K, beta=6.0):
    "`trades.py`'s trades_loss (sum KL, unclamped start, S(x) not detached) plus IGDM as the IGDM scripts add it."
    criterion_kl = nn.KLDivLoss(reduction='sum')
    student.eval()
    x_adv = X.detach() + 0.001 * noise.detach()
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = criterion_kl(F.log_softmax(student(x_adv), dim=1), F.softmax(student(X), dim=1))
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, X - epsilon), X + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    student.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    logits = student(X)
    loss_natural = F.cross_entropy(logits, y)
    loss_robust = (1.0 / len(X)) * criterion_kl(F.log_softmax(student(x_adv), dim=1), F.softmax(student(X), dim=1))
    loss = loss_natural + beta * loss_robust
    with torch.no_grad():
        delta = x_adv - X
        teacher_plus, teacher_minus = teacher(X + delta), teacher(X - delta)
    student_plus, student_minus = student(X + delta), student(X - delta)
    loss = loss + alpha * nn.KLDivLoss(reduction='batchmean')(F.log_softmax(student_plus - student_minus, dim=1),
                                                              F.softmax(teacher_plus - teacher_minus, dim=1))
    loss.backward()
    return loss.detach(), x_adv


def official_step(method, student, teacher, X, y, noise):
    "The scripts' step in float64 from these weights: loss, gradients (before the optimizer) and x′."
    s, t = copy.deepcopy(student).double(), copy.deepcopy(teacher).double().eval()
    if method == 'trades': loss, xa = trades_igdm_step(s, t, X, y, ALPHA, noise); grads = s
    else:
        s, t, opt = reference.make(s, t, method, 'cpu')
        loss, xa = reference.STEPS[method](s, t, opt, X, y, ALPHA, 1, 1, steps=K, n_classes=10, step=False, noise=noise)
        grads = s.module
    return dict(loss=loss, x_adv=xa, grads={n: p.grad.detach().clone() for n, p in grads.named_parameters()})


def igdmfast_step(method, student, teacher, x_uint8, y, seed):
    "One step of a `distill_learner` fit (one batch) in float64, torch seeded before it: loss, gradients, x′, x."
    got = {}
    class Probe(Callback):
        order = AdvExamples.order - 1
        def before_batch(self):
            if self.training: torch.manual_seed(seed); got['x'] = self.xb[0].clone()
        def after_backward(self):
            got.update(loss=self.learn.loss_grad.detach().clone(), x_adv=self.xb[0].detach().clone(),
                       grads={n: p.grad.detach().clone() for n, p in self.model.named_parameters()})
        def after_batch(self):   # fastai's smoothed loss is a float32 buffer
            if self.training: self.learn.loss = self.learn.loss.float()
    s, t = copy.deepcopy(student), copy.deepcopy(teacher)
    dls = tensor_dls(x_uint8, y, x_uint8[:2], y[:2], bs=len(y), device='cpu', shuffle=False)
    for dl in dls.loaders: dl.batch_tfm = lambda b: (b[0].double(), b[1])
    learn = distill_learner(t, s, dls, method=method, igdm=True, alpha=ALPHA, threat=THREAT, check_teacher=False)
    s.double(); t.double()   # after the learner's float32 probe of the models
    with learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=Probe())
    return got


def errors(a, b):
    "Relative loss error, gradient error (max |Δ| / max |g|), x′ entries that differ by more than 1e-9."
    gmax = max(g.abs().max().item() for g in b['grads'].values())
    return dict(loss=abs(a['loss'].item() - b['loss'].item()) / abs(b['loss'].item()),
                grad=max((a['grads'][n] - g).abs().max().item() for n, g in b['grads'].items()) / gmax,
                x_adv=int(((a['x_adv'] - b['x_adv']).abs() > 1e-9).sum()))


_START = attacks.random_start
def clamped_start(x, threat, generator=None):
    "igdmfast's start before issue #16: the KL-type start clamped to [0,1]."
    return _START(x, threat, generator).clamp(0, 1)


@pytest.fixture(scope='module')
def batch():
    x8, y = saturated_batch()
    X = torch.as_tensor(x8).permute(0, 3, 1, 2).float().div(255).double()
    assert (X == 0).any() and (X == 1).any()
    return x8, y, X


@pytest.mark.parametrize('method', ['trades', 'rslad', 'adaad'])
def test_official_start_on_saturated_pixels(method, batch, monkeypatch):
    x8, y, X = batch
    student, teacher = Net(8, 1), teacher_net()
    torch.manual_seed(SEED)
    noise = torch.randn(X.shape, dtype=torch.float64)    # what igdmfast draws after the same seed, given to the scripts
    ref = official_step(method, student, teacher, X, y, noise)
    got = igdmfast_step(method, student, teacher, x8, y, SEED)
    assert torch.equal(got['x'], X)                      # the very same pixels on both sides
    e = errors(got, ref)
    assert e['x_adv'] == 0 and e['loss'] < 1e-10 and e['grad'] < 1e-9, e
    # the start leaves [0,1] at the saturated pixels: the first gradient of the scripts is taken there
    start = X + 0.001 * noise
    assert (start < 0).any() and (start > 1).any()
    # the check sees the old departure: with the start clamped, x′ and the loss differ
    monkeypatch.setattr(attacks, 'random_start', clamped_start)
    e_old = errors(igdmfast_step(method, student, teacher, x8, y, SEED), ref)
    assert e_old['x_adv'] > 0 and e_old['loss'] > 1e-12, e_old


def test_uniform_start_still_clamped():
    "The uniform start of PGD-CE stays clamped to [0,1], as `attacks.PGD` / `attack_pgd` of the IGDM scripts clamp it."
    x = torch.zeros(4, 3, 8, 8, dtype=torch.float64); x[:, 1] = 1
    xs = attacks.random_start(x, ThreatModel(), torch.Generator().manual_seed(0))
    assert xs.min() == 0 and xs.max() == 1 and (xs - x).abs().max() <= 8/255


# --------------------------------------------------------------------------------------- AdaIAD and the option

def test_adaiad_in_registry_and_alpha_table():
    m = METHODS['adaiad']
    assert (m.inner, m.random_start, m.attack_mode, m.teacher_in_attack) == (METHODS['adaad'].inner, 'normal', 'eval', True)
    assert m.defaults == dict(begin=60, temperature=30.0, kd_weight=1.0, beta=0.1)   # AdaAD main.py's argparse
    for key, row in ALPHA_TABLE.items():   # "IGDM-AdaAD and IGDM-AdaIAD share α" (App. B.2)
        assert row['adaiad'] == row['adaad'], key
        assert table_alpha('adaiad', *key) == table_alpha('adaad', *key)
    assert table_alpha('adaiad', 'cifar100', 'resnet18_cifar', 'BDM-AT')[0] == 70


def test_inner_option_values():
    assert list(INNERS) == ['student_ce']
    assert check_inner(None) is None and check_inner('method') is None and check_inner('Student-CE') == 'student_ce'
    with pytest.raises(ValueError, match=r"Unknown inner maximization 'pgd_student': use None or 'method' \(the method's "
                                         r"own\) or one of 'student_ce'"):
        check_inner('pgd_student')
    with pytest.raises(TypeError, match=r"inner must be None or a string \('method', 'student_ce'\), got bool True"):
        check_inner(True)
    dls = synth_dls(n_train=8, n_valid=8, n_classes=10, size=8, bs=8, device='cpu')
    with pytest.raises(ValueError, match="Unknown inner maximization 'teacher_free'.*'student_ce'"):
        distill_learner(small(), small(), dls, inner='teacher_free', check_teacher=False)
    learn = distill_learner(small(), small(), dls, method='rslad', inner='student_ce', check_teacher=False, alpha=1.)
    assert learn.inner == 'student_ce' and learn.method == 'rslad'
    m = learn.adv_examples.method
    assert not m.teacher_before_attack and not m.teacher_in_attack and m.random_start == 'uniform'
    assert distill_learner(small(), small(), dls, check_teacher=False).inner is None


# ------------------------------------------------------------------------------- the learner's messages (#14)

def small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))

@pytest.fixture(scope='module')
def dls():
    return synth_dls(n_train=16, n_valid=8, n_classes=10, size=8, bs=8, device='cpu')

def test_threat_as_a_float_refused(dls):
    with pytest.raises(TypeError, match=r"distill_learner: threat must be a ThreatModel, got the number 0\.0313\d*\. To set "
                                        r"the radius, pass threat=ThreatModel\(eps=0\.0313\d*\)"):
        distill_learner(small(), small(), dls, threat=8/255)
    with pytest.raises(TypeError, match=r"adv_learner: threat must be a ThreatModel.*ThreatModel.from_255\(8, 2\)"):
        adv_learner(small(), dls, threat=8/255)
    with pytest.raises(TypeError, match=r"threat must be a ThreatModel \(e\.g\. ThreatModel\(eps=8/255.*got a dict"):
        distill_learner(small(), small(), dls, threat=dict(eps=8/255))

def test_dls_as_a_tensor_refused():
    x = torch.rand(16, 3, 8, 8)
    with pytest.raises(TypeError, match=r"distill_learner: dls must be fastai DataLoaders with images in \[0,1\].*got a tensor "
                                        r"of shape \(16, 3, 8, 8\)\. For tensors or arrays use `igdmfast\.data\.tensor_dls"):
        distill_learner(small(), small(), x)
    with pytest.raises(TypeError, match=r"adv_learner: dls must be fastai DataLoaders.*got a tuple of 2 items"):
        adv_learner(small(), (x, torch.zeros(16, dtype=torch.long)))

@pytest.mark.parametrize('f, summary, comments', [
    (distill_learner, "A fastai `Learner` that distills `teacher` into `student`",
     ["the robust teacher: a module, a checkpoint path", "'student_ce': PGD-CE on the student alone",
      "anything else for fastai's `Learner` (cbs, path, lr, wd, opt_func, ...)"]),
    (adv_learner, "A fastai `Learner` that trains `model` adversarially",
     ["the network to train robustly", "'pgd_at' or 'trades' (methods that need no teacher)"]),
])
def test_help_shows_parameter_comments(f, summary, comments):
    text = pydoc.render_doc(f, renderer=pydoc.plaintext)
    assert f.__doc__.splitlines()[0].startswith(summary)   # the one-line summary first
    assert 'Parameters' in text
    for c in comments: assert c in text, c

def test_trainable_teacher_frozen_silently(dls):
    teacher = small().train()
    assert all(p.requires_grad for p in teacher.parameters())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        learn = distill_learner(teacher, small(), dls, method='ard', alpha=1., check_teacher=False)
        with learn.no_bar(), learn.no_logging(): learn.fit(1)
    assert not [str(m.message) for m in w if 'teacher' in str(m.message).lower()]   # no message on this path
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_bench_step_teacher_free_runs(capsys):
    "bench_step.py --teacher-free times igdmfast with inner='student_ce' beside the default and the scripts' step."
    import bench_step
    bench_step.main(['--bs', '8', '--classes', '10', '--batches', '1', '--repeats', '1', '--no-memory', '--methods', 'adaad',
                     '--teacher-free'])
    out = capsys.readouterr().out
    assert 'SAME' in out and 'DIFFERENT' not in out and 'vs igdmfast' in out
    assert re.search(r'adaad\+igdm\s+igdmfast inner=student_ce', out), out
