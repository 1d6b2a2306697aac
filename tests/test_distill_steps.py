"""One training step of every method, with and without IGDM, through the fastai Learner, against plain PyTorch written
from the spec (METHOD.md (a), (b), (h)); the forward passes each step costs; the teacher left untouched and out of
every file the learner writes.

Everything runs in float64 on tiny conv+BatchNorm nets with 3x8x8 images, 5 classes, batch 8: x′ must agree with a
hand-written PGD loop to 1e-12, the loss and every gradient to 1e-5 relative. The reference below never calls igdmfast's losses,
objectives, methods or attacks: every KL, CE, weight and projection is written out here.

Three library bugs this file found are fixed and stay covered: AdaAD's attack back-propagates through the teacher
(test_step_equals_spec[adaad-*]); KLs keep float64 (test_kl_keeps_float64); an exception during training does not
break the next fit (test_fit_again_after_exception).
"""
import copy, functools, zipfile
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from fastai.callback.core import Callback
import fastai.callback.progress  # noqa: F401  (no_bar)
from igdmfast.core import ThreatModel, seed_everything
from igdmfast.data import synth_dls
from igdmfast.learner import distill_learner, adv_learner
from igdmfast.callback.adversarial import AdvExamples
from igdmfast.models import load_teacher

B, C, K = 8, 5, 3                 # batch, classes, attack steps
EPS, STEP = 0.25, 0.1             # a large ball: x′ often hits [0,1], x − δ leaves it, and IGDM's Δ are far from 0
ALPHA, N_EPOCH = 40.0, 2          # IGDM weight α·(e+1)/E: α/2 in epoch 0, α in epoch 1
RTOL = 1e-5                       # relative, on the loss and on every gradient tensor (max-abs normalized)
KL32_ATOL = 1e-12                 # plus, on the loss only, float64 rounding per unit of weight
THREAT = ThreatModel(eps=EPS, step_size=STEP, n_steps=K)
METHOD_NAMES = ('pgd_at', 'trades', 'ard', 'iad', 'akd', 'rslad', 'adaad')


# ------------------------------------------------------------------------------------------------ models and data

class Net(nn.Module):
    "conv-BN-ReLU-conv-BN-ReLU-pool-linear; casts its input to its own dtype (the learner probes it with float32 zeros)."
    def __init__(self, width=8, n_classes=C):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.c2, self.b2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, n_classes)
    def forward(self, x):
        x = x.to(self.fc.weight.dtype)
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))

def make_student():
    torch.manual_seed(1)
    return Net(8).double()

def make_teacher():
    "A teacher whose every tensor (BN affine, running stats, counters) is random, so it is recognizable anywhere."
    torch.manual_seed(2)
    t = Net(12).double()
    with torch.no_grad():
        for m in t.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5); m.bias.uniform_(-0.3, 0.3)
                m.running_mean.uniform_(-0.2, 0.2); m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(987_654_321)
    return t.train()   # in train mode on purpose: a forward in train mode would move its running statistics

def to_double(b): return b[0].double(), b[1]

def make_dls(n_train=B):
    dls = synth_dls(n_train=n_train, n_valid=B, n_classes=C, size=8, bs=B, device='cpu', noise=0.3)
    for dl in dls.loaders: dl.batch_tfm = to_double
    return dls


# ------------------------------------------------------------------------------- the spec, written out in float64

def log_softmax(z): return z - z.logsumexp(1, keepdim=True)
def kl_rows(t, s):
    "Per-row KL(softmax(t) ‖ softmax(s)); gradients flow into whatever requires them."
    lp = log_softmax(t)
    return (lp.exp() * (lp - log_softmax(s))).sum(1)
def ce_rows(z, y): return -log_softmax(z).gather(1, y[:, None]).squeeze(1)
def kl_rows32(t, s):
    """The attack objectives' KL in the models' own dtype (float64 here): the KL-type attacks start at x + 0.001·N(0,I)
    where the KL's gradient is nearly zero, so any rounding difference would flip signs of some gradient entries."""
    lt = F.log_softmax(t, 1)
    return (lt.exp() * (lt - F.log_softmax(s, 1))).sum(1)

START = dict(pgd_at='uniform', ard='uniform', iad='uniform', akd='uniform', trades='normal', rslad='normal', adaad='normal',
             adaiad='normal')
DEFAULTS = dict(pgd_at={}, trades=dict(beta=6.0), ard=dict(temperature=1.0, kd_weight=1.0),
                iad=dict(begin=60, temperature=1.0, kd_weight=1.0, beta=0.1), akd=dict(kd_weight=0.5, temperature=1.0),
                rslad=dict(adv_weight=5/6), adaad=dict(adv_weight=1.0),
                adaiad=dict(begin=60, temperature=30.0, kd_weight=1.0, beta=0.1))   # AdaAD main.py's argparse defaults

