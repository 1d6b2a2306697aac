"""igdmfast composes with fastai: training loops, schedulers, mixed precision, callbacks, export, and the card's one-liner.

Everything runs on the embedded scikit-learn digits (1x8x8, 10 classes) on the CPU with tiny `small_cnn`s and a
cheap threat model, so the whole file takes seconds. Torch is pinned to one thread for the module: on a small,
shared CPU, two OpenMP threads contending with other jobs were measured 10-20x slower than one.
"""
import os
os.environ.setdefault('MPLBACKEND', 'Agg')
import math
import time
import warnings

import matplotlib
matplotlib.use('Agg')
import pandas as pd
import pytest
import torch
from torch import nn

from fastai.callback.core import Callback, CancelFitException
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.progress import CSVLogger, ShowGraphCallback
from fastai.callback.tracker import SaveModelCallback
from fastai.callback.training import GradientAccumulation
from fastai.learner import load_learner
from fastai.losses import CrossEntropyLossFlat

from igdmfast.core import ThreatModel, seed_everything
from igdmfast.data import get_dls
from igdmfast.learner import AdvLearner, BF16, adv_learner, distill_learner
from igdmfast.methods import METHODS
from igdmfast.models import load_teacher, small_cnn

THREAT = ThreatModel(eps=0.1, step_size=0.05, n_steps=2)


def _cnn(width=8, num_classes=10): return small_cnn(num_classes=num_classes, in_chans=1, width=width)


@pytest.fixture(scope='module')
def dls():
    seed_everything(0)
    return get_dls('digits', bs=128, device='cpu')


@pytest.fixture(scope='module')
def teacher(dls):
    "A frozen small_cnn after one epoch of PGD-AT (enough to give the teacher non-trivial outputs)."
    seed_everything(0)
    m = _cnn(8)
    learn = adv_learner(m, dls, threat=THREAT)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1)
    return m.eval().requires_grad_(False)


def _snapshot(m): return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _unchanged(m, snap):
    sd = m.state_dict()
    return sd.keys() == snap.keys() and all(torch.equal(sd[k], snap[k]) for k in sd)


@pytest.fixture
def make(dls, teacher, tmp_path):
    "Build a distill_learner on the digits with a fresh width-8 student; checks afterwards that the teacher is untouched."
    snap = _snapshot(teacher)
    def _make(**kwargs):
        kwargs = {'threat': THREAT, 'alpha': 1.0, 'check_teacher': False, 'path': tmp_path, **kwargs}
        seed_everything(0)
        return distill_learner(teacher, _cnn(8), dls, **kwargs)
    yield _make
    assert _unchanged(teacher, snap), "the teacher's parameters or buffers changed"
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training


def _ok(learn, n_epoch):
    "The fit ran `n_epoch` epochs, logged finite losses, and the teacher is not in the optimizer."
    assert learn.n_epoch == n_epoch
    assert len(learn.recorder.values) == n_epoch
    for row in learn.recorder.values: assert all(math.isfinite(v) for v in row), row
    assert all(math.isfinite(float(l)) for l in learn.recorder.losses)
    teacher = learn.adv_distill.teacher
    opt_ids = {id(p) for pg in learn.opt.param_lists for p in pg}
    assert not opt_ids & {id(p) for p in teacher.parameters()}
    assert opt_ids == {id(p) for p in learn.model.parameters()}
    assert isinstance(learn.loss_func, CrossEntropyLossFlat), "the distillation loss was not restored after training"


# ----------------------------------------------------------------------------------------------- training loops

def test_fit(make):
    learn = make()
    assert isinstance(learn, AdvLearner)
    learn.fit(1)
    _ok(learn, 1)


def test_fit_one_cycle(make):
    learn = make()
    learn.fit_one_cycle(1)
    _ok(learn, 1)


def test_fit_one_cycle_default_epochs(make):
    learn = make(alpha=3.0)
    learn.default_epochs = 1
    learn.fit_one_cycle()
    _ok(learn, 1)
    assert learn.recorder.metric_names[-2] == 'igdm_weight'
    assert learn.recorder.values[-1][-1] == pytest.approx(3.0)  # α·(e+1)/E with e=0, E=1


def test_fit_default_epochs_other_loops(make):
    learn = make()
    learn.default_epochs = 2
    learn.fit()
    _ok(learn, 2)


def test_fit_flat_cos(make):
    learn = make()
    learn.fit_flat_cos(1)
    _ok(learn, 1)


