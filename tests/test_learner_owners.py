"""One owner per setting (issue #27, item 2): the callbacks own the settings they run with, and `AdvLearner` reads them
through read-only properties; after a fallback of the attack's precision the learner says float32."""
import warnings
import pytest
import timm
import torch

import fastai.callback.progress  # noqa: F401 (no_bar)
from fastai.learner import load_learner
import igdmfast.precision as precision
from igdmfast.core import ThreatModel, seed_everything
from igdmfast.data import get_dls
from igdmfast.learner import AdvLearner, distill_learner, adv_learner
from igdmfast.precision import AttackPrecisionWarning, as_attack_dtype

THREAT = ThreatModel(eps=0.1, step_size=0.025, n_steps=2)
OWNED = dict(attack_dtype=('adv_examples', 'dtype'), threat=('adv_examples', 'threat'), fold_bn=('adv_examples', 'fold_bn'),
             igdm=('adv_distill', 'igdm'), igdm_bn=('adv_distill', 'igdm_bn'))


def _dls(): return get_dls('digits', n_train=64, n_valid=32, bs=32, device='cpu')
def _net(seed, width): torch.manual_seed(seed); return timm.create_model('small_cnn', num_classes=10, in_chans=1, width=width)

def _distill(**kw):
    seed_everything(0)
    return distill_learner(_net(1, 8), _net(2, 4), _dls(), method='adaad', threat=THREAT, check_teacher=False, **kw)

def _asks_the_callbacks(learn):
    for name, (cb, attr) in OWNED.items(): assert getattr(learn, name) == getattr(getattr(learn, cb), attr), name
    d = learn.adv_distill
    assert learn.alpha == (d.alpha if d.igdm else None)


def test_attack_dtype_tells_the_truth_after_a_forced_fallback(monkeypatch):
    real = precision.check_method_precision
    import igdmfast.callback.adversarial as adversarial   # the name the callback calls
    monkeypatch.setattr(adversarial, 'check_method_precision',
                        lambda *a, **k: real(*a, **{**k, 'tol_objective': -1.0, 'tol_success': -1.0}))
    learn = _distill(alpha=1., attack_dtype='bf16')
    assert learn.attack_dtype == torch.bfloat16 and learn.adv_examples.attack_dtype == torch.bfloat16   # asked for, before a fit
    with pytest.warns(AttackPrecisionWarning), learn.no_bar(), learn.no_logging(): learn.fit(1)
    assert learn.adv_examples.precision_check.fallback
    assert learn.attack_dtype is None and learn.adv_examples.dtype is None                       # float32 in use
    assert learn.adv_examples.attack_dtype == torch.bfloat16                                     # what was asked stays on record
    _asks_the_callbacks(learn)


@pytest.mark.parametrize('kw', [dict(alpha=2.5, igdm_bn='keep', fold_bn=False), dict(igdm=False)])
def test_the_properties_are_the_callbacks_values(kw):
    learn = _distill(**kw)
    assert isinstance(learn, AdvLearner)
    _asks_the_callbacks(learn)
    assert learn.threat is learn.adv_examples.threat and learn.threat == THREAT
    if kw.get('igdm', True): assert (learn.alpha, learn.igdm_bn, learn.fold_bn) == (2.5, 'keep', False)
    else: assert learn.alpha is None and learn.adv_distill.alpha == 0. and learn.igdm is False   # no IGDM: alpha None, as the files record it
    # the learner's own settings stay plain attributes
    assert (learn.method, learn.inner, learn.protocol, learn.bf16, learn.compile) == ('adaad', learn.inner, 'fastai', False, False)
    assert not ({'alpha', 'igdm', 'igdm_bn', 'threat', 'fold_bn', 'attack_dtype'} & set(vars(learn)))   # no copies


def test_adv_learner_asks_its_callbacks_too():
    torch.manual_seed(0)
    learn = adv_learner(_net(0, 4), _dls(), threat=THREAT, attack_dtype='bf16', fold_bn=False)
    _asks_the_callbacks(learn)
    assert (learn.attack_dtype, learn.threat, learn.fold_bn, learn.alpha, learn.igdm) == (torch.bfloat16, THREAT, False, None, False)


@pytest.mark.parametrize('name,owner', [('attack_dtype', 'adv_examples'), ('threat', 'adv_examples'), ('fold_bn', 'adv_examples'),
                                        ('igdm', 'adv_distill'), ('igdm_bn', 'adv_distill'), ('alpha', 'adv_distill')])
def test_assigning_a_setting_names_its_owner(name, owner):
    learn = _distill(alpha=1.)
    before = getattr(learn, name)
    with pytest.raises(AttributeError, match=rf"learn\.{name} is read-only: .* belongs to the {owner} callback \(learn\.{owner}\)"):
        setattr(learn, name, None)
    assert getattr(learn, name) == before


def test_the_properties_survive_export_and_load_learner(tmp_path):
    "`export` pickles the learner: the loaded one's properties read its unpickled callbacks (no teacher in them)."
    learn = _distill(alpha=1., attack_dtype='bf16', igdm_bn='keep', path=tmp_path)
    learn.export('export.pkl')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')   # fastai's warning about pickle
        back = load_learner(tmp_path/'export.pkl')
    assert (back.attack_dtype, back.threat, back.fold_bn, back.igdm, back.igdm_bn, back.alpha) == \
           (torch.bfloat16, THREAT, True, True, 'keep', 1.)
    assert back.adv_examples.teacher is None


def test_attack_dtype_is_normalised_by_one_function():
    assert as_attack_dtype('auto', 'cpu') is None and as_attack_dtype('BF16') == torch.bfloat16 and as_attack_dtype(torch.float32) is None
    assert as_attack_dtype(as_attack_dtype('fp16')) == torch.float16                               # idempotent
    with pytest.raises(ValueError, match='pass device='): as_attack_dtype('auto')
    with pytest.raises(ValueError, match='Unknown attack precision'): as_attack_dtype('int8')
    learn = _distill(igdm=False, attack_dtype='fp32')
    assert learn.attack_dtype is None and learn.adv_examples.attack_dtype is None