def ref_attack(name, S, T, x, y, teacher_grad=True, inner=None):
    """x′ of the method's inner maximization (spec b.1–b.7), drawn from torch's global generator like the library.
    `teacher_grad=False` detaches T(x′) in AdaAD's objective (what the library does; the spec back-propagates through it).
    `inner='student_ce'`: Table 6's teacher-free inner maximization for any method, PGD on CE(S(x′), y) as the IGDM
    scripts' `attacks.PGD` writes it (uniform start clamped to [0,1], the student in eval mode), the teacher unused."""
    if inner == 'student_ce': name = 'pgd_at'          # the same attack as PGD-AT's
    if START[name] == 'uniform':   # PGD-CE: uniform in the ball, clamped to [0,1] (attacks.PGD of the IGDM scripts)
        xa = (x + ((2 * torch.rand(x.shape, dtype=x.dtype) - 1) * EPS).clamp(-EPS, EPS)).clamp(0, 1)
    else:   # KL-type: x + 0.001·N(0,I), NOT clamped to [0,1]: the first gradient is taken there (trades.py, rslad_loss.py)
        xa = x + 0.001 * torch.randn(x.shape, dtype=x.dtype)
    S.train(name == 'iad')                             # IAD attacks with BN batch statistics, every other method in eval
    with torch.no_grad():
        target = S(x) if name == 'trades' else T(x) if name == 'rslad' else None   # TRADES: eval-mode S(x)
    assert inner in (None, 'student_ce')
    for _ in range(K):
        xa = xa.detach().requires_grad_(True)
        s = S(xa)
        if name in ('trades', 'rslad'): obj = kl_rows32(target, s).sum()
        elif name in ('adaad', 'adaiad'):                # AdaIAD's inner maximization is AdaAD's
            t = T(xa)
            obj = kl_rows32(t if teacher_grad else t.detach(), s).sum()
        else: obj = ce_rows(s, y).sum()
        g, = torch.autograd.grad(obj, xa)
        xa = xa.detach() + STEP * g.sign()
        xa = torch.min(torch.max(xa, x - EPS), x + EPS).clamp(0, 1)
    S.train()
    return xa.detach()

def ref_loss(name, kw, S, T, x, y, xa, epoch, igdm, igdm_bn='update'):
    """The outer loss with the student in train mode (one BN batch per forward call); returns (total, base, igdm term).
    `igdm_bn='eval'`: IGDM's S(x+δ) and S(x−δ) with BatchNorm's running statistics (the student in eval mode: `Net` has
    no other layer that depends on the mode), whose running statistics are the library's at that point: moved by this
    step's train-mode S(x′), and S(x) when the loss reads it; every other choice computes the same loss."""
    start = state_of(S)
    kw = {**DEFAULTS[name], **kw}
    S.train()
    Tn = lambda z: T(z).detach()
    s_adv = S(xa)
    s_nat = S(x) if name in ('trades', 'ard', 'iad', 'rslad', 'adaad', 'adaiad') else None   # unused ones cost nothing here
    if name == 'pgd_at': base = ce_rows(s_adv, y).mean()
    elif name == 'trades': base = ce_rows(s_nat, y).mean() + kw['beta'] * kl_rows(s_nat, s_adv).mean()  # S(x) not detached
    elif name == 'ard':
        a, tau = kw['kd_weight'], kw['temperature']
        base = a * tau**2 * kl_rows(Tn(x) / tau, s_adv / tau).mean() + (1 - a) * ce_rows(s_nat, y).mean()
    elif name == 'iad':
        a, tau = kw['kd_weight'], kw['temperature']
        base = a * tau**2 * kl_rows(Tn(x) / tau, s_adv / tau).mean() + (1 - a) * ce_rows(s_nat, y).mean()
        if epoch >= kw['begin']:
            w = log_softmax(Tn(xa)).exp().gather(1, y[:, None]).squeeze(1) ** kw['beta']   # teacher reliability on x′
            base = base + a * ((1 - w) * kl_rows(s_nat, s_adv)).mean()                    # S(x) not detached
    elif name == 'akd':
        lam, tau = kw['kd_weight'], kw['temperature']
        base = (1 - lam) * ce_rows(s_adv, y).mean() + lam * tau**2 * kl_rows(Tn(xa) / tau, s_adv / tau).mean()
    elif name == 'rslad':
        p = log_softmax(Tn(x)).exp()
        kl_el = lambda s: -p * log_softmax(s) + p * torch.log(p + 1e-5)   # official elementwise KL, mean over B·C
        lam = kw['adv_weight']
        base = (C / 10) * (lam * kl_el(s_adv).mean() + (1 - lam) * kl_el(s_nat).mean())  # ×C/10: ×1 C=10, ×10 C=100
    elif name == 'adaad':
        lam = kw['adv_weight']
        base = lam * kl_rows(Tn(xa), s_adv).mean() + (1 - lam) * kl_rows(Tn(x), s_nat).mean()
    elif name == 'adaiad':   # AdaAD main.py, AdaAD_with_IAD1: IAD-I with the teacher on x′ (`teacher_net(adv_inputs)`)
        a, tau = kw['kd_weight'], kw['temperature']
        t_adv = Tn(xa)
        base = a * tau**2 * kl_rows(t_adv / tau, s_adv / tau).mean() + (1 - a) * ce_rows(s_nat, y).mean()
        if epoch >= kw['begin']:
            w = log_softmax(t_adv).exp().gather(1, y[:, None]).squeeze(1) ** kw['beta']   # `.item()`: constants
            base = base + a * ((1 - w) * kl_rows(s_nat, s_adv)).mean()                   # KL(S(x) ‖ S(x′)), S(x) not detached
    if not igdm: return base, base, None
    delta = xa - x
    x_minus = x - delta                                # NOT clamped to [0,1]
    if igdm_bn == 'eval':
        E = make_student(); E.load_state_dict(start); E.train()
        with torch.no_grad():
            E(xa)
            if reads_s_nat(name, kw, epoch): E(x)
        params = {**dict(S.named_parameters()), **bn_buffers(state_of(E))}
        S.eval(); d_s = functional_call(S, params, (xa,)) - functional_call(S, params, (x_minus,)); S.train()
    else: d_s = s_adv - S(x_minus)                     # S(x+δ) = S(x′): the same forward
    d_t = Tn(x + delta) - Tn(x_minus)
    term = kl_rows(d_t, d_s).mean()
    return base + ALPHA * (epoch + 1) / N_EPOCH * term, base, term