def test_lr_find(make):
    learn = make()
    before = _snapshot(learn.model)
    res = learn.lr_find(num_it=20, show_plot=False)
    assert math.isfinite(res.valley) and 1e-7 <= res.valley <= 10
    assert len(learn.recorder.lrs) > 1
    assert _unchanged(learn.model, before), "lr_find did not restore the student's weights"
    assert isinstance(learn.loss_func, CrossEntropyLossFlat)
    assert not list(learn.path.glob('**/_tmp.pth'))
    learn.fit(1)  # still trains normally afterwards
    _ok(learn, 1)


# ----------------------------------------------------------------------------------------------- mixed precision

class CPUMixedPrecision(MixedPrecision):
    "fastai's MixedPrecision with CPU autocast (fastai's own `to_bf16`/`to_fp16` autocast on 'cuda' only)."
    def before_fit(self):
        super().before_fit()
        dtype = torch.bfloat16 if self.amp_mode.value == 'bf16' else torch.float16
        self.autocast = torch.autocast('cpu', dtype=dtype)


class Probe(Callback):
    "Record the attack's output and the loss of every training batch (runs after MixedPrecision in each event)."
    order, run_valid = MixedPrecision.order + 1, False
    def before_fit(self): self.recs, self.losses, self.autocast = [], [], []
    def before_batch(self):
        self.recs.append((self.learn.adv_examples.x_nat.detach().clone(), self.xb[0].detach().clone()))
        self.autocast.append(torch.is_autocast_enabled('cpu'))
    def after_loss(self): self.losses.append(self.learn.loss.detach().float().item())


def _fit_probed(make, *, amp=None, cpu_autocast=False):
    dtypes = set()
    cbs = [Probe()] + ([CPUMixedPrecision(amp)] if cpu_autocast else [])
    learn = make(cbs=cbs)
    if amp and not cpu_autocast: learn = learn.to_bf16() if amp == 'bf16' else learn.to_fp16()
    learn.model.features[0].register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    with warnings.catch_warnings():
        # on a CPU-only machine fastai's autocast('cuda') and GradScaler('cuda') warn that they disable themselves
        warnings.filterwarnings('ignore', message='.*CUDA is not available.*')
        warnings.filterwarnings('ignore', message='.*device_type of .cuda.*')
        learn.fit(1)
    _ok(learn, 1)
    p = learn.probe
    assert len(p.recs) == len(learn.dls.train) and len(p.losses) == len(p.recs)
    for x, x_adv in p.recs:
        assert x_adv.dtype == torch.float32, "the attack should run (and return) in fp32"
        assert torch.isfinite(x_adv).all()
        assert (x_adv - x).abs().max().item() <= THREAT.eps + 1e-6, "x_adv left the eps ball"
        assert x_adv.min().item() >= 0 and x_adv.max().item() <= 1, "x_adv left [0,1]"
        assert (x_adv != x).any()
    assert all(math.isfinite(l) for l in p.losses)
    for k in ('base_loss', 'igdm_loss', 'igdm_weight'): assert math.isfinite(learn.adv_distill.epoch_mean(k))
    return learn, dtypes


@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
def test_fastai_mixed_precision(make, amp):
    "fastai's own `to_bf16()` / `to_fp16()` (on a CPU-only machine their CUDA autocast is a no-op)."
    learn, dtypes = _fit_probed(make, amp=amp)
    assert torch.float32 in dtypes  # the attack's forwards (and, on a CPU-only machine, every forward)


@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
def test_cpu_autocast_mixed_precision(make, amp):
    "The same callback with a real CPU autocast: the student runs in bf16/fp16, the attack stays in fp32 and in the ball."
    dtype = torch.bfloat16 if amp == 'bf16' else torch.float16
    try:
        learn, dtypes = _fit_probed(make, amp=amp, cpu_autocast=True)
    except RuntimeError as e:
        if amp == 'fp16' and ('Half' in str(e) or 'not implemented' in str(e)):
            pytest.skip(f"CPU fp16 autocast unsupported for an op in this torch build: {e}")
        raise
    assert dtype in dtypes, "the student's forward did not run under autocast"
    assert torch.float32 in dtypes, "the attack's forwards should be fp32 (they run before autocast is entered)"
    assert all(learn.probe.autocast), "autocast was not active after MixedPrecision.before_batch"


# ----------------------------------------------------------------------------------------------- speed options

