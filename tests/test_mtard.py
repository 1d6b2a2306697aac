"""Issue #30 item 3: MTARD (Zhao et al., ECCV 2022) in the registry, against the official script.

1. The step. Three training steps of `distill_learner(..., method='mtard', nat_teacher=...)` in float64 equal the
   official step, transcribed here by hand from `zhaoshiji123/MTARD` @ 6480a1b (`mtard/mtard_resnet18_cifar10.py`
   lines 51-53 and 67-103, `mtard/mtard_loss.py` lines 27-58): x′, the loss, every parameter gradient, and the
   adaptive weight w_nat after each step (the reference carries its own weights and first losses from step to step,
   in Python floats, exactly as the script). The transcription never calls igdmfast's losses, objectives or attacks.
   Also the CIFAR-100 script's form (both terms ×10, `scale=10`) and non-default weight rates and milestones.
2. The state is saved in checkpoints: a fit interrupted after epoch 1 and resumed by a new learner (another seed)
   ends bit for bit where the uninterrupted fit ends (weights, BatchNorm buffers, w_nat, first losses, the log).
3. Bad inputs: MTARD without a natural teacher, a natural teacher for another method, and one with other classes,
   are refused with what to do.
"""
import copy, functools
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from fastai.callback.core import Callback
import fastai.callback.progress  # noqa: F401  (no_bar)
import timm

from igdmfast.core import ThreatModel, seed_everything
from igdmfast.data import synth_dls, get_dls
from igdmfast.learner import distill_learner
from igdmfast.methods import METHODS, MTARDWeights
from igdmfast.callback.adversarial import AdvExamples, AdvDistill, MethodState
from igdmfast.callback.checkpoint import Checkpoint, load_checkpoint
import igdmfast.models  # noqa: F401  (small_cnn)

B, K, N_EPOCH = 8, 3, 3
EPS, STEP = 0.25, 0.1          # a large ball: x′ hits [0,1] often, the terms are far from 0
THREAT = ThreatModel(eps=EPS, step_size=STEP, n_steps=K)


# ------------------------------------------------------------------------------------------------ models and data

from test_distill_steps import Net   # the same conv-BN net as the other float64 step tests

def make_net(width, seed, n_classes, random_bn=False):
    torch.manual_seed(seed)
    m = Net(width, n_classes).double()
    if random_bn:
        with torch.no_grad():
            for b in m.modules():
                if isinstance(b, nn.BatchNorm2d):
                    b.weight.uniform_(0.5, 1.5); b.bias.uniform_(-0.3, 0.3)
                    b.running_mean.uniform_(-0.2, 0.2); b.running_var.uniform_(0.5, 2.0)
    return m

def make_dls(n_classes):
    dls = synth_dls(n_train=B, n_valid=B, n_classes=n_classes, size=8, bs=B, device='cpu', noise=0.3)
    for dl in dls.loaders: dl.batch_tfm = lambda b: (b[0].double(), b[1])
    return dls


# ------------------------------------------------------------------------- the official step, transcribed by hand

def kl_loss(a, b):
    "mtard_resnet18_cifar10.py line 51-53: elementwise, a = log_softmax(student), b = softmax(teacher)."
    return -a * b + torch.log(b + 1e-5) * b

def official_step(student, teacher, teacher_nat, X, y, weight, init, noise, weight_learn_rate, factor=1, bert=1):
    """One iteration of the script's loop (lines 68-103) from these weights, before `optimizer.step()`; `weight` and
    `init` are the script's dict and its two `init_loss_*` globals, updated in place. `factor`: 10 in the CIFAR-100 script."""
    student.train()
    student.zero_grad()
    with torch.no_grad():
        teacher_nat_logits = teacher_nat(X)
    # mtard_inner_loss_ce (mtard_loss.py lines 27-58), step_size 2/255 -> STEP, epsilon -> EPS, perturb_steps -> K
    student.eval()
    x_adv = X.detach() + 0.001 * noise
    for _ in range(K):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_ce = nn.CrossEntropyLoss()(student(x_adv), y)
        grad = torch.autograd.grad(loss_ce, [x_adv])[0]
        x_adv = x_adv.detach() + STEP * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, X - EPS), X + EPS)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    student.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    student_adv_logits = student(x_adv)
    with torch.no_grad():
        teacher_adv_logits = teacher(x_adv)
    student.train()
    student_nat_logits = student(X)
    kl_Loss1 = factor * torch.mean(kl_loss(F.log_softmax(student_adv_logits, dim=1), F.softmax(teacher_adv_logits.detach(), dim=1)))
    kl_Loss2 = factor * torch.mean(kl_loss(F.log_softmax(student_nat_logits, dim=1), F.softmax(teacher_nat_logits.detach(), dim=1)))
    if init['nat'] is None: init['nat'] = kl_Loss2.item()
    if init['adv'] is None: init['adv'] = kl_Loss1.item()
    lhat_adv, lhat_nat = kl_Loss1.item() / init['adv'], kl_Loss2.item() / init['nat']
    inv_rate_adv, inv_rate_nat = lhat_adv ** bert, lhat_nat ** bert
    weight['nat_loss'] = weight['nat_loss'] - weight_learn_rate * (weight['nat_loss'] - inv_rate_nat / (inv_rate_adv + inv_rate_nat))
    weight['adv_loss'] = 1 - weight['nat_loss']
    total_loss = weight['adv_loss'] * kl_Loss1 + weight['nat_loss'] * kl_Loss2
    total_loss.backward()
    return total_loss.detach(), x_adv