# --------------------------------------------------------------------------------------- running the library

class Counter:
    """Rows of every forward call of a `Net`, counted at its classifier: a hook on the net itself would make the library
    run the net as it is rather than through its conv→BN-folded view (`bn_folded` leaves hooked modules alone)."""
    def __init__(self, m): self.rows = []; self.h = m.fc.register_forward_hook(lambda mod, i, o: self.rows.append(i[0].shape[0]))

class Probe(Callback):
    "Before the library's callbacks: seed, snapshot the student and the clean batch. After the backward: loss, grads, x′."
    order = AdvExamples.order - 1
    def __init__(self, counters): self.counters, self.steps = counters, []
    def before_batch(self):
        if not self.training: return
        seed = 1000 + 10 * self.epoch + self.iter
        for c in self.counters.values(): c.rows = []
        self.cur = dict(seed=seed, epoch=self.epoch, x=self.xb[0].detach().clone(), y=self.yb[0].clone(),
                        state={k: v.detach().clone() for k, v in self.model.state_dict().items()})
        torch.manual_seed(seed)
    def after_fit(self): self.final = state_of(self.model)   # before AdvDistill's after_fit (a lower order)
    def after_backward(self):
        self.cur.update(loss=self.learn.loss_grad.detach().clone(), x_adv=self.xb[0].detach().clone(),
                        grads={n: p.grad.detach().clone() for n, p in self.model.named_parameters()},
                        rows={k: list(c.rows) for k, c in self.counters.items()})
        self.steps.append(self.cur)

class F32Loss(Callback):
    "fastai's smoothed training loss is a float32 buffer that cannot lerp toward a float64 loss: hand it a float32 copy."
    order = AdvExamples.order - 2
    def after_batch(self):
        if self.training and isinstance(self.learn.loss, torch.Tensor): self.learn.loss = self.learn.loss.float()

def build(name, igdm, kw, dls, student, teacher, inner=None, igdm_bn='auto', **opts):
    if igdm or name not in ('pgd_at', 'trades'):
        return distill_learner(teacher, student, dls, method=name, igdm=igdm, alpha=ALPHA if igdm else None,
                               threat=THREAT, loss_kwargs=kw or None, inner=inner, check_teacher=False, igdm_bn=igdm_bn, **opts)
    return adv_learner(student, dls, method=name, threat=THREAT, loss_kwargs=kw or None, **opts)   # no IGDM: igdm_bn has no use

CONFIGS = [(m, g, {}, None) for m in METHOD_NAMES for g in (False, True)] + [
    ('iad', False, dict(begin=0), None), ('iad', True, dict(begin=0), None),   # the late (self-introspection) branch in both epochs
    ('iad', True, dict(begin=1), None),                                    # epoch 0 early, epoch 1 late
    ('ard', True, dict(temperature=2.0, kd_weight=0.7), None),             # τ and the CE(S(x)) term
    ('adaad', True, dict(adv_weight=0.5), None),                           # AdaAD's clean term (needs T(x), S(x))
    # AdaIAD (issue #16): AdaAD's attack, IAD-I's loss with T(x′), τ = 30
    ('adaiad', False, {}, None), ('adaiad', True, {}, None),
    ('adaiad', True, dict(begin=1), None),                                 # epoch 0 early, epoch 1 late
    ('adaiad', True, dict(begin=0, kd_weight=0.7, temperature=2.0), None), # τ, the CE(S(x)) term, late in both epochs
    # the teacher-free inner maximization (Table 6): PGD-CE on the student, the method's outer loss and IGDM kept
    ('adaad', False, {}, 'student_ce'), ('adaad', True, {}, 'student_ce'),
    ('rslad', True, {}, 'student_ce'),                                     # RSLAD's T(x) moves into the batched call
    ('trades', True, {}, 'student_ce'),                                    # no eval-mode S(x) target any more
    ('iad', True, dict(begin=0), 'student_ce'),                            # IAD's train-mode attack becomes eval-mode
    ('adaiad', True, dict(begin=1), 'student_ce'),
]
def cfg_id(c): return (f"{c[0]}-{'igdm' if c[1] else 'base'}" + ''.join(f"-{k}{v:g}" for k, v in c[2].items())
                       + (f"-{c[3]}" if c[3] else ''))
IDS = [cfg_id(c) for c in CONFIGS]

def state_of(m): return {k: v.detach().clone() for k, v in m.state_dict().items()}

