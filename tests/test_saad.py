"""Issue #30 item 1: SAAD (Lee & Chung, TMLR 2026) in the registry, against the authors' script.

1. The step. Two training steps (the IGDM ramp at 1/2 and 2/2) of `distill_learner(..., method='saad')` in float64
   equal the step of `HongsinLee/saad` @ 295121c transcribed here by hand: `saad.py` lines 49-86 (the teacher's entropy
   weights, the per-sample IGDM term, the clean term), `attacks.py` lines 138-194 (`saad_inner_loss`: the teacher
   linearized in its true-class logit), `utils.py` lines 26-53 (`samplewise_kl_div`, `samplewise_renyi_entropy`):
   x′, the loss and every parameter gradient, for the defaults (β = 0) and with the clean term, another α and γ.
   The transcription never calls igdmfast's losses, objectives or attacks.
2. The recipe's SWA is added by the learner (from epoch 95 of 200 as a fraction; BatchNorm on clean images), not
   when the caller averages already; `igdm=False` drops the IGDM term (α 0); bad options are refused.
"""
import copy, functools
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from fastai.callback.core import Callback
import fastai.callback.progress  # noqa: F401  (no_bar)

from igdmfast.core import ThreatModel
from igdmfast.data import synth_dls
from igdmfast.learner import distill_learner
from igdmfast.callback.adversarial import AdvExamples
from igdmfast.callback.averaging import WeightAveraging, averaging_start

B, C, K, N_EPOCH = 8, 5, 3, 2
EPS, STEP = 0.25, 0.1
THREAT = ThreatModel(eps=EPS, step_size=STEP, n_steps=K)


from test_distill_steps import Net   # the same conv-BN net as the other float64 step tests

def make_student():
    torch.manual_seed(1)
    return Net(8).double()

def make_teacher():
    torch.manual_seed(2)
    t = Net(12).double()
    with torch.no_grad():
        for m in t.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5); m.bias.uniform_(-0.3, 0.3)
                m.running_mean.uniform_(-0.2, 0.2); m.running_var.uniform_(0.5, 2.0)
        t.fc.weight.mul_(20)   # confident on some images, unsure on others: entropies (and SAAD's weights) far apart
    return t.eval()

def make_dls():
    dls = synth_dls(n_train=B, n_valid=B, n_classes=C, size=8, bs=B, device='cpu', noise=0.3)
    for dl in dls.loaders: dl.batch_tfm = lambda b: (b[0].double(), b[1])
    return dls


# ---------------------------------------------------------------------- the authors' step, transcribed by hand

def samplewise_kl_div(input_logits, target_logits):
    "utils.py lines 26-41."
    with torch.no_grad():
        p = F.softmax(target_logits, dim=1)
    logq = F.log_softmax(input_logits, dim=1)
    return F.kl_div(logq, p, reduction='none').sum(dim=1)

def samplewise_renyi_entropy(logits, alpha=2.0, eps=1e-12):
    "utils.py lines 43-53."
    p = F.softmax(logits, dim=1)
    if abs(alpha - 1.0) < 1e-6:
        return -(p * torch.log(p + eps)).sum(dim=1)
    return torch.log((p ** alpha).sum(dim=1) + eps) / (1.0 - alpha)

def saad_inner_loss(model, teacher_model, x_natural, y, noise, step_size, epsilon, perturb_steps, beta=1.0):
    "attacks.py lines 138-194 (the optimizer argument dropped: it only zeroes gradients)."
    criterion_kl = nn.KLDivLoss(reduction='sum')
    model.eval()
    teacher_model.eval()
    x_temp = x_natural.detach()
    x_temp.requires_grad_(True)
    teacher_logits = teacher_model(x_temp)
    Bn, num_classes = teacher_logits.shape
    teacher_logits_of_y = teacher_logits[torch.arange(Bn), y]
    logit_sum = teacher_logits_of_y.sum()
    teacher_gradient_for_y = torch.autograd.grad(outputs=logit_sum, inputs=x_temp, create_graph=False, retain_graph=False)[0]
    x_adv = x_natural.detach() + 0.001 * noise.detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            input_diff = x_adv - x_natural
            teacher_logit_correction = torch.einsum('bchw,bchw->b', teacher_gradient_for_y, input_diff)
            corrected_teacher_logits = teacher_logits.detach().clone()
            corrected_teacher_logits[torch.arange(Bn), y] += beta * teacher_logit_correction
            student_logits = model(x_adv)
            loss_kl = criterion_kl(F.log_softmax(student_logits, dim=1), F.softmax(corrected_teacher_logits, dim=1))
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    return x_adv.detach()

def official_step(student, teacher, X, y, noise, epoch, epochs, igdm_alpha=1.0, beta=0.0, gamma=1.0):
    "saad.py lines 49-85 (`epoch` 1-based), up to `loss.backward()`."
    student.train()
    with torch.no_grad():
        teacher_clean = teacher(X)
    inputs_adv = saad_inner_loss(student, teacher, X, y, noise, step_size=STEP, epsilon=EPS, perturb_steps=K, beta=1.0)
    student.zero_grad()
    with torch.no_grad():
        delta = inputs_adv - X
        teacher_plus = teacher(inputs_adv)
        teacher_minus = teacher(X - delta)
    student_plus = student(inputs_adv)
    student_minus = student(X - delta)
    student_clean = student(X)
    teacher_ent_per = samplewise_renyi_entropy(teacher_plus, gamma)
    kl_adv_per_sample = samplewise_kl_div(student_plus, teacher_plus)
    kl_clean_per_sample = samplewise_kl_div(student_clean, teacher_clean)
    IGDM_loss_per_sample = igdm_alpha * (epoch / epochs) * samplewise_kl_div(student_plus - student_minus, teacher_plus - teacher_minus)
    min_ent = teacher_ent_per.min().item()
    w = 5 * (teacher_ent_per - min_ent)
    w = torch.clamp(w, min=0.0)
    w_norm = (w - w.min()) / (w.max() - w.min() + 1e-8)
    weighted_kl = w * (kl_adv_per_sample + IGDM_loss_per_sample) + beta * (1 - w_norm) * kl_clean_per_sample
    loss = weighted_kl.mean()
    loss.backward()
    return loss.detach(), inputs_adv, w