class FirstStep(Callback):
    "Record the first training step (x′, loss, whether autocast was on in the outer pass), then stop the fit."
    order, run_valid = MixedPrecision.order + 1, False
    def __init__(self): self.x_adv = self.first_loss = None
    def before_batch(self): self.x_adv, self.autocast = self.xb[0].detach().clone(), torch.is_autocast_enabled('cpu')
    def after_loss(self): self.first_loss = self.learn.loss.detach().float().item()
    def after_batch(self): raise CancelFitException()


def _first_step(learn):
    learn.fit(1, cbs=(p := FirstStep()))
    return p


def _fresh(teacher, factory='distill', **kw):
    "A learner on freshly built (seeded) digits, so that two of them see the same first batch."
    seed_everything(0)
    d = get_dls('digits', bs=128, device='cpu')
    if factory == 'adv': return adv_learner(_cnn(8), d, threat=THREAT, **kw)
    return distill_learner(teacher, _cnn(8), d, threat=THREAT, alpha=1.0, check_teacher=False, **kw)


@pytest.mark.parametrize('factory', ['distill', 'adv'])
def test_bf16_option(teacher, factory):
    "`bf16=True`: the outer pass under CPU bf16 autocast, the attack in fp32 (the same x′), the loss close to fp32's."
    def build(**kw): return _fresh(teacher, factory, **({'method': 'rslad'} if factory == 'distill' else {}), **kw)
    f32, b16 = _first_step(build()), _first_step(learn := build(bf16=True))
    assert learn.bf16 and any(isinstance(cb, BF16) for cb in learn.cbs)
    assert b16.autocast and not f32.autocast
    assert torch.equal(b16.x_adv, f32.x_adv)
    assert b16.first_loss == pytest.approx(f32.first_loss, rel=0.05)
    learn.to_fp32()   # fastai's own switch removes it
    assert not any(isinstance(cb, MixedPrecision) for cb in learn.cbs)


@pytest.mark.slow
def test_compile_option(teacher):
    "`compile=True`: the student compiled in place (same module, same state-dict keys), the step's loss as eager's."
    eager = _first_step(_fresh(teacher, method='adaad'))
    learn = _fresh(teacher, method='adaad', compile=True)
    student = learn.model
    keys = list(student.state_dict())
    comp = _first_step(learn)
    assert learn.model is student and list(student.state_dict()) == keys and learn.compile
    assert comp.first_loss == pytest.approx(eager.first_loss, rel=1e-2)


# ----------------------------------------------------------------------------------------------- callbacks

class StepCount(Callback):
    order = 99
    def before_fit(self): self.steps = self.batches = 0
    def after_step(self): self.steps += 1
    def after_batch(self):
        if self.training: self.batches += 1


def test_gradient_accumulation(make):
    learn = make(cbs=[GradientAccumulation(n_acc=256), StepCount()])
    assert learn.dls.train.bs == 128
    learn.fit(1)
    _ok(learn, 1)
    n = learn.step_count.batches
    assert n == len(learn.dls.train)
    assert learn.step_count.steps == n // 2, "with n_acc=2*bs the optimizer should step every second batch"


@pytest.mark.parametrize('with_opt', [False, True])
def test_save_model_callback(make, with_opt):
    learn = make(cbs=[SaveModelCallback(fname='best', with_opt=with_opt)])
    learn.fit(2)
    _ok(learn, 2)
    f = learn.path/learn.model_dir/'best.pth'
    assert f.is_file()
    student_keys = set(learn.model.state_dict())
    # loadable by fastai ...
    fresh = make()
    fresh.load('best', with_opt=with_opt)
    assert _unchanged(fresh.model, _snapshot(learn.model))  # SaveModelCallback reloaded the best model at the end
    # ... and by igdmfast's safe loader (weights_only), holding the student alone
    m = load_teacher(f, arch='small_cnn', width=8)
    assert set(m.state_dict()) == student_keys
    assert _unchanged(m, _snapshot(learn.model))
    raw = torch.load(f, map_location='cpu', weights_only=False)
    assert set(raw['model'] if with_opt else raw) == student_keys


class LossMeans(Callback):
    "Per-epoch mean of the training loss actually optimized."
    def before_fit(self): self.means = []
    def before_train(self): self.acc = []
    def after_loss(self):
        if self.training: self.acc.append(self.learn.loss.detach().float().item())
    def after_train(self): self.means.append(sum(self.acc) / len(self.acc))