@functools.lru_cache(maxsize=None)
def run(i, fold_bn=True, igdm_bn='update'):
    "Fit config `i` for 2 epochs of one batch each, recording both steps (cached: several tests read one run)."
    name, igdm, kw, inner = CONFIGS[i]
    student, teacher = make_student(), make_teacher()
    teacher_before, teacher_params = state_of(teacher), list(teacher.parameters())
    opts = dict(fold_bn=fold_bn, igdm_bn=igdm_bn)   # explicit: the default ('auto') is 'keep' since issue #26's decision
    learn = build(name, igdm, kw, make_dls(), student, teacher, inner=inner, **opts)
    counters = dict(student=Counter(student), teacher=Counter(teacher))
    probe = Probe(counters)
    with learn.no_bar(), learn.no_logging(): learn.fit(N_EPOCH, cbs=[probe, F32Loss()])
    for c in counters.values(): c.h.remove()
    return dict(learn=learn, steps=probe.steps, teacher=teacher, teacher_before=teacher_before,
                teacher_params=teacher_params, final=probe.final)

def rel_err(a, b): return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------- 1. the step's math

def _check_step(i, teacher_grad=True, fold_bn=True, igdm_bn='update'):
    name, igdm, kw, inner = CONFIGS[i]
    r = run(i, fold_bn, igdm_bn)
    assert len(r['steps']) == N_EPOCH
    T = copy.deepcopy(r['teacher']).eval()
    for st in r['steps']:
        S = make_student(); S.load_state_dict(st['state'])
        x, y = st['x'], st['y']
        assert x.dtype == torch.float64
        torch.manual_seed(st['seed'])
        xa = ref_attack(name, S, T, x, y, teacher_grad, inner)
        assert (xa - x).abs().max() <= EPS + 1e-12 and xa.min() >= 0 and xa.max() <= 1
        assert torch.allclose(st['x_adv'], xa, rtol=0, atol=1e-12), \
            f"{cfg_id(CONFIGS[i])} epoch {st['epoch']}: x′ differs at {int(((st['x_adv'] - xa).abs() > 1e-12).sum())} entries"
        S.zero_grad()
        loss, base, term = ref_loss(name, kw, S, T, x, y, xa, st['epoch'], igdm, igdm_bn)
        loss.backward()
        # the library evaluates its KLs in float32 even for float64 models (see test_kl_keeps_float64): about 1e-7
        # absolute per KL value, times the weight it carries
        atol = KL32_ATOL * (1 + (ALPHA * (st['epoch'] + 1) / N_EPOCH if igdm else 0))
        assert (st['loss'].double() - loss.detach()).abs() <= RTOL * loss.detach().abs() + atol, (st['loss'].item(), loss.item())
        for n, p in S.named_parameters():
            assert rel_err(st['grads'][n], p.grad) < RTOL, f"{cfg_id(CONFIGS[i])} epoch {st['epoch']}: grad of {n}"
        if igdm:  # the test must be able to see IGDM: x − δ leaves [0,1] and the term moves the loss
            assert ((2 * x - xa) < 0).any() or ((2 * x - xa) > 1).any()
            assert ALPHA * (st['epoch'] + 1) / N_EPOCH * term.item() > 1e-3 * base.item()

@pytest.mark.parametrize('i', range(len(CONFIGS)), ids=IDS)
def test_step_equals_spec(i): _check_step(i)

def test_kl_keeps_float64():
    "A float64 student and teacher should get a float64 loss, exact to float64 rounding (ARD: x′ is from CE, float64)."
    i = IDS.index('ard-base')
    st = run(i)['steps'][0]
    S, T = make_student(), copy.deepcopy(run(i)['teacher']).eval()
    S.load_state_dict(st['state'])
    torch.manual_seed(st['seed'])
    xa = ref_attack('ard', S, T, st['x'], st['y'])
    loss = ref_loss('ard', {}, S, T, st['x'], st['y'], xa, st['epoch'], False)[0].detach()
    assert st['loss'].dtype == torch.float64, st['loss'].dtype
    assert rel_err(st['loss'], loss) < 1e-12


# -------------------------------------------------------------------------------------- 2. the forward passes

def expected_rows(name, kw, epoch, igdm, inner=None):
    """Rows of each student and teacher call in one step: what the spec's math needs, with the library's batching
    (AdvDistill.before_batch stacks every teacher input of the outer loss and IGDM into one call). With
    `inner='student_ce'` the attack is K student passes and nothing else: no teacher pass before or inside it."""
    kw = {**DEFAULTS[name], **kw}
    own = inner is None
    late = name in ('iad', 'adaiad') and epoch >= kw['begin']
    s_nat = (name in ('trades', 'rslad') or late or (name in ('ard', 'iad', 'adaiad') and kw['kd_weight'] < 1)
             or (name == 'adaad' and kw['adv_weight'] < 1))
    # student: [TRADES' eval-mode S(x), the attack's target] + K attack steps + S(x′) + S(x) if needed + S(x−δ)
    student = [B] * ((name == 'trades' and own) + K + 1 + s_nat + igdm)
    t_nat = (name in ('ard', 'iad') or (name == 'adaad' and kw['adv_weight'] < 1)
             or (name == 'rslad' and not own))              # RSLAD's own attack takes T(x) before it
    t_adv = name in ('akd', 'adaad', 'adaiad') or late or igdm   # T(x+δ) = T(x′), shared by the outer loss and IGDM
    teacher = ([B] if name == 'rslad' and own else []) + ([B] * K if name in ('adaad', 'adaiad') and own else [])
    rows = B * (t_nat + t_adv + igdm)
    return student, teacher + ([rows] if rows else [])

