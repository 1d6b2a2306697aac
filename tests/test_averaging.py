"""Keeping the best-robust epoch and averaging weights (`igdmfast.callback.averaging`), on CPU-tiny fits.

- `holdout_split`: stratified, seeded, disjoint from the training images left and from the validation images;
- `BestRobust`: its column is the robust accuracy an independent implementation (`RobustAccuracy`) measures, it
  changes nothing in the training, and a run whose best epoch is not the last ends with the best epoch's weights;
- `WeightAveraging`: SWA equals the float64 average of the end-of-epoch weights, EMA the float64 recursion over the
  optimizer steps, and the BatchNorm statistics recomputed at the end equal a hand computation;
- exact resume: an IGDM-ARD run with SWA, EMA and `BestRobust` stopped by a `KeyboardInterrupt` mid-epoch and resumed
  by a new learner ends with the same averages, best value, epoch and weights, and final model, bit for bit.
"""
import random

import numpy as np
import pytest
import torch
import timm
from torch import nn
from fastai.callback.core import Callback
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
import fastai.callback.schedule  # noqa: F401  (fit_one_cycle)

from igdmfast.core import ThreatModel, seed_everything
from igdmfast.data import get_dls, synth_dls
from igdmfast.evaluate import RobustAccuracy
from igdmfast.learner import distill_learner
from igdmfast.callback.checkpoint import Checkpoint, load_checkpoint
from igdmfast.callback.averaging import BestRobust, WeightAveraging, holdout_split, keep_cbs
import igdmfast.models  # noqa: F401  (registers small_cnn with timm)

THREAT = ThreatModel(eps=0.1, step_size=0.05, n_steps=2)


def rows(x): return [r.numpy().tobytes() for r in x.flatten(1)]


def plain(tdls, cbs=(), seed=0, model=None):
    "A plain fastai Learner on `tdls` (a small_cnn unless `model` is given)."
    seed_everything(seed)
    m = model() if model else timm.create_model('small_cnn', num_classes=10, in_chans=1, width=4)
    return Learner(tdls, m, loss_func=CrossEntropyLossFlat(), cbs=list(cbs))


def fit(learn, n=4, lr=1e-2, **kw):
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(n, lr, **kw)


class Snap(Callback):
    "Copies of the parameters after every epoch (`epochs`) and after every optimizer step (`steps`)."
    def before_fit(self): self.epochs, self.steps = [], []
    def after_step(self): self.steps.append([p.detach().double().clone() for p in self.model.parameters()])
    def after_epoch(self): self.epochs.append({k: v.clone() for k, v in self.model.state_dict().items()})


@pytest.fixture(scope='module')
def synth():
    dls = synth_dls(n_train=200, n_valid=40, bs=20, size=8, in_chans=1, device='cpu', seed=1)
    return holdout_split(dls, n=40, seed=0)


def test_holdout_split_is_stratified_seeded_and_disjoint():
    seed_everything(0)
    dls = get_dls('digits', n_train=320, n_valid=100, bs=32, device='cpu', augment=True)
    state, rng = random.getstate(), dls.train.rng.getstate()
    tdls, hold = holdout_split(dls, n=0.25, seed=3)
    assert random.getstate() == state and tdls.train.rng.getstate() == rng   # no draw from the run's generators
    y, yh = dls.train.dataset.y, hold.dataset.y
    assert len(yh) == 80 and len(tdls.train.dataset) == 240
    assert (torch.bincount(yh, minlength=10) - torch.bincount(y, minlength=10) * 0.25).abs().max() < 1   # stratified
    train, held, valid = rows(tdls.train.dataset.x), rows(hold.dataset.x), rows(dls.valid.dataset.x)
    assert not set(held) & set(train) and not set(held) & set(valid)                                 # disjoint
    assert sorted(held + train) == sorted(rows(dls.train.dataset.x))                                  # a split of train
    assert tdls.valid is dls.valid and tdls.train.augment is dls.train.augment and tdls.train.shuffle
    assert hold.augment is None and not hold.shuffle and hold.bs == dls.valid.bs
    assert rows(holdout_split(dls, n=0.25, seed=3)[1].dataset.x) == held                              # seeded
    assert rows(holdout_split(dls, n=0.25, seed=4)[1].dataset.x) != held
    with pytest.raises(ValueError, match='Cannot hold out 320 of 320'): holdout_split(dls, n=320)
    with pytest.raises(ValueError, match='fewer than the batch size'): holdout_split(dls, n=300)


