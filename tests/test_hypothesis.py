"""Property-based tests (issue #8): random shapes, dtypes, ranges and parameters fed to the attack engine, the threat
model and every loss give either a correct result or a clear `ValueError`/`TypeError` raised by igdmfast's own
checks, never an exception from deep inside torch.

A correct result: for an attack, a tensor of the input's shape and dtype, finite, in [0,1] and inside the eps ball
around the input; for a loss, a finite scalar; for a `ThreatModel`, one whose fields are valid. Examples are few and
tiny (CPU, one thread) and derandomized, so the run is fast and the same in CI every time.
"""
import math
import traceback
import warnings

import pytest
import torch
from torch import nn
from hypothesis import given, settings, strategies as st, HealthCheck

from igdmfast.core import ThreatModel, ProbabilityOutputWarning
from igdmfast.attacks import perturb, pgd, fgsm, cw_linf, kl_objective, kl_div
from igdmfast.losses import (pgd_at_loss, trades_loss, ard_loss, iad_loss, akd_loss, rslad_loss, adaad_loss, igdm_loss,
                             igdm_weight, kl_through)

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def outcome(f):
    "`(result, None)`, or `(None, error)` for a ValueError/TypeError raised by igdmfast itself; anything else fails the test."
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', ProbabilityOutputWarning)
        try: return f(), None
        except (ValueError, TypeError) as e:
            where = traceback.extract_tb(e.__traceback__)[-1].filename
            assert 'igdmfast' in where, f"{type(e).__name__} raised in {where}, not by igdmfast's checks: {e}"
            assert len(str(e)) > 20, f"an unhelpful message: {e!r}"
            return None, e


# ------------------------------------------------------------------------------------------------ ThreatModel

BAD_NUMBERS = [0, -0.1, float('nan'), float('inf'), 8, 255, '8', None, True]

@st.composite
def threat_kwargs(draw):
    "Valid keyword arguments, with (usually) one of them replaced by a wrong value."
    eps = draw(st.floats(1e-4, 1.0))
    kw = dict(norm=draw(st.sampled_from(['Linf', 'L2', 'linf', 'l2', 'inf'])), eps=eps,
              step_size=eps * draw(st.floats(0.01, 1.0)), n_steps=draw(st.integers(1, 50)), restarts=draw(st.integers(1, 5)),
              random_start=draw(st.sampled_from([True, False, None, 'uniform', 'normal', 'none'])))
    fault = draw(st.sampled_from(['none', 'none', 'eps', 'step_size', 'step>eps', 'n_steps', 'restarts', 'norm', 'random_start']))
    if fault in ('eps', 'step_size'): kw[fault] = draw(st.sampled_from(BAD_NUMBERS))
    elif fault == 'step>eps': kw['step_size'] = min(1., kw['eps'] * 2) if kw['eps'] < 1 else 1.5
    elif fault in ('n_steps', 'restarts'): kw[fault] = draw(st.sampled_from([0, -1, 1.5, 2.0, None, '3']))
    elif fault == 'norm': kw['norm'] = draw(st.sampled_from(['L1', None, 2, 'Linf2']))
    elif fault == 'random_start': kw['random_start'] = draw(st.sampled_from(['gauss', ['uniform'], 'Uniform ']))
    return fault, kw

@SETTINGS
@given(case=threat_kwargs())
def test_threat_model(case):
    fault, kw = case
    tm, err = outcome(lambda: ThreatModel(**kw))
    if fault == 'none': assert err is None, (kw, err)
    elif fault != 'random_start' or kw['random_start'] != 'none': assert err is not None, (fault, kw)
    if err is not None: return
    assert tm.norm in ('Linf', 'L2') and tm.random_start in ('uniform', 'normal', 'none')
    assert 0 < tm.step_size <= tm.eps <= 1 and math.isfinite(tm.eps)
    assert isinstance(tm.n_steps, int) and tm.n_steps >= 1 and isinstance(tm.restarts, int) and tm.restarts >= 1
    assert tm.replace() == tm