def check_rows(name, igdm, epoch, inner=None):
    """The one-off check of each conv→BN-folded view at the first batch of a fit: the model and its view on 2 samples
    (the student's view only for eval-mode attacks; the teacher's whenever the learner has a teacher)."""
    if epoch: return [], []
    has_teacher = igdm or name not in ('pgd_at', 'trades')
    return ([] if name == 'iad' and inner is None else [2, 2]), ([2, 2] if has_teacher else [])

@pytest.mark.parametrize('i', range(len(CONFIGS)), ids=IDS)
def test_forward_passes(i):
    name, igdm, kw, inner = CONFIGS[i]
    for st in run(i)['steps']:
        s, t = expected_rows(name, kw, st['epoch'], igdm, inner)
        cs, ct = check_rows(name, igdm, st['epoch'], inner)
        assert st['rows']['student'] == cs + s, (st['epoch'], st['rows'])
        assert st['rows']['teacher'] == ct + t, (st['epoch'], st['rows'])

def test_forward_pass_table():
    "The per-step numbers spelled out for the default options (K attack steps, batch B), with and without IGDM."
    def calls(name, igdm, epoch=0, **kw):
        s, t = expected_rows(name, kw, epoch, igdm)
        return len(s), len(t), sum(t)
    assert [calls(m, False) for m in METHOD_NAMES] == [
        (K + 1, 0, 0), (K + 3, 0, 0), (K + 1, 1, B), (K + 1, 1, B), (K + 1, 1, B), (K + 2, 1, B), (K + 1, K + 1, (K + 1) * B)]
    assert [calls(m, True) for m in METHOD_NAMES] == [
        (K + 2, 1, 2 * B), (K + 4, 1, 2 * B), (K + 2, 1, 3 * B), (K + 2, 1, 3 * B), (K + 2, 1, 2 * B),
        (K + 3, 2, 3 * B), (K + 2, K + 1, (K + 2) * B)]
    assert calls('iad', False, begin=0) == (K + 2, 1, 2 * B) and calls('iad', True, begin=0) == (K + 3, 1, 3 * B)

def test_forward_pass_table_adaiad_and_teacher_free():
    """AdaIAD costs what AdaAD costs (K teacher passes in the attack, T(x′) once), plus S(x) from `begin` on; the
    teacher-free inner maximization removes every teacher pass before and inside the attack, and nothing else."""
    def calls(name, igdm, epoch=0, inner=None, **kw):
        s, t = expected_rows(name, kw, epoch, igdm, inner)
        return len(s), len(t), sum(t)
    assert calls('adaiad', False) == calls('adaad', False) == (K + 1, K + 1, (K + 1) * B)
    assert calls('adaiad', True) == calls('adaad', True) == (K + 2, K + 1, (K + 2) * B)
    assert calls('adaiad', True, epoch=60) == (K + 3, K + 1, (K + 2) * B)          # + S(x) for the self-introspection
    ce = 'student_ce'
    assert calls('adaad', True, inner=ce) == (K + 2, 1, 2 * B)                     # T(x′), T(x−δ) in one call, after
    assert calls('adaad', False, inner=ce) == (K + 1, 1, B)
    assert calls('rslad', True, inner=ce) == (K + 3, 1, 3 * B)                     # T(x) joins the batched call
    assert calls('trades', True, inner=ce) == (K + 3, 1, 2 * B)


# ------------------------------------------------------------------------------------ 3. the teacher, untouched

def _same_state(a, b): return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

def _check_teacher(teacher, before, params, learn, given=True):
    assert _same_state(state_of(teacher), before)                          # parameters and BN buffers, bit for bit
    assert [p is q for p, q in zip(teacher.parameters(), params)] == [True] * len(params)
    if given: assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    opt_params = [p for pg in learn.opt.param_lists for p in pg]
    t_ptrs = {p.data_ptr() for p in teacher.parameters()} | {b.data_ptr() for b in teacher.buffers()}
    assert not any(any(p is q for q in teacher.parameters()) or p.data_ptr() in t_ptrs for p in opt_params)
    assert {id(p) for p in opt_params} == {id(p) for p in learn.model.parameters()}

@pytest.mark.parametrize('i', range(len(CONFIGS)), ids=IDS)
def test_teacher_untouched_by_fit(i):
    r = run(i)
    name, igdm, _, _ = CONFIGS[i]
    _check_teacher(r['teacher'], r['teacher_before'], r['teacher_params'], r['learn'],
                   given=igdm or name not in ('pgd_at', 'trades'))   # adv_learner never sees it
    assert all(p.requires_grad for p in r['learn'].model.parameters())

class Boom(Callback):
    "Raise in the middle of the first epoch's second batch, after the attack and the teacher's calls."
    order = AdvExamples.order + 5
    def after_loss(self):
        if self.training and self.iter == 1: raise RuntimeError('boom')

