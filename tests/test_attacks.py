"Attacks on a small model trained on real data (scikit-learn digits): our PGD against the reference AutoAttack code."
import time
import pytest, torch
from torch import nn
from sklearn.datasets import load_digits
from fastai.data.core import DataLoaders
from fastai.learner import Learner
import fastai.callback.schedule, fastai.callback.progress  # noqa: F401  (patch fit_one_cycle, no_bar onto Learner)
from igdmfast.core import seed_everything, ThreatModel
from igdmfast.attacks import pgd, fgsm, cw_linf, autoattack


@pytest.fixture(scope='module')
def digits_model():
    "A small CNN trained on 1,400 real handwritten digits (8x8), evaluated on the 397 others."
    seed_everything(0)
    d = load_digits()
    x = torch.tensor(d.images / 16., dtype=torch.float32)[:, None]
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x))
    x, y = x[perm], y[perm]
    dls = DataLoaders.from_dsets(list(zip(x[:1400], y[:1400])), list(zip(x[1400:], y[1400:])), bs=64, device='cpu')
    net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, 10))
    learn = Learner(dls, net, loss_func=nn.CrossEntropyLoss())
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(8, 3e-3)
    net.eval()
    return net, x[1400:], y[1400:]


def acc(net, x, y):
    with torch.no_grad(): return (net(x).argmax(1) == y).float().mean().item() * 100


def test_model_learned(digits_model):
    net, x, y = digits_model
    assert acc(net, x, y) > 95


@pytest.mark.parametrize('eps', [0.06, 0.12])
def test_pgd20_as_strong_as_apgd_ce(digits_model, eps):
    "PGD-20 lowers accuracy at least as much as the reference APGD-CE, to within 2 points."
    net, x, y = digits_model
    x_pgd = pgd(net, x, y, ThreatModel(eps=eps, step_size=eps / 4, n_steps=20), generator=torch.Generator().manual_seed(0))
    _, robust = autoattack(net, x, y, eps, version='custom', attacks=('apgd-ce',))
    acc_pgd, acc_apgd = acc(net, x_pgd, y), robust.float().mean().item() * 100
    print(f'eps={eps}: clean {acc(net, x, y):.2f}  PGD-20 {acc_pgd:.2f}  APGD-CE {acc_apgd:.2f}')
    assert acc_pgd < acc(net, x, y) - 5, 'the attack should do real damage at this eps'
    assert acc_pgd <= acc_apgd + 2


def test_attack_ordering(digits_model):
    "FGSM (one step) is weaker than PGD-20; every attack stays in the ball."
    net, x, y = digits_model
    eps = 0.1
    xs = {'fgsm': fgsm(net, x, y, eps), 'pgd': pgd(net, x, y, ThreatModel(eps=eps, step_size=eps / 4, n_steps=20)),
          'cw': cw_linf(net, x, y, ThreatModel(eps=eps, step_size=eps / 4, n_steps=30))}
    for xa in xs.values(): assert (xa - x).abs().max() <= eps + 1e-6
    assert acc(net, xs['pgd'], y) <= acc(net, xs['fgsm'], y)
    assert acc(net, xs['cw'], y) < acc(net, x, y)


def test_autoattack_standard_runs(digits_model):
    "The standard version (APGD-CE, APGD-T, FAB-T, Square) runs seeded, and is at least as strong as APGD-CE alone."
    net, x, y = digits_model
    x, y = x[:24], y[:24]
    t = time.time()
    xa, robust = autoattack(net, x, y, 0.1, version='standard')
    xb, robust_b = autoattack(net, x, y, 0.1, version='standard')
    print(f'standard AA on 24 digits: {time.time() - t:.1f} s for two runs')
    assert torch.equal(robust, robust_b) and torch.equal(xa, xb)
    _, robust_ce = autoattack(net, x, y, 0.1, version='custom', attacks=('apgd-ce',))
    assert robust.sum() <= robust_ce.sum()
    with torch.no_grad(): assert torch.equal(robust, net(xa).argmax(1) == y)