def test_csv_logger_loss_components(make):
    alpha, E = 2.0, 3
    learn = make(alpha=alpha, cbs=[CSVLogger(fname='history.csv'), LossMeans()])
    learn.fit_one_cycle(E)
    _ok(learn, E)
    df = pd.read_csv(learn.path/'history.csv')
    assert len(df) == E
    for col in ('base_loss', 'igdm_loss', 'igdm_weight', 'train_loss', 'valid_loss', 'accuracy'): assert col in df.columns
    assert df['igdm_weight'].tolist() == pytest.approx([alpha * (e + 1) / E for e in range(E)])
    assert (df['base_loss'] > 0).all() and (df['igdm_loss'] >= 0).all()
    assert df[['base_loss', 'igdm_loss']].notna().all().all()
    # the components are epoch means of the terms of the optimized loss: mean(loss) = mean(base) + w·mean(igdm)
    assert (df['base_loss'] + df['igdm_weight'] * df['igdm_loss']).tolist() == pytest.approx(learn.loss_means.means, rel=1e-4)


def test_csv_logger_without_igdm(make):
    learn = make(igdm=False, alpha=None, cbs=[CSVLogger()])
    learn.fit(1)
    df = pd.read_csv(learn.path/'history.csv')
    assert 'base_loss' in df.columns and 'igdm_loss' not in df.columns and 'igdm_weight' not in df.columns


def test_show_graph_callback(make):
    import matplotlib.pyplot as plt
    learn = make(cbs=[ShowGraphCallback()])
    learn.fit(2)
    _ok(learn, 2)
    assert learn.show_graph.nb_batches == [len(learn.dls.train), 2 * len(learn.dls.train)]
    plt.close('all')


# ----------------------------------------------------------------------------------------------- export

@pytest.fixture
def exported(make, dls):
    "A trained learner, its validation predictions, and the path of its `export()`."
    learn = make()
    learn.fit(1)
    preds, targs = learn.get_preds(dl=dls.valid)
    learn.export('export.pkl')
    f = learn.path/'export.pkl'
    assert f.is_file()
    return learn, preds, targs, f


def _load(f):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # fastai's warning about pickle
        return load_learner(f)


def test_export_and_load_learner(exported, dls, teacher):
    learn, preds, targs, f = exported
    l2 = _load(f)
    # the teacher is never pickled
    assert l2.adv_examples.teacher is None and l2.adv_distill.teacher is None
    assert not any(isinstance(v, nn.Module) for cb in l2.cbs for k, v in vars(cb).items() if k != 'learn'), \
        "a callback of the exported learner still holds a module"
    assert [v for v in vars(l2).values() if isinstance(v, nn.Module)] == [l2.model]
    # the loaded student infers exactly like the trained one
    x = dls.valid.one_batch()[0]
    l2.model.eval(); learn.model.eval()
    with torch.no_grad(): assert torch.equal(l2.model(x), learn.model(x))
    # the live learner still trains after export (its teacher was not lost)
    assert learn.adv_distill.teacher is teacher
    learn.fit(1)
    _ok(learn, 1)


def test_load_learner_get_preds(exported, dls):
    "fastai's inference API on the loaded learner (its callbacks come back without a teacher)."
    learn, preds, targs, f = exported
    l2 = _load(f)
    p2, t2 = l2.get_preds(dl=dls.valid)
    assert torch.equal(t2, targs) and torch.allclose(p2, preds, atol=1e-6)
    assert l2.adv_examples.teacher is None and l2.adv_distill.teacher is None
    l2.validate(dl=dls.valid)   # a second call works too


def test_export_excludes_a_big_teacher(dls, tmp_path):
    "With a ~4 MB teacher the exported file stays well below the teacher's weights (its ~0.5 MB is fastai's pickle)."
    seed_everything(0)
    big = _cnn(128).eval().requires_grad_(False)
    learn = distill_learner(big, _cnn(8), dls, method='ard', threat=THREAT, alpha=1.0, check_teacher=False, path=tmp_path)
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    learn.export()
    teacher_bytes = sum(t.numel() * t.element_size() for t in big.state_dict().values())
    assert teacher_bytes > 4e6
    assert (tmp_path/'export.pkl').stat().st_size < teacher_bytes / 4