@pytest.mark.parametrize('name', METHOD_NAMES)
def test_teacher_untouched_after_exception(name):
    student, teacher = make_student(), make_teacher()
    before, params = state_of(teacher), list(teacher.parameters())
    learn = distill_learner(teacher, student, make_dls(2 * B), method=name, igdm=True, alpha=ALPHA, threat=THREAT,
                            check_teacher=False)
    with learn.no_bar(), learn.no_logging(), pytest.raises(RuntimeError, match='boom'): learn.fit(1, cbs=[Boom(), F32Loss()])
    _check_teacher(teacher, before, params, learn)
    assert all(p.requires_grad for p in student.parameters())


def test_fit_again_after_exception():
    learn = distill_learner(make_teacher(), make_student(), make_dls(2 * B), method='ard', igdm=True, alpha=ALPHA,
                            threat=THREAT, check_teacher=False)
    lf = learn.loss_func
    with learn.no_bar(), learn.no_logging():
        with pytest.raises(RuntimeError, match='boom'): learn.fit(1, cbs=[Boom(), F32Loss()])
        # no fastai event runs after an ordinary exception: the swapped loss may still be installed, but validation
        # must fall back to the original loss and the next fit must not wrap the swapped loss in itself
        v_after = learn.validate()[0]
        learn.loss_func = lf; v_plain = learn.validate()[0]; learn.loss_func = learn.adv_distill.lf
        assert v_after == v_plain
        learn.fit(1, cbs=F32Loss())
    assert learn.loss_func is lf


# ----------------------------------------------------------------------------------------- exported files

def _teacher_bytes(teacher): return [v.detach().contiguous().numpy().tobytes() for v in teacher.state_dict().values()]

def _blobs(path):
    "The raw storages of a torch.save zip file."
    with zipfile.ZipFile(path) as z: return [z.read(n) for n in z.namelist() if '/data/' in n]

def _no_teacher_in(path, teacher):
    blobs = _blobs(path)
    assert blobs
    return not any(tb in blob for tb in _teacher_bytes(teacher) for blob in blobs)

@pytest.mark.parametrize('i', [IDS.index('rslad-igdm'), IDS.index('adaad-igdm')], ids=['rslad-igdm', 'adaad-igdm'])
def test_export_has_no_teacher(i, tmp_path):
    r = run(i)
    learn, teacher = r['learn'], r['teacher']
    learn.path = tmp_path
    learn.export('export.pkl')
    f = tmp_path / 'export.pkl'
    assert _no_teacher_in(f, teacher)
    # the detector works: the same kind of file with the teacher in it is caught
    torch.save(dict(m=learn.model, t=teacher), tmp_path / 'with_teacher.pt')
    assert not _no_teacher_in(tmp_path / 'with_teacher.pt', teacher)
    loaded = torch.load(f, weights_only=False)
    for cb in (loaded.adv_examples, loaded.adv_distill):
        assert getattr(cb, 'teacher', None) is None   # unpickled callbacks carry no teacher
    tensors, seen = [], set()
    def walk(o, depth=0):   # every tensor reachable from the loaded learner's plain attributes
        if id(o) in seen or depth > 12: return
        seen.add(id(o))
        if isinstance(o, torch.Tensor): tensors.append(o); return
        if isinstance(o, nn.Module): tensors.extend(o.state_dict().values())
        if isinstance(o, dict): items = o.values()
        elif isinstance(o, (list, tuple, set)): items = o
        elif hasattr(o, '__dict__'): items = vars(o).values()
        else: return
        for v in items: walk(v, depth + 1)
    walk(loaded)
    assert tensors
    t_vals = list(teacher.state_dict().values())
    assert not any(a.shape == b.shape and torch.equal(a.cpu(), b) for a in tensors for b in t_vals)
    assert _same_state(state_of(loaded.model), state_of(learn.model))

def test_export_student_loads_as_teacher(tmp_path):
    r = run(IDS.index('ard-igdm'))
    learn, teacher = r['learn'], r['teacher']
    learn.path = tmp_path
    p = learn.export_student('student.pt')
    assert _no_teacher_in(p, teacher)
    m = load_teacher(p, model=Net(8).double())
    assert _same_state(state_of(m), state_of(learn.model))
    assert not m.training and not any(q.requires_grad for q in m.parameters())


# ------------------------------------------------------------------------------ 4. conv→BN folding, exact in float64

FOLD_IDS = ['pgd_at-base', 'trades-base', 'iad-igdm-begin0', 'rslad-igdm', 'adaad-igdm']

@pytest.mark.parametrize('cid', FOLD_IDS)
def test_folded_views_in_use(cid):
    "The eval-mode attack runs the student's folded view (AdaAD's the teacher's too); IAD's train-mode attack the student."
    from igdmfast.callback.adversarial import ConvBN
    learn = run(IDS.index(cid))['learn']
    views = list({id(v): v for _, v in learn.adv_examples._views.values()}.values())
    folded = [v for v in views if any(isinstance(m, ConvBN) for m in v.modules())]
    name = cid.split('-')[0]
    n_student = 0 if name == 'iad' else 1
    n_teacher = 1 if name in ('rslad', 'adaad') or 'igdm' in cid else 0
    assert len(folded) == n_student + n_teacher, (cid, views)
    assert all(sum(isinstance(m, ConvBN) for m in v.modules()) == 2 for v in folded)   # both conv→BN pairs of Net

