"Evaluation against the reference code and on real CIFAR-10 images: the protocol's anchors (issue: robustness evaluation)."
from pathlib import Path
import numpy as np
import pytest, torch, timm
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
import fastai.callback.schedule, fastai.callback.progress  # noqa: F401
from igdmfast.core import seed_everything, ThreatModel
from igdmfast.data import get_dls
from igdmfast.learner import adv_learner
from igdmfast.evaluate import robust_eval
import igdmfast.models  # noqa: F401

CIFAR = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'cifar10_subset.npz'


def test_autoattack_equals_direct_pyautoattack_call():
    "robust_eval's AA column is exactly what pyautoattack returns for the same model, samples and seed."
    from pyautoattack import AutoAttack
    seed_everything(0)
    dls = get_dls('digits', bs=64, device='cpu')
    net = timm.create_model('small_cnn', num_classes=10, in_chans=1, width=8)
    learn = Learner(dls, net, loss_func=CrossEntropyLossFlat())
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 3e-3)
    net.eval()
    x, y = dls.valid.dataset.x[:32].float() / (255 if not dls.valid.dataset.x.is_floating_point() else 1), dls.valid.dataset.y[:32]
    res = robust_eval(net, (x, y), attacks=('aa',), threat=ThreatModel(eps=0.1, step_size=0.025), bs=32,
                      aa_version='custom', aa_attacks=('apgd-ce',), seed=3, progress=False, warn=False)
    aa = AutoAttack(net, attacks=['apgd-ce'], version='custom', eps=0.1, norm='Linf', seed=3, device='cpu')
    _, y_adv = aa.run_standard_evaluation(x, y, batch_size=32)
    direct = (y_adv == y).numpy()
    np.testing.assert_array_equal(np.asarray(res.per_sample['aa']).astype(bool), direct)
    assert res['aa'] == pytest.approx(100 * direct.mean())


def test_empty_data_is_refused():
    net = timm.create_model('small_cnn', num_classes=10, in_chans=1, width=8)
    with pytest.raises(ValueError, match='no samples|empty'):
        robust_eval(net, (torch.rand(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), attacks=('clean',), progress=False)


@pytest.mark.skipif(not CIFAR.exists(), reason='../shared/data/cifar10_subset.npz is not here')
def test_natural_breaks_at_8_255_pgd_at_keeps_a_margin():
    "On real CIFAR-10 images, PGD-20 at 8/255 drives a naturally trained model near 0; a PGD-AT model keeps a margin."
    seed_everything(0)
    dls = get_dls(str(CIFAR), bs=128, n_train=2000, n_valid=300, device='cpu')
    natural = Learner(dls, timm.create_model('small_cnn', num_classes=10, in_chans=3), loss_func=CrossEntropyLossFlat())
    with natural.no_bar(), natural.no_logging(): natural.fit_one_cycle(6, 3e-3)
    seed_everything(0)
    robust = adv_learner(timm.create_model('small_cnn', num_classes=10, in_chans=3), dls,
                         threat=ThreatModel(eps=8/255, step_size=2/255, n_steps=5))
    with robust.no_bar(), robust.no_logging(): robust.fit_one_cycle(6, 3e-3)
    kw = dict(attacks=('clean', 'pgd20'), progress=False, warn=False)
    nat, rob = robust_eval(natural.model, dls, **kw), robust_eval(robust.model, dls, **kw)
    print(f'natural: {dict(nat)}  PGD-AT: {dict(rob)}')
    assert nat['clean'] > 25 and nat['pgd20'] < 5
    assert rob['pgd20'] > nat['pgd20'] + 10