# ------------------------------------------------------------------------------------------------ attacks

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int64, torch.bool]

def make_model(c_in, n_classes, dtype, kind):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(c_in, 2, 1), nn.BatchNorm2d(2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(2, n_classes))
    if kind == 'probabilities': m = nn.Sequential(m, nn.Softmax(1))
    if kind == 'nan': m = nn.Sequential(m, nn.Dropout(0.0), _Times(float('nan')))
    return m.to(dtype)

class _Times(nn.Module):
    def __init__(self, k): super().__init__(); self.k = k
    def forward(self, z): return z * self.k

ATTACK_FAULTS = ['none'] * 8 + ['x_dtype', 'x_0_255', 'x_normalized', 'x_above_1', 'x_nan', 'x_3d', 'y_range', 'y_negative',
                                 'y_float', 'y_short', 'y_none', 'channels', 'model_dtype', 'nan_model',
                                 # these must work:
                                 'y_int32', 'probabilities', 'bf16', 'half_range']

@st.composite
def attack_case(draw):
    "A valid attack call (random shapes, dtypes, threat, attack, mode), with (usually) one thing made wrong."
    b, c, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    k = draw(st.integers(1, 4))
    fault = draw(st.sampled_from(ATTACK_FAULTS))
    dtype = torch.bfloat16 if fault == 'bf16' else draw(st.sampled_from([torch.float32, torch.float64]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.rand(b, c, h, w, generator=g, dtype=torch.float64)
    if fault == 'half_range': x = 0.25 + x / 2
    if fault == 'x_0_255': x = (x * 255).round(); x.view(-1)[0] = 255
    if fault == 'x_normalized': x = (x - 0.5) / 0.25; x.view(-1)[0] = -1.5
    if fault == 'x_above_1': x = x * 1.5; x.view(-1)[0] = 1.2
    if fault == 'x_nan': x.view(-1)[draw(st.integers(0, x.numel() - 1))] = draw(st.sampled_from([float('nan'), float('inf'), -float('inf')]))
    x = x.to(dtype)
    if fault == 'x_dtype': x = (x * 255).to(draw(st.sampled_from([torch.uint8, torch.int64, torch.bool])))
    if fault == 'x_3d': x = x[0]
    y = torch.randint(0, k, (b,), generator=g)
    y = {'y_range': y + k, 'y_negative': y - k, 'y_float': y.float(), 'y_short': y[:-1], 'y_none': None, 'y_int32': y.int()}.get(fault, y)
    model_dtype = dtype if fault != 'model_dtype' else (torch.float64 if dtype == torch.float32 else torch.float32)
    kind = {'probabilities': 'probabilities', 'nan_model': 'nan'}.get(fault, 'logits')
    model = make_model(c + (fault == 'channels'), k, model_dtype, kind)
    eps = draw(st.sampled_from([1e-3, 8/255, 0.3, 1.0]))
    threat = ThreatModel(norm=draw(st.sampled_from(['Linf', 'L2'])), eps=eps, step_size=eps * draw(st.sampled_from([0.25, 0.5, 1.0])),
                         n_steps=draw(st.integers(1, 3)), random_start=draw(st.sampled_from(['uniform', 'normal', 'none'])),
                         restarts=draw(st.integers(1, 2)))
    attack = draw(st.sampled_from(['pgd', 'fgsm', 'cw', 'perturb-kl', 'perturb-ce']))
    mode = draw(st.sampled_from(['eval', 'train']))
    return fault, (x, y, model, threat, attack, mode, k)

def run_attack(x, y, model, threat, attack, mode, k):
    gen = torch.Generator().manual_seed(0)
    if attack == 'pgd': return pgd(model, x, y, threat, mode=mode, generator=gen)
    if attack == 'cw': return cw_linf(model, x, y, threat, mode=mode, generator=gen)
    if attack == 'fgsm': return fgsm(model, x, y, eps=threat.eps, norm=threat.norm, mode=mode)
    if attack == 'perturb-ce': return perturb(model, x, y, threat, 'ce', mode=mode, generator=gen)
    target = torch.randn(len(x), k, generator=torch.Generator().manual_seed(1))
    return perturb(model, x, y, threat, kl_objective(target), mode=mode, generator=gen)

def in_ball(x_adv, x, threat):
    tol = 1e-5 if x.dtype in (torch.float32, torch.float64) else 1e-2   # rounding of half precision
    d = (x_adv.double() - x.double()).flatten(1)
    r = d.abs().amax(1) if threat.norm == 'Linf' else d.norm(dim=1)
    return bool((r <= threat.eps * (1 + 1e-5) + tol).all())

def must_work(fault, x, attack, mode):
    "Whether the case is valid input for the attack (BatchNorm in train mode needs more than one value per channel)."
    if fault in ('y_none', 'y_range', 'y_negative') and attack == 'perturb-kl': fault = 'none'   # the KL objective reads no labels
    bn_ok = mode == 'eval' or (x.ndim == 4 and x.shape[0] * x.shape[2] * x.shape[3] > 1)
    return fault in ('none', 'y_int32', 'probabilities', 'bf16', 'half_range') and bn_ok

@SETTINGS
@given(case=attack_case())
def test_attacks_give_a_valid_batch_or_a_clear_error(case):
    fault, args = case
    x, y, model, threat, attack, mode, k = args
    params = [p.clone() for p in model.parameters()]
    bufs = [b.clone() for b in model.buffers()]
    flags = [m.training for m in model.modules()]
    x_adv, err = outcome(lambda: run_attack(*args))
    # whatever happened, the model is as it was
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(bufs, model.buffers()))
    assert [m.training for m in model.modules()] == flags and all(p.grad is None for p in model.parameters())
    if must_work(fault, x, attack, mode): assert err is None, (fault, attack, mode, err)
    elif fault not in ('y_none', 'y_range', 'y_negative', 'nan_model') or attack != 'perturb-kl': assert err is not None, (fault, attack, mode)
    if err is not None: return
    assert isinstance(x_adv, torch.Tensor) and x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert not x_adv.requires_grad
    assert torch.isfinite(x_adv).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert in_ball(x_adv, x, threat), (threat, (x_adv.double() - x.double()).abs().max())


# ------------------------------------------------------------------------------------------------ losses

LOSSES = {
    'pgd_at': lambda z, y, p: pgd_at_loss(z[0], y),
    'trades': lambda z, y, p: trades_loss(z[0], z[1], y, beta=p['a']),
    'ard': lambda z, y, p: ard_loss(z[0], z[1], z[2], y, temperature=p['t'], kd_weight=p['w'], reduction=p['r']),
    'iad': lambda z, y, p: iad_loss(z[0], z[1], z[2], z[3], y, epoch=p['e'], begin=1, temperature=p['t'], kd_weight=p['w'], beta=p['a']),
    'akd': lambda z, y, p: akd_loss(z[0], z[1], y, kd_weight=p['w'], temperature=p['t']),
    'rslad': lambda z, y, p: rslad_loss(z[0], z[1], z[2], adv_weight=p['w'], scale=p['s']),
    'adaad': lambda z, y, p: adaad_loss(z[0], z[1], z[2], z[3], adv_weight=p['w'], reduction=p['r']),
    'igdm': lambda z, y, p: igdm_loss(*z[:4]),
    'kl_div': lambda z, y, p: kl_div(z[0], z[1]).sum(),            # per-sample: an empty batch gives an empty result
    'kl_through': lambda z, y, p: kl_through(z[0], z[1]).sum(),
}

LOSS_FAULTS = ['none'] * 6 + ['int_logits', 'shape', 'missing', 'empty_batch', 'no_classes', 'one_d', 'y_range', 'y_negative',
                              'y_float', 'y_short', 'y_list', 'param'] + ['y_int32', 'half', 'one_class', 'big_logits']   # these must work

@st.composite
def loss_case(draw):
    "A valid call of one loss (random batch, classes, float dtypes, parameters), with (usually) one thing made wrong."
    name = draw(st.sampled_from(sorted(LOSSES)))
    fault = draw(st.sampled_from(LOSS_FAULTS))
    b, k = draw(st.integers(1, 3)), (1 if fault == 'one_class' else draw(st.integers(2, 5)))
    if fault == 'empty_batch': b = 0
    if fault == 'no_classes': k = 0
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    scale = 30. if fault == 'big_logits' else draw(st.sampled_from([0.1, 1., 5.]))
    dts = [torch.float16, torch.bfloat16] if fault == 'half' else [torch.float32, torch.float64]
    zs = [(torch.randn(b, k, generator=g) * scale).to(draw(st.sampled_from(dts))) for _ in range(4)]
    i = draw(st.integers(0, 3))
    if fault == 'int_logits': zs[i] = zs[i].round().long()
    if fault == 'shape': zs[i] = torch.randn(*draw(st.sampled_from([(b, k + 1), (b + 1, k), (b, k, 1)])), generator=g)
    if fault == 'one_d': zs[i] = zs[i][0]
    if fault == 'missing': zs[i] = None
    y = torch.randint(0, max(k, 1), (b,), generator=g)
    y = {'y_range': y + k, 'y_negative': y - k, 'y_float': y.float(), 'y_short': y[:-1], 'y_list': y.tolist(),
         'y_int32': y.int()}.get(fault, y)
    p = dict(a=draw(st.floats(0, 10)), t=draw(st.floats(0.5, 10)), w=draw(st.floats(0, 1)), s=draw(st.one_of(st.none(), st.floats(0.1, 10))),
             r=draw(st.sampled_from(['batchmean', 'mean'])), e=draw(st.integers(0, 3)))
    if fault == 'param':
        key = draw(st.sampled_from(sorted(p)))
        p[key] = draw(st.sampled_from([-1., float('nan'), float('inf'), True, 'x', 2.5, -1, 1.5] if key != 'r' else ['sum', None]))
    return name, fault, i, zs, y, p

USES_LABELS = {'pgd_at', 'trades', 'akd'}   # always (ard and iad only for some weights and epochs)

@SETTINGS
@given(case=loss_case())
def test_losses_give_a_finite_scalar_or_a_clear_error(case):
    name, fault, i, zs, y, p = case
    zs = [z.requires_grad_(True) if isinstance(z, torch.Tensor) and z.is_floating_point() else z for z in zs]
    loss, err = outcome(lambda: LOSSES[name](zs, y, p))
    if fault in ('none', 'y_int32', 'half', 'one_class', 'big_logits'): assert err is None, (name, fault, err)
    elif (fault in ('empty_batch', 'no_classes') and not name.startswith('kl_')) or \
         (fault in ('int_logits', 'shape', 'missing', 'one_d') and i == 0):
        assert err is not None, (name, fault)
    elif fault.startswith('y_') and name in USES_LABELS: assert err is not None, (name, fault)
    if err is not None: return
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0 and loss.is_floating_point()
    assert torch.isfinite(loss), (name, fault, loss)
    if loss.requires_grad:
        grads = torch.autograd.grad(loss, [z for z in zs if isinstance(z, torch.Tensor) and z.requires_grad], allow_unused=True)
        assert all(g is None or torch.isfinite(g).all() for g in grads)


@SETTINGS
@given(alpha=st.one_of(st.floats(0, 100), st.sampled_from([-1., float('nan'), True, 'x'])), epoch=st.one_of(st.integers(-2, 6), st.just(1.0)),
       n=st.one_of(st.integers(-1, 6), st.just(True)))
def test_igdm_weight(alpha, epoch, n):
    w, err = outcome(lambda: igdm_weight(alpha, epoch, n))
    if err is None: assert 0 <= w <= alpha and math.isfinite(w)