@pytest.mark.parametrize('cid', FOLD_IDS)
def test_fold_bn_off_equals_spec(cid):
    "Without folding the step is the spec's too (the folded run is checked by test_step_equals_spec), same passes."
    i = IDS.index(cid)
    _check_step(i, fold_bn=False)
    for a, b in zip(run(i)['steps'], run(i, fold_bn=False)['steps']):
        s, t = check_rows(cid.split('-')[0], 'igdm' in cid, a['epoch'])   # no view to check without folding
        assert a['rows']['student'][len(s):] == b['rows']['student'] and a['rows']['teacher'][len(t):] == b['rows']['teacher']


# --------------------------------------------------------------- 5. the attack's precision option (issue #17)

OPTION_IDS = ['pgd_at-base', 'ard-igdm', 'rslad-igdm', 'adaad-igdm', 'trades-igdm', 'adaad-igdm-student_ce']

@pytest.mark.parametrize('cid', OPTION_IDS)
@pytest.mark.parametrize('dtype', ['bf16', 'fp16'])
def test_attack_dtype_changes_no_math_and_no_forward(cid, dtype):
    """`attack_dtype` only changes the precision the attack runs in: with float64 models (which autocast leaves alone)
    the steps equal the float32 option's bit for bit, with the same forward passes of the student and the teacher.
    The soundness check is switched off here because it adds its own attacks at the first batch (tested below)."""
    name, igdm, kw, inner = CONFIGS[IDS.index(cid)]
    runs = []
    for attack_dtype in (None, dtype):
        seed_everything(0)   # the same batch order for both (fastai draws it from Python's random)
        student, teacher = make_student(), make_teacher()
        learn = build(name, igdm, kw, make_dls(), student, teacher, inner=inner, attack_dtype=attack_dtype)
        adv = next(cb for cb in learn.cbs if isinstance(cb, AdvExamples))
        adv.check_precision = False
        assert (adv.attack_dtype is None) == (attack_dtype is None)
        counters = dict(student=Counter(student), teacher=Counter(teacher))
        probe = Probe(counters)
        with learn.no_bar(), learn.no_logging(): learn.fit(N_EPOCH, cbs=[probe, F32Loss()])
        runs.append(probe.steps)
    for a, b in zip(*runs):
        assert torch.equal(a['x'], b['x']) and torch.equal(a['x_adv'], b['x_adv']) and torch.equal(a['loss'], b['loss']) and a['rows'] == b['rows']
        assert all(torch.equal(a['grads'][n], b['grads'][n]) for n in a['grads'])


def test_attack_dtype_check_is_skipped_in_float64():
    "Autocast leaves float64 alone, so a float64 run has nothing to check (the check compares against float32 images)."
    name, igdm, kw, inner = CONFIGS[IDS.index('adaad-igdm')]
    learn = build(name, igdm, kw, make_dls(), make_student(), make_teacher(), inner=inner, attack_dtype='bf16')
    with learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=[F32Loss()])
    assert next(cb for cb in learn.cbs if isinstance(cb, AdvExamples)).precision_check is None


# ------------------------------------------- 6. IGDM's forward at x − δ and BatchNorm's running statistics

BN_IDS = ['ard-igdm', 'rslad-igdm', 'adaad-igdm-adv_weight0.5', 'trades-igdm']   # with S(x) (RSLAD, AdaAD 0.5, TRADES) and without (ARD)

def reads_s_nat(name, kw, epoch):
    "Whether the step's outer loss reads S(x): the student calls beyond TRADES' eval-mode target, K attack steps, S(x′), S(x−δ)."
    student_rows, _ = expected_rows(name, kw, epoch, True)
    return len(student_rows) - (name == 'trades') - K - 2 == 1

def bn_buffers(state): return {k: v for k, v in state.items() if k.split('.')[-1] in ('running_mean', 'running_var', 'num_batches_tracked')}

def ref_buffers_after_step(name, kw, st, igdm_bn):
    """The student's BatchNorm buffers after one step, written out: its train-mode forwards in the library's order, at x′,
    at x when the loss reads S(x), and at x − δ (unclamped) with 'update' and 'recalibrate' (whose training is 'update''s);
    'keep' and 'eval' leave them (eval's two forwards use them); nothing else moves them (the attack runs in eval mode,
    the optimizer does not touch buffers)."""
    S = make_student(); S.load_state_dict(st['state']); S.train()
    x, xa = st['x'], st['x_adv']
    with torch.no_grad():
        S(xa)
        if reads_s_nat(name, kw, st['epoch']): S(x)
        if igdm_bn in ('update', 'recalibrate'): S(x - (xa - x))
    return bn_buffers(state_of(S))

@pytest.mark.parametrize('cid', BN_IDS)
def test_igdm_bn_keep_equals_spec(cid):
    "`igdm_bn='keep'`: each step's x′, loss and every gradient are still the spec's (the forward uses batch statistics)."
    _check_step(IDS.index(cid), igdm_bn='keep')

