"""The reference: one training step of RSLAD+IGDM and of AdaAD+IGDM written from the official IGDM scripts, not from
igdmfast: the loops of `rslad_IGDM_cifar100.py` and `adaad_IGDM_cifar100.py` with the inner maximizations of their
`rslad_loss.py` (`rslad_inner_loss_xadv`, `adaad_inner_loss`), at the commit of spec/METHOD.md (a.2, b.6, b.7).

It imports nothing from igdmfast and keeps the scripts' order of operations: a `DataParallel`-wrapped student, the
attack loop written out with `KLDivLoss(log_softmax(S), softmax(T))`, the start x + 0.001·N(0,I) used as it is (not
clamped to [0,1], so the first gradient is taken there; the first step's `min/max` and `clamp` bring x′ back),
separate student forwards at x+δ and at x′, separate teacher calls (T(x) twice for RSLAD), S(x) computed even where its
weight is 0 (AdaAD), RSLAD's hand-written elementwise KL.

Where it departs from the scripts, and why:
- `noise`: the scripts draw `torch.randn(x.shape)` (float32, from torch's CPU generator) and copy it to the GPU; a
  check passes the noise tensor so that both sides start from the same point (by default it is drawn the scripts' way);
- `.cuda()` is the batch's device; the dtype is the models' (float64 for the equivalence checks);
- the IGDM ramp is `alpha * epoch / epochs` (the scripts hard-code `epoch/300` and `epoch/200`);
- RSLAD's CIFAR-100 factor 10 ("to keep consistent with CIFAR-10") is written `n_classes / 10`, 1 for 10 classes.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def kl_loss(a, b): return -a * b + torch.log(b + 1e-5) * b   # rslad_IGDM_cifar100.py


def script_noise(x):
    "The scripts' start noise: `torch.randn(x.shape)` on the CPU in float32, copied to the batch's device."
    return torch.randn(x.shape).to(x.device)


def rslad_inner_loss_xadv(model, teacher_logits, x_natural, y, optimizer, step_size, epsilon, perturb_steps, noise=None):
    "rslad_loss.py: maximize Σ KL(T(x) ‖ S(x′)) with the student in eval mode; returns S(x′) in train mode and x′."
    criterion_kl = nn.KLDivLoss(reduction='none')
    model.eval()
    noise = script_noise(x_natural) if noise is None else noise
    x_adv = x_natural.detach() + 0.001 * noise.detach()          # not clamped: the first forward may see -0.001 or 1.001
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = criterion_kl(F.log_softmax(model(x_adv), dim=1), F.softmax(teacher_logits, dim=1))
            loss_kl = torch.sum(loss_kl)
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    optimizer.zero_grad()
    logits = model(x_adv)
    return logits, x_adv


def adaad_inner_loss(model, teacher_model, x_natural, step_size, steps, epsilon, noise=None):
    "rslad_loss.py: maximize Σ KL(T(x′) ‖ S(x′)), back-propagating through both, the student in eval mode."
    criterion_kl = nn.KLDivLoss(reduction='none')
    model.eval()
    teacher_model.eval()
    noise = script_noise(x_natural) if noise is None else noise
    x_adv = x_natural.detach() + 0.001 * noise.detach()          # not clamped, as above
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = criterion_kl(F.log_softmax(model(x_adv), dim=1), F.softmax(teacher_model(x_adv), dim=1))
            loss_kl = torch.sum(loss_kl)
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    return torch.clamp(x_adv, 0.0, 1.0).detach()


def rslad_igdm_step(student, teacher, optimizer, X, y, alpha, epoch, epochs, epsilon=8/255, step_size=2/255, steps=10,
                    n_classes=100, step=True, plus_at_x_adv=False, noise=None):
    "One RSLAD+IGDM step of `rslad_IGDM_cifar100.py` (beta = gamma = 1); returns the loss (after `backward`) and x′."
    criterion_kl = nn.KLDivLoss(reduction='batchmean')
    student.train()
    with torch.no_grad():
        teacher_logits = teacher(X)
    adv_logits, inputs_adv = rslad_inner_loss_xadv(student, teacher_logits, X, y, optimizer, step_size=step_size,
                                                   epsilon=epsilon, perturb_steps=steps, noise=noise)
    with torch.no_grad():
        delta = inputs_adv - X
        X_plus = inputs_adv if plus_at_x_adv else X + delta   # the same point; `plus_at_x_adv` only for the fp32 noise floor
        teacher_plus = teacher(X_plus)
        teacher_logits = teacher(X)
        teacher_minus = teacher(X - delta)
    student.train()
    student_plus = student(X_plus)
    student_logits = student(X)
    student_minus = student(X - delta)
    diff_grad_kl_loss = criterion_kl(F.log_softmax(student_plus - student_minus, dim=1),
                                     F.softmax((teacher_plus - teacher_minus).detach(), dim=1))
    kl_Loss1 = kl_loss(torch.log(F.softmax(adv_logits, dim=1)), F.softmax(teacher_logits.detach(), dim=1))
    kl_Loss2 = kl_loss(torch.log(F.softmax(student_logits, dim=1)), F.softmax(teacher_logits.detach(), dim=1))
    scale = n_classes / 10   # the CIFAR-100 script multiplies by 10 "to keep consistent with CIFAR-10"
    kl_Loss1 = scale * torch.mean(kl_Loss1)
    kl_Loss2 = scale * torch.mean(kl_Loss2)
    loss = 5.0/6.0 * kl_Loss1 + 1.0/6.0 * kl_Loss2 + alpha * (epoch / epochs) * diff_grad_kl_loss
    loss.backward()
    if step: optimizer.step()
    return loss.detach(), inputs_adv


def adaad_igdm_step(student, teacher, optimizer, X, y, alpha, epoch, epochs, epsilon=8/255, step_size=2/255, steps=10,
                    n_classes=100, step=True, plus_at_x_adv=False, noise=None):
    "One AdaAD+IGDM step of `adaad_IGDM_cifar100.py` (beta = gamma = 1, AdaAD_alpha = 1); returns the loss and x′."
    criterion_kl = nn.KLDivLoss(reduction='batchmean')
    student.train()
    inputs_adv = adaad_inner_loss(student, teacher, X, step_size=step_size, steps=steps, epsilon=epsilon, noise=noise)
    optimizer.zero_grad()
    with torch.no_grad():
        delta = inputs_adv - X
        X_plus = inputs_adv if plus_at_x_adv else X + delta   # the same point; `plus_at_x_adv` only for the fp32 noise floor
        teacher_plus = teacher(X_plus)
        teacher_logits = teacher(X)
        teacher_minus = teacher(X - delta)
    student_plus = student(X_plus)
    student_logits = student(X)
    student_minus = student(X - delta)
    ours_loss = criterion_kl(F.log_softmax(student_plus - student_minus, dim=1),
                             F.softmax((teacher_plus - teacher_minus).detach(), dim=1))
    adv_outputs = student(inputs_adv)
    with torch.no_grad():
        t_adv_outputs = teacher(inputs_adv)
    kl_loss1 = (1 / len(adv_outputs)) * torch.sum(nn.KLDivLoss(reduction='none')(
        F.log_softmax(adv_outputs, dim=1), F.softmax(t_adv_outputs.detach(), dim=1)))
    kl_loss2 = (1 / len(adv_outputs)) * torch.sum(nn.KLDivLoss(reduction='none')(
        F.log_softmax(student_logits, dim=1), F.softmax(teacher_logits.detach(), dim=1)))
    loss = 1 * kl_loss1 + (1 - 1) * kl_loss2 + alpha * (epoch / epochs) * ours_loss
    loss.backward()
    if step: optimizer.step()
    return loss.detach(), inputs_adv


STEPS = {'rslad': rslad_igdm_step, 'adaad': adaad_igdm_step}
WEIGHT_DECAY = {'rslad': 2e-4, 'adaad': 5e-4}   # args of the scripts (RSLAD's 2e-4, AdaAD's 5e-4)


def make(student, teacher, method, device, lr=0.1):
    "The script's setup: `DataParallel(student)` (a pass-through without GPUs), SGD, the teacher in eval mode, not frozen."
    s = nn.DataParallel(student.to(device))
    opt = torch.optim.SGD(s.parameters(), lr=lr, momentum=0.9, weight_decay=WEIGHT_DECAY[method])
    return s, teacher.to(device).eval(), opt
