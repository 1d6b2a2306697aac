"""AutoSpeed: the measured layout and attack precision recorded and reused on resume (bit for bit), explicit values that skip
the probe, an unsound reduced precision never chosen, and the cache keyed by the models and torch's version."""
import json
import pytest
import torch
import timm
import igdmfast.models  # noqa: F401
from fastai.callback.core import Callback, CancelFitException
from igdmfast.core import ThreatModel, seed_everything
from igdmfast.data import get_dls
from igdmfast.learner import distill_learner
from igdmfast.callback.checkpoint import Checkpoint
from igdmfast.callback import speed
from igdmfast.precision import PrecisionCheck
from igdmfast.runs import learner_kwargs, speed_kwargs, record_speed, recorded_speed

THREAT = ThreatModel(eps=0.1, step_size=0.025, n_steps=3)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv('IGDMFAST_CACHE', str(tmp_path/'cache'))
    return tmp_path/'cache'


class StopAfter(Callback):
    "Stop the fit after epoch `n` was checkpointed (a run killed between epochs)."
    order = Checkpoint.order + 1
    def __init__(self, n): self.n = n
    def after_epoch(self):
        if self.epoch == self.n: raise CancelFitException()


def build(out=None, student='tiny_mobilenet_cifar', cbs=(), bs=16, n_train=400, **kw):
    "A seeded RSLAD+IGDM learner on 400 digits, batch 16: 25 batches an epoch, so a 2-epoch fit (50) is probed."
    seed_everything(0)
    dls = get_dls('digits', bs=bs, n_train=n_train, n_valid=32, seed=0)
    t = timm.create_model('small_cnn', num_classes=10, in_chans=1)
    s = timm.create_model(student, num_classes=10, in_chans=1)
    kw = {'method': 'rslad', **kw}
    return distill_learner(t, s, dls, threat=THREAT, check_teacher=False, path=out or '.', cbs=list(cbs), **kw)


def fit(learn, epochs=2, start=0):
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, start_epoch=start)
    return {k: v.clone() for k, v in learn.model.state_dict().items()}


def same(a, b): return all(torch.equal(a[k], b[k]) for k in a)


def run_folder(tmp_path, name):
    out = tmp_path/name
    out.mkdir()
    (out/'config.json').write_text(json.dumps(dict(command='train')))
    return out


def test_choice_recorded_and_reused_on_resume_bit_for_bit(tmp_path, monkeypatch):
    a = run_folder(tmp_path, 'a')
    learn = record_speed(build(a, cbs=[Checkpoint()], **speed_kwargs(learner_kwargs(None), a, 'student', False)), a, 'student')
    full = fit(learn)
    rec = learn.auto_speed.record
    assert rec['source'] == 'probe' and set(rec['step_s']) >= {'NCHW fp32', 'NHWC fp32'} and rec['probe_s'] > 0
    assert recorded_speed(a, 'student') == rec['choice'] and learn.nhwc == rec['choice']['channels_last']
    # the same run killed after its first epoch: its choice (from the cache now) is recorded before any checkpoint
    b = run_folder(tmp_path, 'b')
    learn = record_speed(build(b, cbs=[Checkpoint(), StopAfter(0)], **speed_kwargs(learner_kwargs(None), b, 'student', False)), b, 'student')
    fit(learn)
    assert learn.auto_speed.record['source'] == 'cache' and recorded_speed(b, 'student') == rec['choice']
    # the resume: no cache, and a probe would fail; the recorded choice is given explicitly
    speed.speed_cache_file().unlink()
    monkeypatch.setattr(speed.AutoSpeed, 'probe', lambda *a, **k: pytest.fail('a resumed run must not probe'))
    kw = speed_kwargs(learner_kwargs(None), b, 'student', True)
    assert {k: kw[k] for k in ('channels_last', 'attack_dtype')} == rec['choice']
    learn = build(b, cbs=[Checkpoint()], **kw)
    assert not hasattr(learn, 'auto_speed')
    assert same(fit(learn, start=learn.resume_from('checkpoint.pt')), full)