@pytest.mark.parametrize('cid', BN_IDS)
def test_igdm_bn_running_statistics(cid):
    """After the first step the student's running statistics are those of its train-mode forwards: with 'update' (the
    official code) the forward at x − δ counts, with 'keep' it does not; the two differ, so the test can tell them apart."""
    i = IDS.index(cid)
    name, _, kw, _ = CONFIGS[i]
    for igdm_bn in ('update', 'keep', 'eval', 'recalibrate'):
        first, second = run(i, True, igdm_bn)['steps']
        got = bn_buffers(second['state'])
        want = ref_buffers_after_step(name, kw, first, igdm_bn)
        other = ref_buffers_after_step(name, kw, first, 'keep' if igdm_bn in ('update', 'recalibrate') else 'update')
        assert got.keys() == want.keys()
        for k in got: assert torch.allclose(got[k].double(), want[k].double(), rtol=1e-12, atol=1e-14), (cid, igdm_bn, k)
        assert any(not torch.allclose(got[k].double(), other[k].double(), rtol=1e-6, atol=1e-9) for k in got if 'running' in k)
    assert [st['rows'] for st in run(i, True, 'update')['steps']] == [st['rows'] for st in run(i, True, 'keep')['steps']]   # same forwards

def test_igdm_bn_refused_when_unknown():
    from igdmfast.callback.adversarial import AdvDistill
    with pytest.raises(ValueError, match=r"igdm_bn must be one of 'update', 'keep', 'eval', 'recalibrate', got 'frozen': 'update': the official code"):
        AdvDistill('ard', make_teacher(), igdm=True, alpha=1., igdm_bn='frozen')
    learn = build('ard', True, {}, make_dls(), make_student(), make_teacher(), igdm_bn='keep')
    assert learn.igdm_bn == 'keep' and learn.adv_distill.igdm_bn == 'keep'
    assert build('ard', True, {}, make_dls(), make_student(), make_teacher()).igdm_bn == 'keep'   # the default since issue #26's decision


@pytest.mark.parametrize('cid', BN_IDS)
def test_igdm_bn_eval_equals_spec(cid):
    "`igdm_bn='eval'`: x′ as before; the loss and every gradient are the spec's with IGDM's two student outputs in eval mode."
    _check_step(IDS.index(cid), igdm_bn='eval')

def test_igdm_bn_eval_forwards():
    "'eval' costs one more student call than 'update': S(x+δ) and S(x−δ) together (2B rows) instead of S(x−δ)."
    i = IDS.index('ard-igdm')
    for up, ev in zip(run(i, True, 'update')['steps'], run(i, True, 'eval')['steps']):
        s = up['rows']['student']
        assert ev['rows']['student'] == s[:-1] + [2 * B], (s, ev['rows']['student'])
        assert ev['rows']['teacher'] == up['rows']['teacher']

def ref_bn_stats(state, x):
    "`Net`'s BatchNorm statistics over one batch written out layer by layer: batch mean and unbiased variance of each input."
    S = make_student(); S.load_state_dict(state)
    out = {}
    with torch.no_grad():
        h = F.conv2d(x, S.c1.weight, padding=1)
        for bn, conv in (('b1', S.c2), ('b2', None)):
            m, v = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=True)
            out[f'{bn}.running_mean'], out[f'{bn}.running_var'] = m, v
            w, b = getattr(S, bn).weight, getattr(S, bn).bias
            a = F.relu((h - m[:, None, None]) / torch.sqrt(h.var((0, 2, 3), unbiased=False) + 1e-5)[:, None, None] * w[:, None, None] + b[:, None, None])
            if conv is not None: h = F.conv2d(a, conv.weight, padding=1)
    return out

@pytest.mark.parametrize('cid', ['ard-igdm', 'rslad-igdm'])
def test_igdm_bn_recalibrate(cid):
    """'recalibrate': every step is the spec's (x′, loss, gradients; its running statistics are 'update''s, checked in
    test_igdm_bn_running_statistics); after the fit the running statistics are those of the method's x′ against the final
    student (seed 0, the training images in order), recomputed by hand, and the weights are unchanged."""
    i = IDS.index(cid)
    name = CONFIGS[i][0]
    _check_step(i, igdm_bn='recalibrate')
    rc = run(i, True, 'recalibrate')
    learn = rc['learn']
    x, y = learn.dls.train.new(shuffle=False, drop_last=False).one_batch()
    S = make_student(); S.load_state_dict(rc['final'])
    torch.manual_seed(0)
    xa = ref_attack(name, S, copy.deepcopy(rc['teacher']).eval(), x, y)
    want = ref_bn_stats(rc['final'], xa)
    got = learn.model.state_dict()
    for k, v in want.items(): assert torch.allclose(got[k], v, rtol=1e-10, atol=1e-12), k
    assert all(torch.equal(got[k], v) for k, v in rc['final'].items() if k.split('.')[-1] in ('weight', 'bias'))
    assert not torch.allclose(got['b1.running_mean'], rc['final']['b1.running_mean'])   # the pass moved them

def test_recalibrate_bn_refuses():
    from igdmfast.callback.adversarial import recalibrate_bn
    learn = build('ard', True, {}, make_dls(), make_student(), make_teacher())
    with pytest.raises(ValueError, match="on must be one of 'clean', 'adv', got 'x'"): recalibrate_bn(learn, on='x')