# --------------------------------------------------------------------------------------------- running the library

class Probe(Callback):
    order = AdvExamples.order - 1
    def __init__(self): self.steps = []
    def before_batch(self):
        if not self.training: return
        seed = 500 + self.epoch
        self.cur = dict(seed=seed, epoch=self.epoch, x=self.xb[0].detach().clone(), y=self.yb[0].clone(),
                        state={k: v.detach().clone() for k, v in self.model.state_dict().items()})
        torch.manual_seed(seed)
    def after_backward(self):
        self.cur.update(loss=self.learn.loss_grad.detach().clone(), x_adv=self.xb[0].detach().clone(),
                        grads={n: p.grad.detach().clone() for n, p in self.model.named_parameters()},
                        bn_after={k: v.detach().clone() for k, v in self.model.state_dict().items() if 'running' in k})
        self.steps.append(self.cur)
    def after_batch(self):
        if self.training: self.learn.loss = self.learn.loss.float()

CONFIGS = {   # name: (alpha, loss_kwargs, the script's igdm_alpha, beta, gamma)
    'defaults': (None, {}, 1.0, 0.0, 1.0),
    'clean_term': (3.0, dict(beta=0.5, gamma=2.0), 3.0, 0.5, 2.0),
}

@functools.lru_cache(maxsize=None)
def run(name):
    alpha, kw, *_ = CONFIGS[name]
    student, teacher = make_student(), make_teacher()
    learn = distill_learner(teacher, student, make_dls(), method='saad', alpha=alpha, threat=THREAT, loss_kwargs=kw or None,
                            check_teacher=False)
    probe = Probe()
    with learn.no_bar(), learn.no_logging(): learn.fit(N_EPOCH, lr=0.05, cbs=probe)
    return dict(learn=learn, steps=probe.steps, teacher=teacher)

def rel_err(a, b): return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize('name', list(CONFIGS))
def test_step_equals_official(name):
    _, _, a, beta, gamma = CONFIGS[name]
    r = run(name)
    assert len(r['steps']) == N_EPOCH
    T = copy.deepcopy(r['teacher']).eval()
    for st in r['steps']:
        S = make_student(); S.load_state_dict(st['state'])
        torch.manual_seed(st['seed'])
        noise = torch.randn(st['x'].shape, dtype=torch.float64)
        loss, xa, w = official_step(S, T, st['x'], st['y'], noise, st['epoch'] + 1, N_EPOCH, a, beta, gamma)
        assert torch.allclose(st['x_adv'], xa, rtol=0, atol=1e-12), f"x′ differs at {int(((st['x_adv'] - xa).abs() > 1e-12).sum())} entries"
        assert abs(st['loss'].item() - loss.item()) <= 1e-10 * abs(loss.item()), (st['loss'].item(), loss.item())
        for n, p in S.named_parameters():
            assert rel_err(st['grads'][n], p.grad) < 1e-9, f"{name} epoch {st['epoch']}: grad of {n}"
        # BatchNorm's running statistics after the step: the script's three train-mode forwards, in its order
        sd = S.state_dict()
        for k, v in st['bn_after'].items(): assert torch.allclose(v, sd[k], rtol=1e-12, atol=1e-14), k
        # the test can see the weighting: the weights differ between samples, one sample gets 0
        assert w.min() == 0 and w.max() > 1e-2 and len(set(w.tolist())) == B, w

def test_recipe_swa_and_switches():
    learn = run('defaults')['learn']
    (swa,) = [cb for cb in learn.cbs if isinstance(cb, WeightAveraging)]
    assert swa.kind == 'swa' and swa.bn_on == 'clean' and averaging_start(swa.start, 200) == 94
    assert swa.n_averaged == N_EPOCH and learn.alpha == 1.0 and learn.igdm
    assert 'igdm_loss' not in learn.recorder.metric_names       # no additive IGDM term: it is inside SAAD's loss
    t, s = make_teacher(), make_student()
    own = WeightAveraging('ema', bn_on=None)
    l2 = distill_learner(t, s, make_dls(), method='saad', igdm=False, threat=THREAT, check_teacher=False, cbs=[own])
    assert [cb for cb in l2.cbs if isinstance(cb, WeightAveraging)] == [own]   # the caller's averaging, not a second one
    assert l2.adv_distill.kw['igdm_alpha'] == 0.
    with pytest.raises(ValueError, match="pass alpha="):
        distill_learner(t, s, make_dls(), method='saad', threat=THREAT, check_teacher=False, loss_kwargs=dict(igdm_alpha=2.))
    with pytest.raises(ValueError, match="igdm_bn must be 'update'"):
        distill_learner(t, s, make_dls(), method='saad', threat=THREAT, check_teacher=False, igdm_bn='keep')