def test_export_student(make, dls):
    learn = make()
    learn.fit(1)
    p = learn.export_student()
    assert p.is_file() and p.parent == learn.path
    m = load_teacher(p)
    assert type(m) is type(learn.model) and not m.training and not any(q.requires_grad for q in m.parameters())
    assert _unchanged(m, _snapshot(learn.model))
    x = dls.valid.one_batch()[0]
    learn.model.eval()
    with torch.no_grad(): assert torch.equal(m(x), learn.model(x))


# ----------------------------------------------------------------------------------------------- the card's one-liner

def test_card_one_liner_runs_as_written(tmp_path, monkeypatch, capsys):
    "`learn = distill_learner(teacher, student, igdm=True); learn.fit_one_cycle()`: default data, method, alpha, threat and 10 epochs."
    monkeypatch.chdir(tmp_path)
    seed_everything(0)
    teacher, student = small_cnn(num_classes=10, in_chans=1, width=4), small_cnn(num_classes=10, in_chans=1, width=4)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # an untrained, unfrozen teacher: igdmfast warns (and freezes it)
        learn = distill_learner(teacher, student, igdm=True); learn.fit_one_cycle()
    dt = time.perf_counter() - t0
    out = capsys.readouterr().out
    with capsys.disabled(): print(f"\n[card one-liner] 10 epochs of adaad+IGDM on digits, width-4 small_cnn pair: {dt:.1f}s")
    assert 'No DataLoaders given' in out and 'IGDM alpha' in out
    assert learn.model is student and learn.method == 'adaad' and learn.igdm
    assert learn.n_epoch == learn.default_epochs == 10
    assert len(learn.recorder.values) == 10
    w = [row[learn.recorder.metric_names.index('igdm_weight') - 1] for row in learn.recorder.values]
    assert w == pytest.approx([learn.alpha * (e + 1) / 10 for e in range(10)])
    assert all(math.isfinite(v) for row in learn.recorder.values for v in row)


# ----------------------------------------------------------------------------------------------- refusals

def test_refuses_teacher_student_class_mismatch(dls):
    with pytest.raises(ValueError) as e:
        distill_learner(_cnn(8, num_classes=5).requires_grad_(False), _cnn(8), dls, threat=THREAT, alpha=1.0, check_teacher=False)
    msg = str(e.value)
    assert 'teacher' in msg and 'student' in msg and '5' in msg and '10' in msg


def test_refuses_student_data_class_mismatch(dls):
    with pytest.raises(ValueError) as e:
        distill_learner(_cnn(8).requires_grad_(False), _cnn(8, num_classes=7), dls, threat=THREAT, alpha=1.0, check_teacher=False)
    msg = str(e.value)
    assert 'student' in msg and 'data' in msg and '7' in msg and '10' in msg and 'digits' in msg


def test_refuses_input_shape_mismatch(dls):
    with pytest.raises(ValueError) as e:
        distill_learner(_cnn(8).requires_grad_(False), small_cnn(num_classes=10, in_chans=3, width=8), dls,
                        threat=THREAT, alpha=1.0, check_teacher=False)
    msg = str(e.value)
    assert 'student' in msg and '(1, 8, 8)' in msg


def test_refuses_unknown_method(dls):
    with pytest.raises(ValueError) as e:
        distill_learner(_cnn(8).requires_grad_(False), _cnn(8), dls, method='ardd', threat=THREAT, alpha=1.0, check_teacher=False)
    msg = str(e.value)
    assert "'ardd'" in msg
    for name in METHODS: assert name in msg
    assert {'pgd_at', 'trades', 'ard', 'iad', 'akd', 'rslad', 'adaad'} <= set(METHODS)


@pytest.mark.parametrize('alpha', [-1.0, -1e-3, float('nan')])
def test_refuses_bad_alpha(dls, alpha):
    with pytest.raises(ValueError, match='alpha'):
        distill_learner(_cnn(8).requires_grad_(False), _cnn(8), dls, alpha=alpha, threat=THREAT, check_teacher=False)


# ----------------------------------------------------------------------------------------------- reproducibility

def test_seeded_run_is_bit_reproducible():
    "Seed first, then build the DataLoaders (fastai draws each loader's shuffle seed when it is created)."
    def run():
        seed_everything(3)
        d = get_dls('digits', bs=128, device='cpu')
        t, s = _cnn(4).eval().requires_grad_(False), _cnn(4)
        learn = distill_learner(t, s, d, threat=THREAT, alpha=1.0, check_teacher=False)
        with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1)
        return s.state_dict()
    a, b = run(), run()
    assert all(torch.equal(a[k], b[k]) for k in a)