def test_probed_fit_equals_the_fit_pinned_to_its_choice():
    learn = build()
    probed = fit(learn)
    choice = learn.auto_speed.record['choice']
    assert same(probed, fit(build(**choice)))


def test_a_probed_mtard_fit_equals_the_pinned_fit_and_keeps_its_weights():
    "The probe's outer steps must not move MTARD's adaptive weights or record its first losses; its second teacher is probed too."
    def mtard(**kw):
        seed_everything(1)
        nat = timm.create_model('small_cnn', num_classes=10, in_chans=1)
        return build(method='mtard', nat_teacher=nat, igdm=False, **kw)
    learn = mtard()
    probed = fit(learn)
    assert [len(speed._models(learn)), len(speed._models(build()))] == [3, 2]   # student and both teachers; student and teacher
    choice = learn.auto_speed.record['choice']
    pinned = mtard(**choice)
    assert same(probed, fit(pinned))
    a, b = learn.adv_distill.state.state_dict(), pinned.adv_distill.state.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_explicit_values_skip_the_probe(monkeypatch):
    assert not hasattr(build(channels_last=False, attack_dtype='fp32'), 'auto_speed')
    timed = []
    real = speed._probe_step
    conv = lambda learn: next(p for m in speed._models(learn) for p in m.parameters() if p.ndim == 4 and p.shape[1] > 1 and p.shape[2] > 1)
    monkeypatch.setattr(speed, '_probe_step', lambda learn, adv, *a: timed.append((conv(learn).is_contiguous(), adv.dtype)) or real(learn, adv, *a))
    learn = build(channels_last=False)   # the layout given: only the precision is measured
    fit(learn)
    assert learn.auto_speed.record['choice']['channels_last'] is False and learn.nhwc is False
    assert timed and all(c for c, _ in timed)   # every probe step ran NCHW


def test_short_fits_keep_the_fixed_rule(monkeypatch):
    monkeypatch.setattr(speed.AutoSpeed, 'probe', lambda *a, **k: pytest.fail('a fit of fewer than min_steps batches must not probe'))
    learn = build()
    fit(learn, epochs=1)   # 25 batches < 50
    assert learn.auto_speed.record is None and learn.nhwc is False and learn.attack_dtype is None


@pytest.mark.parametrize('sound', [False, True])
def test_an_unsound_reduced_precision_is_never_chosen(monkeypatch, sound):
    "bf16 made the fastest candidate; the soundness check forced to fail: float32 is chosen (and bf16 when it passes)."
    calls = []
    def check(*a, **k):
        calls.append(a[-1])
        return PrecisionCheck(torch.bfloat16, 1.0, 1.0 if sound else 0.5, None, None, 0.05, 3.0, 0.5, 16)
    monkeypatch.setattr(speed, 'native_bf16', lambda *a, **k: True)
    monkeypatch.setattr(speed, 'check_method_precision', check)
    monkeypatch.setattr(speed, '_probe_step', lambda learn, adv, *a: (0., 0.01 if adv.dtype is not None else 1., 0.1))
    learn = build(channels_last=False)
    learn.auto_speed.cache = False
    monkeypatch.setattr(learn.adv_examples, '_check_precision', lambda *a: None)   # the batch's own check is not under test here
    fit(learn)
    rec = learn.auto_speed.record
    assert calls == [torch.bfloat16] and 'NCHW bf16' in rec['step_s']
    assert rec['choice']['attack_dtype'] == ('bf16' if sound else 'fp32')


def test_the_cache_is_reused_and_invalidated_by_another_model_or_torch(monkeypatch):
    learn = build(); fit(learn)
    assert learn.auto_speed.record['source'] == 'probe'
    learn = build(); fit(learn)
    assert learn.auto_speed.record['source'] == 'cache'
    learn = build(student='tiny_resnet_cifar'); fit(learn)   # another student: another key
    assert learn.auto_speed.record['source'] == 'probe'
    monkeypatch.setattr(torch, '__version__', '0.0.0-other')
    learn = build(); fit(learn)                                # another torch: another key
    assert learn.auto_speed.record['source'] == 'probe'