# --------------------------------------------------------------------------------------------- running the library

class Probe(Callback):
    "Before the library's callbacks: seed and snapshot the student; after the backward: loss, gradients, x′, w_nat."
    order = AdvExamples.order - 1
    def __init__(self): self.steps = []
    def before_batch(self):
        if not self.training: return
        seed = 100 + self.epoch
        self.cur = dict(seed=seed, epoch=self.epoch, x=self.xb[0].detach().clone(), y=self.yb[0].clone(),
                        state={k: v.detach().clone() for k, v in self.model.state_dict().items()})
        torch.manual_seed(seed)
    def after_backward(self):
        self.cur.update(loss=self.learn.loss_grad.detach().clone(), x_adv=self.xb[0].detach().clone(),
                        grads={n: p.grad.detach().clone() for n, p in self.model.named_parameters()},
                        w_nat=float(self.learn.adv_distill.state.nat_weight))
        self.steps.append(self.cur)
    def after_batch(self):   # fastai's smoothed loss is a float32 buffer
        if self.training: self.learn.loss = self.learn.loss.float()

# the default milestones are the script's epochs 215, 260, 285 of 300 as fractions: in a fit of 3 epochs, round(3·215/300)
# = 2, so the rate is 0.025 in epochs 0 and 1 and 0.0025 in epoch 2 (the others fall at round(2.6) = round(2.85) = 3)
CONFIGS = {   # name: (classes, loss_kwargs, the script's factor, its weight rate per epoch, bert)
    'cifar10': (10, {}, 1, [0.025, 0.025, 0.0025], 1),
    'cifar100_form': (10, dict(scale=10.), 10, [0.025, 0.025, 0.0025], 1),
    'rates': (10, dict(weight_lr=0.4, weight_milestones=(1/3, 2/3), weight_gamma=0.5, bert=2.0), 1, [0.4, 0.2, 0.1], 2.0),
}

@functools.lru_cache(maxsize=None)
def run(name):
    n_classes, kw, *_ = CONFIGS[name]
    student, teacher, nat = make_net(8, 1, n_classes), make_net(12, 2, n_classes, True), make_net(10, 3, n_classes, True)
    learn = distill_learner(teacher, student, make_dls(n_classes), method='mtard', igdm=False, threat=THREAT, nat_teacher=nat,
                            loss_kwargs=kw or None, check_teacher=False)
    probe = Probe()
    with learn.no_bar(), learn.no_logging(): learn.fit(N_EPOCH, lr=0.05, cbs=probe)
    return dict(learn=learn, steps=probe.steps, teacher=teacher, nat=nat)

def rel_err(a, b): return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------------------ 1. the step

@pytest.mark.parametrize('name', list(CONFIGS))
def test_step_equals_official(name):
    n_classes, kw, factor, rates, bert = CONFIGS[name]
    r = run(name)
    assert len(r['steps']) == N_EPOCH
    T, TN = copy.deepcopy(r['teacher']).eval(), copy.deepcopy(r['nat']).eval()
    weight, init = {'adv_loss': 1 / 2.0, 'nat_loss': 1 / 2.0}, {'adv': None, 'nat': None}   # lines 44-49
    ws = []
    for st, wlr in zip(r['steps'], rates):
        S = make_net(8, 1, n_classes); S.load_state_dict(st['state'])
        torch.manual_seed(st['seed'])
        noise = torch.randn(st['x'].shape, dtype=torch.float64)   # what the library's normal start draws after the seed
        loss, xa = official_step(S, T, TN, st['x'], st['y'], weight, init, noise, wlr, factor, bert)
        assert torch.allclose(st['x_adv'], xa, rtol=0, atol=1e-12), f"x′ differs at {int(((st['x_adv'] - xa).abs() > 1e-12).sum())} entries"
        assert abs(st['loss'].item() - loss.item()) <= 1e-12 * abs(loss.item()), (st['loss'].item(), loss.item())
        for n, p in S.named_parameters():
            assert rel_err(st['grads'][n], p.grad) < 1e-10, f"{name} epoch {st['epoch']}: grad of {n}"
        assert abs(st['w_nat'] - weight['nat_loss']) < 1e-14, (st['epoch'], st['w_nat'], weight['nat_loss'])
        ws.append(weight['nat_loss'])
    # the test can see the weights move: the first step keeps 1/2, the later ones leave it
    assert ws[0] == 0.5 and all(abs(w - 0.5) > 1e-6 for w in ws[1:]), ws
    s = r['learn'].adv_distill.state
    assert abs(s.init_adv.item() - init['adv']) <= 1e-14 * init['adv'] and abs(s.init_nat.item() - init['nat']) <= 1e-14 * init['nat']

