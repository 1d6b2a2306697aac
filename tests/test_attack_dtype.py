"""The attack's precision option of the learners (issue #17) on real float32 data: the soundness check at a fit's first
batch, its fallback to float32 when forced, and that neither leaves a trace on the training (weights bit for bit).
The math of the option itself (float64: the same steps and forward passes as float32) is in test_distill_steps.py."""
import warnings
import pytest
import timm
import torch

import fastai.callback.progress  # noqa: F401 (no_bar)
import igdmfast.precision as precision
from igdmfast.core import ThreatModel, seed_everything
from igdmfast.data import get_dls
from igdmfast.learner import distill_learner, adv_learner
from igdmfast.callback.adversarial import AdvExamples
from igdmfast.precision import AttackPrecisionWarning

THREAT = ThreatModel(eps=0.1, step_size=0.025, n_steps=3)


def fit(attack_dtype, check=True, method='adaad'):
    "One epoch on 64 digits from seed 0; the final weights and the AdvExamples callback."
    seed_everything(0)
    dls = get_dls('digits', n_train=64, n_valid=32, bs=32, device='cpu')
    torch.manual_seed(1); teacher = timm.create_model('small_cnn', num_classes=10, in_chans=1, width=8)
    torch.manual_seed(2); student = timm.create_model('small_cnn', num_classes=10, in_chans=1, width=4)
    learn = distill_learner(teacher, student, dls, method=method, alpha=1., threat=THREAT, attack_dtype=attack_dtype, check_teacher=False)
    adv = next(cb for cb in learn.cbs if isinstance(cb, AdvExamples))
    adv.check_precision = check
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    return {k: v.clone() for k, v in learn.model.state_dict().items()}, adv


@pytest.mark.parametrize('method', ['adaad', 'rslad'])
def test_the_check_runs_at_the_first_batch_and_changes_nothing(method):
    checked, adv = fit('bf16', True, method)
    unchecked, adv0 = fit('bf16', False, method)
    assert adv0.precision_check is None and adv.precision_check is not None
    assert adv.precision_check.ok and adv.dtype == torch.bfloat16, str(adv.precision_check)
    assert all(torch.equal(checked[k], unchecked[k]) for k in checked)   # the check consumed no randomness, moved no BN


def test_a_failed_check_warns_and_falls_back_to_float32(monkeypatch):
    "Forced to fail (a tolerance no attack meets), the fit warns once and trains exactly as attack_dtype=None would."
    real = precision.check_method_precision
    import igdmfast.callback.adversarial as adversarial   # the name the callback calls
    monkeypatch.setattr(adversarial, 'check_method_precision',
                        lambda *a, **k: real(*a, **{**k, 'tol_objective': -1.0, 'tol_success': -1.0}))
    with pytest.warns(AttackPrecisionWarning) as w: fell, adv = fit('bf16')
    assert len([m for m in w if issubclass(m.category, AttackPrecisionWarning)]) == 1
    assert adv.precision_check.fallback and adv.dtype is None
    fp32, _ = fit(None)
    assert all(torch.equal(fell[k], fp32[k]) for k in fp32)


def test_auto_is_float32_on_a_cpu_and_bad_values_are_refused():
    dls = get_dls('digits', n_train=64, n_valid=32, bs=32, device='cpu')
    torch.manual_seed(0)
    m = lambda: timm.create_model('small_cnn', num_classes=10, in_chans=1, width=4)
    assert adv_learner(m(), dls, threat=THREAT).attack_dtype is None      # 'auto' without bf16
    assert adv_learner(m(), dls, threat=THREAT, attack_dtype='bf16').attack_dtype == torch.bfloat16
    with pytest.raises((ValueError, TypeError), match='bf16'): adv_learner(m(), dls, threat=THREAT, attack_dtype='int8')


def test_robust_eval_attack_dtype_is_float32_by_default_and_says_which():
    "Evaluation attacks run in float32 unless asked; a reduced-precision run says so per attack (float64: the same numbers)."
    from igdmfast.evaluate import robust_eval
    dls = get_dls('digits', n_train=64, n_valid=48, bs=16, device='cpu')
    torch.manual_seed(0); m = timm.create_model('small_cnn', num_classes=10, in_chans=1, width=4).double().eval()
    xy = [(x.double(), y) for x, y in dls.valid]
    kw = dict(attacks=('clean', 'fgsm', 'pgd5', 'cw'), threat=ThreatModel(eps=0.1, step_size=0.025), progress=False, warn=False)
    fp32, lowp = robust_eval(m, xy, **kw), robust_eval(m, xy, attack_dtype='bf16', **kw)
    assert dict(fp32) == dict(lowp)                                   # autocast leaves float64 alone: the same attack
    assert all('bfloat16' not in v for v in fp32.attacks.values())
    assert all('attack in bfloat16' in lowp.attacks[k] for k in ('fgsm', 'pgd5', 'cw')) and 'bfloat16' not in lowp.attacks['clean']


def test_cli_trains_with_a_bf16_attack_and_records_it(tmp_path, monkeypatch):
    import json
    from igdmfast.cli import main
    monkeypatch.chdir(tmp_path)
    out = tmp_path/'run'
    code = main(['teacher', '--epochs', '1', '--steps', '2', '--n-train', '64', '--n-valid', '32', '--bs', '32', '--n-aa', '0',
                 '--device', 'cpu', '--attack-dtype', 'bf16', '--out', str(out)])
    assert code == 0
    assert json.loads((out/'config.json').read_text())['attack_dtype'] == 'bf16'
    assert len((out/'teacher_history.csv').read_text().splitlines()) == 2


def test_channels_last_option_same_function_and_auto_off_on_a_cpu():
    "channels_last=True stores the weights NHWC and trains to the same weights (up to float32 kernel rounding); 'auto' is off on a CPU."
    out = {}
    for cl in (False, True):
        seed_everything(0)
        dls = get_dls('digits', n_train=64, n_valid=32, bs=32, device='cpu')
        torch.manual_seed(1); teacher = timm.create_model('small_cnn', num_classes=10, in_chans=1, width=8)
        torch.manual_seed(2); student = timm.create_model('small_cnn', num_classes=10, in_chans=1, width=4)
        learn = distill_learner(teacher, student, dls, method='ard', alpha=1., threat=THREAT, channels_last=cl, check_teacher=False)
        assert learn.nhwc is cl
        convs = [p for p in learn.model.parameters() if p.ndim == 4]
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs) == cl
        with learn.no_bar(), learn.no_logging(): learn.fit(1)
        out[cl] = {k: v.clone() for k, v in learn.model.state_dict().items()}
    assert all(torch.allclose(out[False][k].float(), out[True][k].float(), atol=1e-4) for k in out[False])
    dls = get_dls('digits', n_train=64, n_valid=32, bs=32, device='cpu')
    assert adv_learner(timm.create_model('small_cnn', num_classes=10, in_chans=1, width=4), dls, threat=THREAT).nhwc is False