def test_best_robust_column_selection_and_no_effect_on_training(synth, tmp_path):
    tdls, hold = synth
    threat = ThreatModel(eps=0.03, step_size=0.0075)
    rng = tdls.train.rng.getstate()   # the shuffling of both fits starts from the same state
    ref = plain(tdls); fit(ref, 3)
    tdls.train.rng.setstate(rng)
    learn = plain(tdls, [BestRobust(hold, threat=threat, load_best=False)]); fit(learn, 3)
    for k, v in ref.model.state_dict().items(): assert torch.equal(v, learn.model.state_dict()[k]), k   # measuring trains nothing
    col = learn.recorder.metric_names.index('holdout_pgd10_acc') - 1
    logged = learn.recorder.values[-1][col]
    learn.metrics = [RobustAccuracy(threat, n_steps=10)]   # an independent measurement of the same thing
    with learn.no_bar(): assert learn.validate(dl=hold)[1] == logged

    class Scripted(BestRobust):   # a robust accuracy that peaks before the end, as robust overfitting makes it
        def evaluate(self): return [0.2, 0.5, 0.3, 0.4][self.epoch]
    for load_best in (True, False):
        learn = plain(tdls, [br := Scripted(hold, load_best=load_best, fname='best'), snap := Snap()])
        learn.path = tmp_path
        fit(learn)
        assert [v[col] for v in learn.recorder.values] == [0.2, 0.5, 0.3, 0.4]
        assert (br.best, br.best_epoch) == (0.5, 1)
        kept = snap.epochs[1 if load_best else 3]
        assert all(torch.equal(v, kept[k]) for k, v in learn.model.state_dict().items())
        assert all(torch.equal(v, snap.epochs[1][k]) for k, v in torch.load(br.path, weights_only=True).items())
    assert not any(m is br.metric for m in learn.metrics)   # the column lasts the fit


def test_swa_is_the_average_of_the_epoch_weights(synth):
    tdls, _ = synth
    learn = plain(tdls, [WeightAveraging('swa', start=1, bn_on=None), snap := Snap()])
    fit(learn)
    assert learn.swa.n_averaged == 3
    names = [k for k, _ in learn.model.named_parameters()]
    for k in names:
        want = torch.stack([e[k].double() for e in snap.epochs[1:]]).mean(0)
        torch.testing.assert_close(learn.model.state_dict()[k].double(), want, rtol=1e-6, atol=1e-7)
    for k, v in learn.model.state_dict().items():   # bn_on=None: the last epoch's BatchNorm statistics are kept
        if k not in names: assert torch.equal(v, snap.epochs[-1][k]), k


def test_ema_is_the_step_recursion(synth):
    tdls, _ = synth
    d = 0.8
    learn = plain(tdls, [WeightAveraging('ema', start=1, ema_decay=d, bn_on=None, at_end=False), snap := Snap()])
    fit(learn, 3)
    steps = snap.steps[len(tdls.train):]   # epochs 1 and 2
    assert learn.ema.n_averaged == len(steps) == 2 * len(tdls.train)
    want = steps[0]
    for w in steps[1:]: want = [d * a + (1 - d) * p for a, p in zip(want, w)]
    for got, w in zip(learn.ema.averaged_state().values(), want): torch.testing.assert_close(got.double(), w, rtol=1e-5, atol=1e-6)
    for p, w in zip(learn.model.parameters(), snap.steps[-1]): assert torch.equal(p.double(), w)   # at_end=False: the last weights


def test_batchnorm_recomputed_at_the_end_equals_a_hand_computation(synth):
    tdls, _ = synth
    model = lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 10))
    learn = plain(tdls, [WeightAveraging('swa', start=2, bn_on='clean')], model=model)
    fit(learn)
    bn = learn.model[2]
    for p, a in zip(learn.model.parameters(), learn.swa.avg.module.parameters()): assert torch.equal(p, a)
    with torch.no_grad():   # the cumulative average over the training batches, in order, of each batch's mean and unbiased variance
        zs = [learn.model[:2](xb).double() for xb, _ in tdls.train.new(shuffle=False, drop_last=False)]
    assert len(zs) == len(tdls.train.dataset) // tdls.train.bs
    torch.testing.assert_close(bn.running_mean.double(), torch.stack([z.mean(0) for z in zs]).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), torch.stack([z.var(0) for z in zs]).mean(0), rtol=1e-5, atol=1e-6)


# --- exact resume ---------------------------------------------------------------------------------------------------

