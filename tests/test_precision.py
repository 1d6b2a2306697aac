"""Tests of `igdmfast.precision`: the autocast wrapper computes the same function (bit for bit when off, the same float64
math when on), the reduced-precision attack is as strong as fp32's on real batches (digits, CIFAR-10 subset) within the
stated tolerance, the fallback is warned about when forced, float16's loss scaling, the bf16 detection and default rule,
channels-last, and bench/gpu_check.py --tiny end to end."""
import json, os, sys, warnings
from pathlib import Path
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from igdmfast.core import ThreatModel, frozen
from igdmfast.attacks import perturb, kl_div
from igdmfast.methods import get_method
from igdmfast.models import small_cnn, tiny_resnet_cifar, tiny_mobilenet_cifar
from igdmfast.precision import (AttackPrecisionWarning, AutocastModel, PrecisionCheck, as_attack_dtype, attack_models,
                                attack_precision, check_attack_precision, check_method_precision, cpu_flags,
                                default_attack_dtype, native_bf16, to_channels_last)

DATA = Path(os.environ.get('IGDMFAST_TEST_DATA') or Path(__file__).resolve().parents[2]/'shared'/'data')
needs = lambda f: pytest.mark.skipif(not (DATA/f).is_file(), reason=f"{DATA/f} not available")
BENCH = Path(__file__).resolve().parent.parent / 'bench'


def _net(seed=0, classes=10, width=8, dtype=torch.float32):
    torch.manual_seed(seed)
    return tiny_resnet_cifar(num_classes=classes, width=width).to(dtype).eval()


def _x(n=6, seed=1, dtype=torch.float32):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _count_forwards(model):
    "A list that grows by one at each forward of `model` (a hook on the bare module)."
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    return calls


# --------------------------------------------------------------------------------- the wrapper computes the same function