def test_weight_is_logged_and_teachers_untouched():
    r = run('cifar10')
    learn = r['learn']
    assert 'nat_weight' in learn.recorder.metric_names
    i = list(learn.recorder.metric_names).index('nat_weight') - 1   # values exclude the epoch column
    logged = [row[i] for row in learn.recorder.values]
    assert logged == pytest.approx([s['w_nat'] for s in r['steps']], abs=1e-6)   # one batch per epoch: the epoch mean is the step's
    for m in (r['teacher'], r['nat']):
        assert not m.training and not any(p.requires_grad for p in m.parameters())
    ref = make_net(10, 3, 10, True)
    assert all(torch.equal(a, b) for a, b in zip(r['nat'].state_dict().values(), ref.state_dict().values()))


# ----------------------------------------------------------------------------------------- 2. checkpoint and resume

def build(out, seed=0, cbs=()):
    torch.set_num_threads(1)
    torch.manual_seed(1234)
    teacher = timm.create_model('small_cnn', num_classes=10, in_chans=1, width=8).requires_grad_(False).eval()
    torch.manual_seed(4321)
    nat = timm.create_model('small_cnn', num_classes=10, in_chans=1, width=6).requires_grad_(False).eval()
    seed_everything(seed)
    dls = get_dls('digits', n_train=192, n_valid=64, bs=64, device='cpu', augment=True, path=out)
    student = timm.create_model('small_cnn', num_classes=10, in_chans=1, width=8)
    return distill_learner(teacher, student, dls, method='mtard', igdm=False, nat_teacher=nat, check_teacher=False,
                           threat=ThreatModel(eps=0.1, step_size=0.05, n_steps=2),
                           loss_kwargs=dict(weight_lr=0.3, weight_milestones=(0.5,)), cbs=[Checkpoint('ckpt.pt')] + list(cbs))

class StopAt(Callback):
    def __init__(self, epoch): self.epoch_ = epoch
    def before_batch(self):
        if self.epoch == self.epoch_ and self.iter == 1: raise KeyboardInterrupt

def fit(learn, **kw):
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(4, **kw)

def snapshot(learn):
    st = learn.adv_distill.state.state_dict()
    return dict(model={k: v.clone() for k, v in learn.model.state_dict().items()}, state=st,
                values=[list(v) for v in learn.recorder.values])

def test_resume_is_exact(tmp_path):
    a = build(tmp_path/'a'); fit(a); ref = snapshot(a)
    b = build(tmp_path/'b', cbs=[StopAt(2)])
    with pytest.raises(KeyboardInterrupt): fit(b)
    ck = load_checkpoint(tmp_path/'b'/'ckpt.pt')
    assert ck['next_epoch'] == 2 and set(ck['callbacks']['method_state']) == {'nat_weight', 'init_adv', 'init_nat'}
    c = build(tmp_path/'b', seed=9)
    assert c.resume_from('ckpt.pt') == 2
    fit(c)
    got = snapshot(c)
    assert [k for k in ref['model'] if not torch.equal(ref['model'][k], got['model'][k])] == []
    assert all(torch.equal(ref['state'][k], got['state'][k]) for k in ref['state']), (ref['state'], got['state'])
    assert ref['values'] == got['values']
    assert abs(ref['state']['nat_weight'].item() - 0.5) > 1e-4   # the weight moved, so a lost state would show
    # a resume without the state (a checkpoint of another run's callbacks) is refused, not silently restarted at 1/2
    d = build(tmp_path/'b', seed=9)
    d.remove_cb(d.method_state)
    d.resume_from('ckpt.pt')
    with pytest.raises(ValueError, match='MethodState'): fit(d)


# --------------------------------------------------------------------------------------------------- 3. bad inputs

def test_bad_inputs():
    t, s, nat = make_net(12, 2, 10), make_net(8, 1, 10), make_net(10, 3, 10)
    dls = make_dls(10)
    with pytest.raises(ValueError, match="robust and a natural teacher: pass nat_teacher="):
        distill_learner(t, s, dls, method='mtard', igdm=False, check_teacher=False)
    with pytest.raises(ValueError, match="method 'ard' has one teacher: leave nat_teacher out"):
        distill_learner(t, s, dls, method='ard', igdm=False, nat_teacher=nat, check_teacher=False)
    with pytest.raises(ValueError, match=r"natural teacher \(Net\) outputs 5 classes but the student \(Net\) outputs 10"):
        distill_learner(t, s, dls, method='mtard', igdm=False, nat_teacher=make_net(10, 3, 5), check_teacher=False)
    with pytest.raises(ValueError, match="no IGDM alpha for method 'mtard': pass alpha="):
        distill_learner(t, s, dls, method='mtard', nat_teacher=nat, check_teacher=False)
    with pytest.raises(ValueError, match="pass `nat_teacher=`"):
        AdvDistill('mtard', t)
    assert METHODS['mtard'].nat_teacher and not any(m.nat_teacher for k, m in METHODS.items() if k != 'mtard')