def build(out, seed=0, cbs=None):
    "An IGDM-ARD run on the digits (augmented) with a hold-out, SWA, EMA and BestRobust; student and loader rngs from `seed`."
    torch.set_num_threads(1)
    torch.manual_seed(1234)
    teacher = timm.create_model('small_cnn', num_classes=10, in_chans=1, width=8).requires_grad_(False).eval()
    seed_everything(seed)
    dls, hold = holdout_split(get_dls('digits', n_train=320, n_valid=64, bs=64, device='cpu', augment=True, path=out), n=40)
    student = timm.create_model('small_cnn', num_classes=10, in_chans=1, width=8)
    if cbs is None: cbs = [WeightAveraging('swa', start=1, at_end=False), WeightAveraging('ema', ema_decay=0.9, bn_on='adv'),
                           BestRobust(hold, load_best=False)]
    return distill_learner(teacher, student, dls, method='ard', igdm=True, threat=THREAT, check_teacher=False,
                           cbs=[Checkpoint('ckpt.pt')] + cbs)


class CtrlC(Callback):
    def before_batch(self):
        if (self.epoch, self.iter) == (2, 1): raise KeyboardInterrupt


def outcome(learn):
    return dict(model=learn.model.state_dict(), swa=learn.swa.avg.state_dict(), ema=learn.ema.avg.state_dict(),
                best=(learn.best_robust.best, learn.best_robust.best_epoch), best_state=learn.best_robust.best_state,
                values=[list(v) for v in learn.recorder.values])


def assert_same(a, b):
    for key in ('model', 'swa', 'ema', 'best_state'):
        assert a[key].keys() == b[key].keys()
        diff = [k for k in a[key] if not torch.equal(a[key][k], b[key][k])]
        assert not diff, f"{key}: tensors that differ from the uninterrupted run: {diff}"
    assert a['best'] == b['best'] and a['values'] == b['values']


def test_swa_ema_and_best_resume_bit_for_bit(tmp_path):
    ref = build(tmp_path/'full'); fit(ref)
    ref = outcome(ref)
    assert ref['swa']['n_averaged'] == 3 and ref['ema']['n_averaged'] == 4 * 4
    learn = build(tmp_path/'cut', cbs=None)
    learn.add_cb(CtrlC())
    with pytest.raises(KeyboardInterrupt): fit(learn)
    ck = load_checkpoint(tmp_path/'cut'/'ckpt.pt')   # epochs 0 and 1, with the averages and the best of that moment
    assert ck['next_epoch'] == 2 and ck['callbacks']['swa']['avg']['n_averaged'] == 1 and ck['callbacks']['best_robust']['best_epoch'] in (0, 1)
    learn = build(tmp_path/'cut', seed=7)
    assert learn.resume_from() == 2
    fit(learn)
    assert_same(ref, outcome(learn))
    learn = build(tmp_path/'cut', seed=9)   # resuming the finished run trains nothing and ends the same
    learn.resume_from(); fit(learn)
    assert_same(ref, outcome(learn))
    learn = build(tmp_path/'cut', seed=9, cbs=[BestRobust(learn.best_robust.dl)])   # without the averages: refused
    learn.resume_from()
    with pytest.raises(ValueError, match="callback 'ema' that this fit does not have"): fit(learn)


def test_choices_and_bad_arguments(synth):
    tdls, hold = synth
    assert keep_cbs('last') == [] and [type(c) for c in keep_cbs('best', hold)] == [BestRobust]
    cbs = keep_cbs('swa', hold, start=0.5, bn_on='clean')
    assert [type(c) for c in cbs] == [BestRobust, WeightAveraging] and not cbs[0].load_best and cbs[1].start == 0.5
    with pytest.raises(ValueError, match='needs held-out images'): keep_cbs('best')
    with pytest.raises(ValueError, match="keep must be one of"): keep_cbs('average')
    with pytest.raises(ValueError, match="kind must be one of"): WeightAveraging('mean')
    with pytest.raises(ValueError, match='fraction of the fit'): WeightAveraging(start=1.5)
    with pytest.raises(ValueError, match='ema_decay'): WeightAveraging('ema', ema_decay=1)
    with pytest.raises(ValueError, match="pass bn_on='clean'"): fit(plain(tdls, [WeightAveraging('swa')]), 1)
    with pytest.raises(ValueError, match='nothing would be averaged'): fit(plain(tdls, [WeightAveraging('swa', start=2, bn_on=None)]), 2)