@pytest.mark.parametrize('dtype', [None, torch.float32, 'fp32'])
def test_wrapper_off_is_the_bare_model_bit_for_bit(dtype):
    net, x = _net(), _x()
    w = AutocastModel(net, dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_w, out_b = w(xa), net(xb)
    assert torch.equal(out_w, out_b)
    ga, = torch.autograd.grad(F.cross_entropy(out_w, out_w.argmax(1)), xa)
    gb, = torch.autograd.grad(F.cross_entropy(out_b, out_b.argmax(1)), xb)
    assert torch.equal(ga, gb)
    s, t = attack_models(net, None, dtype)
    assert s is net and t is None   # off: the models themselves, not wrappers


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_wrapper_in_float64_is_the_same_math(dtype):
    "Autocast leaves float64 alone: outputs and input gradients equal the bare model's bit for bit (fp16's loss scale included)."
    net, x = _net(dtype=torch.float64), _x(dtype=torch.float64)
    w = AutocastModel(net, dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_w, out_b = w(xa), net(xb)
    assert out_w.dtype == torch.float64 and torch.equal(out_w, out_b)
    ga, = torch.autograd.grad(F.cross_entropy(out_w, out_w.argmax(1)), xa)
    gb, = torch.autograd.grad(F.cross_entropy(out_b, out_b.argmax(1)), xb)
    assert torch.equal(ga, gb)


@pytest.mark.parametrize('method', ['ard', 'rslad', 'adaad', 'trades'])
def test_attack_option_same_float64_attack_and_forward_counts(method):
    "A method's inner maximization on wrapped float64 models gives the same x′ and runs the same forwards as on the bare ones."
    m = get_method(method)
    s, t = _net(0, dtype=torch.float64), _net(1, dtype=torch.float64)
    x, threat = _x(dtype=torch.float64), ThreatModel(n_steps=3)
    with torch.no_grad(): y, t_nat = s(x).argmax(1), t(x)
    outs, counts = [], []
    for wrap in (False, True):
        cs, ct = _count_forwards(s), _count_forwards(t)
        ss, tt = attack_models(s, t, torch.bfloat16) if wrap else (s, t)
        if wrap: assert isinstance(ss, AutocastModel) and ss.model is s
        torch.manual_seed(5)
        outs.append(m.attack(ss, tt, x, y, threat, t_nat))
        counts.append((len(cs), len(ct)))
        s._forward_hooks.clear(); t._forward_hooks.clear()
    assert outs[0].dtype == torch.float64 and torch.equal(outs[0], outs[1])
    assert counts[0] == counts[1] and counts[0][0] > 0
    assert (counts[0][1] > 0) == (method == 'adaad')   # only AdaAD's attack runs the teacher


def test_wrapper_is_transparent_as_a_module():
    net = _net()
    net.train()
    w = AutocastModel(net, torch.bfloat16)
    assert list(w.state_dict()) == list(net.state_dict())                       # same keys, no 'model.' prefix, once each
    assert all(a is b for a, b in zip(w.parameters(), net.parameters()))
    assert len(list(w.parameters())) == len(list(net.parameters()))
    other = _net(seed=3)
    w.load_state_dict(other.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values()))
    w.eval(); assert not net.training and not any(m.training for m in net.modules())
    w.train(); assert net.training
    with frozen(w): assert not any(p.requires_grad for p in net.parameters())
    assert all(p.requires_grad for p in net.parameters())
    assert AutocastModel(w, torch.float16).model is net                          # never wrapped twice
    net.conv1.weight.requires_grad_(False)
    x = _x()
    with torch.no_grad(): y = net(x).argmax(1)
    perturb(w, x, y, ThreatModel(n_steps=2), 'ce')                              # the engine's contexts act through the wrapper
    assert net.training and not net.conv1.weight.requires_grad and net.linear.weight.requires_grad
    with attack_precision(net, None, 'bf16') as (s, t): assert isinstance(s, AutocastModel) and t is None


def test_reduced_precision_really_runs_and_the_iterate_stays_fp32():
    net, x = _net(), _x()
    with torch.no_grad(): y = net(x).argmax(1)
    w = AutocastModel(net, torch.bfloat16)
    seen = []
    net.linear.register_forward_hook(lambda mod, i, o: seen.append(o.dtype))
    out = w(x)
    assert out.dtype == torch.float32 and seen[-1] == torch.bfloat16
    assert not torch.equal(out, net(x))                                          # bf16 rounding: not the fp32 function
    xr = x.clone().requires_grad_()
    g, = torch.autograd.grad(F.cross_entropy(w(xr), y), xr)
    assert g.dtype == torch.float32
    threat = ThreatModel(n_steps=4)
    x_adv = perturb(w, x, y, threat, 'ce', generator=torch.Generator().manual_seed(0))
    assert x_adv.dtype == torch.float32
    assert (x_adv - x).abs().max() <= threat.eps + 1e-7 and x_adv.min() >= 0 and x_adv.max() <= 1


def test_float16_on_the_cpu_and_its_loss_scale():
    "CPU autocast runs float16 (torch 2.14); a tiny objective underflows float16's backward without scaling, not with it."
    net, x = _net(), _x()
    # gradient 1e-5 at the logits (a confidently classified sample's CE): inside the network it falls below float16's
    # smallest subnormal (6e-8) at every pixel
    tiny = lambda out: 1e-5 * out.sum()
    grads = {}
    for scale in (1., None):
        xr = x.clone().requires_grad_()
        grads[scale], = torch.autograd.grad(tiny(AutocastModel(net, torch.float16, loss_scale=scale)(xr)), xr)
    xr = x.clone().requires_grad_()
    g32, = torch.autograd.grad(tiny(net(xr)), xr)
    assert (grads[1.] == 0).all()                                               # underflow: sign(0) would leave x still
    assert (grads[None] != 0).float().mean() > 0.95                              # default scale 1024: the gradient survives
    cos = F.cosine_similarity(grads[None].flatten(), g32.flatten(), 0)
    ratio = grads[None].norm() / g32.norm()
    assert cos > 0.95 and 0.8 < ratio < 1.25, (cos, ratio)                        # unscaled at the input: the true gradient
    with pytest.raises(ValueError, match='loss_scale'): AutocastModel(net, torch.float16, loss_scale=0)


# --------------------------------------------------------------------------------- detection and the default rule

def test_native_bf16_flags_and_default_rule():
    assert cpu_flags('processor : 0\nflags\t\t: fpu avx2 avx512_bf16\n') == {'fpu', 'avx2', 'avx512_bf16'}
    assert native_bf16('cpu', 'flags : fpu avx2 avx512_bf16\n') and native_bf16('cpu', 'flags : amx_bf16 amx_tile\n')
    assert not native_bf16('cpu', 'model name : AMD EPYC\nflags : fpu sse avx avx2 fma\n')
    assert native_bf16('cpu', 'Features : fp asimd bf16\n') and not native_bf16('cpu', '')
    here = Path('/proc/cpuinfo').read_text() if Path('/proc/cpuinfo').exists() else ''
    assert native_bf16('cpu') == any(f in here.split() for f in ('avx512_bf16', 'amx_bf16', 'bf16'))
    avx2, bf = 'flags : fpu avx2\n', 'flags : avx512_bf16\n'
    assert default_attack_dtype('cpu', bf16=True, cpu_gain=True, cpuinfo=avx2) is None    # no native bf16: off
    assert default_attack_dtype('cpu', bf16=True, cpuinfo=bf) is None                     # no measured gain: off
    assert default_attack_dtype('cpu', bf16=True, cpu_gain=True, cpuinfo=bf) == torch.bfloat16
    assert default_attack_dtype('cpu', bf16=False, cpu_gain=True, cpuinfo=bf) is None
    assert default_attack_dtype('cuda', bf16=False) is None
    if torch.cuda.is_available():
        assert default_attack_dtype('cuda', bf16=True) == (torch.bfloat16 if torch.cuda.is_bf16_supported() else None)
    assert as_attack_dtype('bf16') == torch.bfloat16 and as_attack_dtype('off') is None
    with pytest.raises(ValueError, match='Unknown attack precision'): as_attack_dtype('int8')


def test_channels_last_same_function():
    net, x = _net(), _x()
    ref = net(x)
    cl = to_channels_last(net)
    assert cl is net and net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl(x), ref, rtol=1e-4, atol=1e-5)
    mob = tiny_mobilenet_cifar(num_classes=10).eval()
    ref = mob(x)
    torch.testing.assert_close(to_channels_last(mob)(x), ref, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------- soundness on real batches

def _train(model, dls, epochs, seed):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        for xb, yb in dls.train:
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(); loss.backward(); opt.step()
    return model.eval()


def _real(source):
    from igdmfast.data import get_dls
    if source == 'digits':
        dls = get_dls('digits', bs=64, device='cpu', augment=False, seed=0)
        make = lambda: small_cnn(num_classes=10, in_chans=1, width=16)
        return dls, make, 4, ThreatModel(eps=0.1, step_size=0.01, n_steps=10)
    dls = get_dls(DATA/'cifar10_subset.npz', n_train=1500, n_valid=128, bs=64, device='cpu', augment=False, seed=0)
    return dls, (lambda: small_cnn(num_classes=10, width=16)), 3, ThreatModel(eps=2/255, step_size=0.5/255, n_steps=10)


@pytest.fixture(scope='module')
def trained_digits():
    "Two CNNs trained on the embedded digits (seconds on one thread), the loaders, and a threat that leaves work to do."
    dls, make, epochs, threat = _real('digits')
    return dls, _train(make(), dls, epochs, 0), _train(make(), dls, epochs, 1), threat


@pytest.mark.parametrize('source', ['digits', pytest.param('cifar10', marks=needs('cifar10_subset.npz'))])
def test_bf16_attack_as_strong_as_fp32_on_real_batches(source, request):
    """On two real validation batches of 64 with trained models: the bfloat16 attack from the same start as the fp32 one
    reaches the fp32 objective within 5% (PGD-CE, RSLAD's and AdaAD's inner maximization) and its success rate within
    3 points; the tolerance is the documented default (see `check_attack_precision`: above the spread of fp32 attacks
    from two different starts, printed here, and far below what an attack without gradients loses)."""
    if source == 'digits': dls, s, t, threat = request.getfixturevalue('trained_digits')
    else:
        dls, make, epochs, threat = _real(source)
        s, t = _train(make(), dls, epochs, 0), _train(make(), dls, epochs, 1)
    with torch.no_grad(): acc = sum((s(x).argmax(1) == y).sum().item() for x, y in dls.valid) / len(dls.valid.dataset)
    assert acc > 0.2, acc   # trained above chance (0.1): the attack has something to flip
    for i, (x, y) in zip(range(2), dls.valid):
        r = check_attack_precision(s, x, y, threat, 'ce', torch.bfloat16, seed=i)
        other_start = check_attack_precision(s, x, y, threat, 'ce', torch.bfloat16, seed=i + 10)
        print(source, 'ce', r, '| fp32 start-to-start:', f"{100 * (r.objective_fp32 - other_start.objective_fp32) / r.objective_fp32:+.2f}%")
        assert isinstance(r, PrecisionCheck) and r.ok, str(r)
        assert r.objective_shortfall <= 0.05 and r.success_shortfall <= 3.0 and 0 < r.success_fp32 < 100
        for method in ('rslad', 'adaad'):
            rm = check_method_precision(method, s, t, x, y, threat, torch.bfloat16, seed=i)
            print(source, method, rm)
            assert rm.ok and rm.objective_shortfall <= 0.05 and rm.success_fp32 is None, str(rm)
    r16 = check_attack_precision(s, x, y, threat, 'ce', torch.float16)
    assert r16.ok, str(r16)


def test_fallback_is_warned_and_taken_when_forced(trained_digits):
    dls, net, teacher, threat = trained_digits
    x, y = dls.valid.one_batch()
    # an impossible tolerance: the check fails, says so, and warns only when asked
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        quiet = check_attack_precision(net, x, y, threat, 'ce', torch.bfloat16, tol_objective=-1)
    assert not quiet.ok and quiet.fallback and quiet.use_dtype == torch.float32 and 'fall back to float32' in str(quiet)
    with pytest.warns(AttackPrecisionWarning, match='fall back to float32'):
        check_attack_precision(net, x, y, threat, 'ce', torch.bfloat16, tol_objective=-1, warn=True)
    # a broken reduced-precision path: a loss scale that underflows float16's backward leaves no gradient, the
    # attack stays at its start, and the default tolerance catches it
    with pytest.warns(AttackPrecisionWarning):
        broken = check_attack_precision(net, x, y, threat, 'ce', torch.float16, loss_scale=2.**-60, warn=True)
    print(broken)
    assert not broken.ok and broken.objective_shortfall > 0.3 and broken.use_dtype == torch.float32, str(broken)
    with pytest.warns(AttackPrecisionWarning):
        bm = check_method_precision('rslad', net, teacher, x, y, threat, torch.float16, loss_scale=2.**-60, warn=True)
    assert bm.fallback
    ok = check_attack_precision(net, x, y, threat, 'ce', torch.bfloat16)
    assert ok.ok and ok.use_dtype == torch.bfloat16
    with pytest.raises(ValueError, match='nothing to check'): check_attack_precision(net, x, y, threat, 'ce', None)


@pytest.mark.parametrize('method', ['pgd_at', 'trades', 'ard', 'iad', 'akd', 'rslad', 'adaad'])
def test_method_check_covers_every_method(method):
    s, t, x = _net(0), _net(1), _x(8)
    with torch.no_grad(): y = s(x).argmax(1)
    r = check_method_precision(method, s, t, x, y, ThreatModel(n_steps=2), 'bf16')
    assert isinstance(r, PrecisionCheck) and r.n == 8 and r.dtype == torch.bfloat16
    assert (r.success_fp32 is not None) == (get_method(method).inner.__name__ == 'inner_ce')


# --------------------------------------------------------------------------------- the GPU check on the CPU

def test_gpu_check_tiny_runs_on_the_cpu(tmp_path, capsys):
    sys.path.insert(0, str(BENCH))
    import gpu_check
    gpu_check.main(['--tiny', '--device', 'cpu', '--out', str(tmp_path)])
    md, js = tmp_path / 'gpu_check.md', tmp_path / 'gpu_check.json'
    assert md.is_file() and js.is_file()
    rep = json.loads(js.read_text())
    assert 'errors' not in rep, rep.get('errors')
    assert not [r for rows in rep['step'].values() for r in rows if 'error' in r]
    assert rep['machine']['cpu'] and 'cpu_native_bf16' in rep['machine'] and rep['config']['tiny']
    for method in ('rslad', 'adaad'):
        sides = {r['side'] for r in rep['step'][method]}
        assert {'reference', 'fp32', 'bf16 outer', 'channels-last'} <= sides and any('bf16 attack' in s for s in sides), sides
    assert all(r['ok'] in (True, False) for r in rep['check']) and len(rep['check']) >= 3
    assert {r['attack'].split()[0] for r in rep['eval']} == {'PGD-20', 'AutoAttack'}
    assert all(r['igdmfast acc %'] == r['direct acc %'] for r in rep['eval'])
    text = md.read_text()
    assert 'native bf16' in text and 'reference' in text and 'float32' in text


def test_bench_precision_runs(capsys, tmp_path):
    sys.path.insert(0, str(BENCH))
    import bench_precision
    rows = bench_precision.main(['--bs', '2', '--repeats', '1', '--models', 'tiny_mobilenet_cifar', '--fp16',
                                 '--json', str(tmp_path / 'p.json')])
    out = capsys.readouterr().out
    assert 'native bf16' in out and 'bf16 + channels-last' in out
    assert {r['side'] for r in rows} == {'fp32', 'bf16', 'channels-last', 'bf16 + channels-last', 'fp16'}
    assert json.loads((tmp_path / 'p.json').read_text())['cpu']