def test_a_run_from_before_autospeed_resumes_with_the_fixed_rule(tmp_path):
    "A config.json without 'channels_last' (written before this option existed): its resume keeps the fixed rule it ran with, no probe."
    old = tmp_path/'old'; old.mkdir()
    (old/'config.json').write_text(json.dumps(dict(command='train', device='cpu', attack_dtype='auto')))
    kw = speed_kwargs(learner_kwargs(None), old, 'student', True)
    assert kw['channels_last'] is False and kw['attack_dtype'] == 'fp32'
    assert speed_kwargs(learner_kwargs(None), old, 'student', False)['channels_last'] == 'auto'   # a new run measures


def test_a_compare_variant_records_its_choice_and_its_resume_reuses_it(tmp_path):
    "Each variant of `igdmfast compare` gets AutoSpeed's record in its own config.json; a variant killed mid-fit resumes with it (no probe)."
    import os, signal, subprocess, sys, time
    env = dict(os.environ, MPLBACKEND='Agg', IGDMFAST_CACHE=str(tmp_path/'cache'))
    out = tmp_path/'cmp'
    args = [sys.executable, '-m', 'igdmfast.cli', 'compare', '--methods', 'ard', '--epochs', '3', '--steps', '1', '--n-train', '400',
            '--n-valid', '32', '--bs', '16', '--n-aa', '0', '--n-curve', '0', '--device', 'cpu', '--out', str(out)]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    ckpt, deadline = out/'ard'/'checkpoint.pt', time.time() + 600
    while not ckpt.exists() and p.poll() is None and time.time() < deadline: time.sleep(0.02)
    p.send_signal(signal.SIGKILL); p.wait()
    assert ckpt.exists() and not (out/'ard'/'result.json').exists(), 'the first variant was not killed mid-fit'
    before = json.loads((out/'ard'/'config.json').read_text())['speed']['student']
    assert before['source'] == 'probe' and before['probe_s'] > 0 and set(before['choice']) == {'channels_last', 'attack_dtype'}
    for f in (tmp_path/'cache').iterdir(): f.unlink()   # no cached choice: a resume that probed again would record another
    r = subprocess.run(args + ['--resume'], capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = {v: json.loads((out/v/'config.json').read_text()) for v in ('ard', 'ard_igdm')}
    assert cfg['ard']['speed']['student'] == before   # the recorded choice and times, unchanged: the resume did not probe
    assert cfg['ard']['seconds_per_epoch'] is not None and cfg['ard']['alpha_used'] is None
    assert cfg['ard_igdm']['speed']['student']['choice'] and cfg['ard_igdm']['igdm'] is True
    assert len((out/'ard'/'history.csv').read_text().strip().splitlines()) == 1 + 3   # resumed to its 3 epochs, not restarted


@pytest.mark.parametrize('close, calls', [(False, 8), (True, 10)])
def test_the_last_round_is_skipped_when_one_candidate_is_left(monkeypatch, close, calls):
    "Four candidates: a warm-up and a timed round each; the second timed round only if two or more are within 15% of the best."
    seen = []
    def step(learn, adv, *a):
        w = next(p for m in speed._models(learn) for p in m.parameters() if p.ndim == 4 and p.shape[1] > 1 and p.shape[2] > 1)
        nhwc = not w.is_contiguous()   # a k×k convolution over several channels: its layout shows in its strides
        seen.append((nhwc, adv.dtype))
        t = {(True, torch.bfloat16): 1.0, (False, torch.bfloat16): 1.1 if close else 2.0}.get((nhwc, adv.dtype), 3.0)
        return 0., t, 0.
    monkeypatch.setattr(speed, 'native_bf16', lambda *a, **k: True)
    monkeypatch.setattr(speed, 'check_method_precision', lambda *a, **k: PrecisionCheck(torch.bfloat16, 1.0, 1.0, None, None, 0.05, 3.0, 0.5, 16))
    monkeypatch.setattr(speed, '_probe_step', step)
    learn = build()
    learn.auto_speed.cache = False
    monkeypatch.setattr(learn.adv_examples, '_check_precision', lambda *a: None)
    fit(learn)
    assert len(seen) == calls and len(set(seen)) == 4
    assert learn.auto_speed.record['choice'] == dict(channels_last=True, attack_dtype='bf16')
