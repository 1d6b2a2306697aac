"""Nothing lost: `Checkpoint` + `resume` give the bit-identical result of an uninterrupted run, whatever kills it.

The run under test is the library's real one: `distill_learner(..., method='ard', igdm=True)` on the embedded digits
with random-crop/flip augmentation (so the loaders' own `rng` matters), `fit_one_cycle(4)`, a `Checkpoint` and a
`CSVLogger`. Its uninterrupted result is compared, tensor by tensor with `torch.equal` (BatchNorm buffers included),
and row by row in the recorder and the CSV, with runs that were

- SIGKILLed in the middle of epoch 2 in a subprocess, then resumed in a fresh subprocess (fresh seed, fresh objects);
- stopped by a `KeyboardInterrupt` mid-epoch, then resumed by a new learner in this process;
- SIGKILLed while `atomic_save` was writing the epoch-2 checkpoint (a `torch.save` that writes half the file and
  kills its own process), and killed at random moments of slowed-down checkpoint writes many times;
- stopped by `StopOnNaN` at a NaN training loss (epoch and batch named, the last good checkpoint kept);
- stopped by a full disk (ENOSPC) while writing the epoch-1 checkpoint (clear message, last good checkpoint intact).

This file is also the subprocesses' driver: `python tests/test_checkpoint.py MODE OUT`.
"""
import errno
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault('MPLBACKEND', 'Agg')
import pytest
import torch
import timm
from fastai.callback.core import Callback
from fastai.callback.progress import CSVLogger

from igdmfast.core import ThreatModel, seed_everything
from igdmfast.data import get_dls
from igdmfast.learner import distill_learner
from igdmfast.callback.checkpoint import Checkpoint, CheckpointError, NonFiniteError, StopOnNaN, load_checkpoint, resume
import igdmfast.models  # noqa: F401  (registers small_cnn with timm)

THREAT = ThreatModel(eps=0.1, step_size=0.05, n_steps=2)
N_EPOCH, CKPT, CSV = 4, 'ckpt.pt', 'history.csv'


def build(out, seed=0, cbs=(), **kwargs):
    "The run: a fixed random teacher, a student initialised from `seed`, loaders whose `rng` also comes from `seed`."
    torch.set_num_threads(1)   # the same thread count in every process: CPU reductions are then bit-reproducible
    torch.manual_seed(1234)
    teacher = timm.create_model('small_cnn', num_classes=10, in_chans=1, width=8).requires_grad_(False).eval()
    seed_everything(seed)
    dls = get_dls('digits', n_train=320, n_valid=100, bs=64, device='cpu', augment=True, path=out)
    student = timm.create_model('small_cnn', num_classes=10, in_chans=1, width=8)
    return distill_learner(teacher, student, dls, method='ard', igdm=True, threat=THREAT, check_teacher=False,
                           cbs=[Checkpoint(CKPT), CSVLogger(CSV)] + list(cbs), **kwargs)


def fit(learn, **kwargs):
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(N_EPOCH, **kwargs)


def result(learn):
    "What must not change: every parameter and buffer, the recorder's rows, per-batch lrs/momentums and the CSV."
    return dict(state={k: v.detach().clone() for k, v in learn.model.state_dict().items()},
                names=list(learn.recorder.metric_names), values=[list(v) for v in learn.recorder.values],
                lrs=[float(v) for v in learn.recorder.lrs], hps={k: [float(x) for x in v] for k, v in getattr(learn.recorder, 'hps', {}).items()},
                losses=[float(v) for v in learn.recorder.losses], iters=list(learn.recorder.iters),
                csv=(Path(learn.path)/CSV).read_text())


def assert_same_run(a, b):
    assert a['state'].keys() == b['state'].keys()
    diff = [k for k in a['state'] if not torch.equal(a['state'][k], b['state'][k])]
    assert not diff, f"tensors that differ from the uninterrupted run: {diff}"
    assert a['names'] == b['names']
    assert a['values'] == b['values']           # every column of every epoch: losses, accuracy, base/IGDM loss, IGDM weight
    assert a['lrs'] == b['lrs'] and a['hps'] == b['hps']    # the one-cycle schedule, batch by batch
    assert a['losses'] == b['losses'] and a['iters'] == b['iters']
    rows = lambda csv: [r.split(',')[:-1] for r in csv.strip().splitlines()]   # all but the time column
    assert rows(a['csv']) == rows(b['csv'])


class KillAt(Callback):
    "SIGKILL this process (no cleanup of any kind) at batch `it` of epoch `epoch`."
    def __init__(self, epoch, it): self.at = (epoch, it)
    def before_batch(self):
        if (self.epoch, self.iter) == self.at: os.kill(os.getpid(), signal.SIGKILL)


class CtrlC(Callback):
    def __init__(self, epoch, it): self.at = (epoch, it)
    def before_batch(self):
        if (self.epoch, self.iter) == self.at: raise KeyboardInterrupt


def _kill_during_save(epoch, fraction=0.5):
    "Make `torch.save` of the checkpoint of `epoch` write `fraction` of its bytes, sync them, and SIGKILL the process."
    real = torch.save
    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get('format') == 'igdmfast.checkpoint' and obj['epoch'] == epoch:
            buf = io.BytesIO(); real(obj, buf, *args, **kwargs); data = buf.getvalue()
            f.write(data[:int(len(data)*fraction)]); f.flush(); os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return real(obj, f, *args, **kwargs)
    torch.save = save


def _slow_saves(delay=0.02, chunks=20):
    "Make every `torch.save` write its bytes in `chunks` pieces with a pause between them (a slow disk)."
    real = torch.save
    def save(obj, f, *args, **kwargs):
        buf = io.BytesIO(); real(obj, buf, *args, **kwargs); data = buf.getvalue()
        step = -(-len(data) // chunks)
        for i in range(0, len(data), step): f.write(data[i:i+step]); f.flush(); time.sleep(delay)
    torch.save = save


def _random_kills(out, n_trials):
    "Fork `n_trials` children that train with slow (1 s) checkpoint writes; SIGKILL each at a random moment; check the file."
    _slow_saves(delay=0.05, chunks=20)
    rng, report = random.Random(0), []
    for t in range(n_trials):
        d = Path(out)/f'trial{t}'
        d.mkdir(parents=True)
        pid = os.fork()
        if pid == 0:   # the child: train until killed
            try: fit(build(d))
            finally: os._exit(0)
        if t % 2:      # a random moment of the run
            time.sleep(rng.uniform(0.3, 5.0))
        else:          # a random moment of a write that replaces a checkpoint: wait for a temporary file beside one
            t0 = time.time()
            while not ((d/CKPT).exists() and list(d.glob(f'.{CKPT}.*.tmp'))) and time.time() - t0 < 60: time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.7))
        os.kill(pid, signal.SIGKILL); os.waitpid(pid, 0)
        f, tmps = d/CKPT, sorted(p.name for p in d.glob(f'.{CKPT}.*.tmp'))
        entry = dict(trial=t, exists=f.exists(), mid_write=bool(tmps))
        if f.exists():
            try: entry['next_epoch'] = load_checkpoint(f)['next_epoch']
            except Exception as e: entry['error'] = f'{type(e).__name__}: {e}'
        report.append(entry)
    return report


def main(mode, out):
    out = Path(out)
    if mode == 'full':
        learn = build(out); fit(learn); torch.save(result(learn), out/'result.pt')
    elif mode == 'kill':      # SIGKILL in the middle of epoch 2: epochs 0 and 1 are checkpointed
        fit(build(out, cbs=[KillAt(2, 2)]))
    elif mode == 'resume':    # a fresh process, other seeds: everything must come from the checkpoint
        learn = build(out, seed=999)
        start = learn.resume_from(CKPT)
        fit(learn, start_epoch=start)
        torch.save(dict(result(learn), start=start), out/'result.pt')
    elif mode == 'kill_write':
        _kill_during_save(epoch=2)
        fit(build(out))
    elif mode == 'random_kills':
        print(json.dumps(_random_kills(out, int(os.environ.get('N_TRIALS', '6')))))
    else: raise SystemExit(f'unknown mode {mode!r}')


def drive(mode, out, env=None, timeout=300):
    "Run this file's `main(mode, out)` in a new Python process."
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, __file__, mode, str(out)], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, MPLBACKEND='Agg', **(env or {})))


# ------------------------------------------------------------------------------------------------------------ tests

posix_only = pytest.mark.skipif(os.name != 'posix' or not hasattr(os, 'fork'), reason='needs SIGKILL and fork')

@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    "The reference: the whole fit in one go (in this process)."
    out = tmp_path_factory.mktemp('full')
    learn = build(out); fit(learn)
    return result(learn), out


def test_checkpoint_is_safe_and_complete(uninterrupted):
    ref, out = uninterrupted
    ck = torch.load(out/CKPT, map_location='cpu', weights_only=True)   # plain torch, safe loading
    assert ck['format'] == 'igdmfast.checkpoint' and ck['version'] == 1
    assert (ck['epoch'], ck['next_epoch'], ck['n_epoch']) == (N_EPOCH - 1, N_EPOCH, N_EPOCH)
    assert ck['model'].keys() == ref['state'].keys()        # the student only: no teacher weights anywhere
    assert all(torch.equal(ck['model'][k], v) for k, v in ref['state'].items())
    assert any(k.endswith('num_batches_tracked') for k in ck['model'])
    assert ck['opt']['kind'] == 'fastai' and len(ck['opt']['state']) == len(list(ck['model'])) - 3 * sum(
        k.endswith('num_batches_tracked') for k in ck['model'])    # one state per parameter (not per BN buffer)
    assert set(ck['rng']) == {'python', 'numpy', 'torch', 'cuda', 'loaders'} and len(ck['rng']['loaders']) == 2
    assert ck['fit']['n_iter'] == 5 and set(ck['fit']['scheds']) == {'lr', 'mom'}
    assert ck['learner']['method'] == 'ard' and ck['learner']['igdm'] is True
    assert [list(v) for v in ck['recorder']['values']] == ref['values'] and len(ck['times']) == N_EPOCH
    assert not list(out.glob(f'.{CKPT}.*.tmp'))
    # the IGDM weight ramps alpha*(e+1)/E over the real number of epochs
    w = [row[ref['names'].index('igdm_weight') - 1] for row in ref['values']]
    assert w == pytest.approx([ck['learner']['alpha'] * (e + 1) / N_EPOCH for e in range(N_EPOCH)])


@posix_only
def test_sigkill_mid_epoch_then_resume_in_new_process(uninterrupted, tmp_path):
    ref, _ = uninterrupted
    r = drive('kill', tmp_path)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert load_checkpoint(tmp_path/CKPT)['next_epoch'] == 2
    r = drive('resume', tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = torch.load(tmp_path/'result.pt', weights_only=True)
    assert res['start'] == 2
    assert_same_run(ref, res)


def test_ctrl_c_mid_epoch_keeps_last_epoch_and_resumes_exactly(uninterrupted, tmp_path):
    ref, _ = uninterrupted
    learn = build(tmp_path, cbs=[CtrlC(1, 3)])
    with pytest.raises(KeyboardInterrupt): fit(learn)
    ck = load_checkpoint(tmp_path/CKPT)
    assert ck['next_epoch'] == 1    # epoch 0 complete; the half of epoch 1 was not saved
    learn = build(tmp_path, seed=7)
    assert learn.resume_from(tmp_path/CKPT) == 1
    learn.validate()                # looking at the resumed model first changes nothing
    fit(learn)                      # without start_epoch: the resume skips the finished epoch itself
    assert_same_run(ref, result(learn))
    assert not hasattr(learn, 'resume_fit')   # the resume lasted one fit


@posix_only
def test_sigkill_during_checkpoint_write_keeps_last_good_one(uninterrupted, tmp_path):
    ref, _ = uninterrupted
    r = drive('kill_write', tmp_path)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    tmps = list(tmp_path.glob(f'.{CKPT}.*.tmp'))
    assert len(tmps) == 1             # the interrupted write: half a file, never renamed over the checkpoint
    with pytest.raises(CheckpointError, match='truncated or corrupted'): load_checkpoint(tmps[0])
    assert load_checkpoint(tmp_path/CKPT)['next_epoch'] == 2    # the last good checkpoint, intact
    learn = build(tmp_path, seed=5)
    start = resume(learn, CKPT)
    fit(learn, start_epoch=start)
    assert_same_run(ref, result(learn))
    assert not list(tmp_path.glob(f'.{CKPT}.*.tmp'))   # the next fit cleaned up the temporary file


@pytest.mark.slow
@posix_only
def test_random_kills_never_leave_a_bad_checkpoint(tmp_path):
    r = drive('random_kills', tmp_path, env=dict(N_TRIALS='6'))
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(report) == 6
    bad = [e for e in report if 'error' in e]
    assert not bad, bad
    assert any(e['exists'] and e['mid_write'] for e in report)   # some kills did land in a write replacing a checkpoint


def test_paper_protocol_sgd_step_decay_resumes_exactly(tmp_path):
    "SGD momentum buffers and `StepLR`'s decay (a function of the epoch) continue exactly too."
    def run(out, seed=0, cbs=()):
        out.mkdir(exist_ok=True)
        return build(out, seed=seed, cbs=cbs, protocol='paper', lr=0.05)
    ref = run(tmp_path/'full')
    with ref.no_bar(), ref.no_logging(): ref.fit(N_EPOCH)
    learn = run(tmp_path/'cut', cbs=[CtrlC(2, 1)])
    with pytest.raises(KeyboardInterrupt), learn.no_bar(), learn.no_logging(): learn.fit(N_EPOCH)
    learn = run(tmp_path/'cut', seed=11)
    start = learn.resume_from()
    assert start == 2 and isinstance(learn.opt.state[next(iter(learn.model.parameters()))].get('grad_avg'), torch.Tensor)
    with learn.no_bar(), learn.no_logging(): learn.fit(N_EPOCH, start_epoch=start)
    a, b = result(ref), result(learn)
    assert_same_run(a, b)
    assert sorted(set(a['lrs']), reverse=True) == pytest.approx([0.05, 0.005, 0.0005])   # the step decay at 50% and 75%


def test_torch_optimizer_and_trackers_resume_exactly(tmp_path):
    "A PyTorch optimizer through fastai's `OptimWrapper`, and the best-so-far/patience of SaveModel and EarlyStopping."
    from functools import partial
    from fastai.optimizer import OptimWrapper
    from fastai.callback.tracker import EarlyStoppingCallback, SaveModelCallback
    def run(out, seed=0, cbs=()):
        out.mkdir(exist_ok=True)
        trackers = [EarlyStoppingCallback(monitor='accuracy', patience=10), SaveModelCallback(monitor='valid_loss', fname='best')]
        return build(out, seed=seed, cbs=trackers + list(cbs), opt_func=partial(OptimWrapper, opt=torch.optim.AdamW))
    ref = run(tmp_path/'full'); fit(ref)
    learn = run(tmp_path/'cut', cbs=[CtrlC(2, 1)])
    with pytest.raises(KeyboardInterrupt): fit(learn)
    learn = run(tmp_path/'cut', seed=3)
    assert learn.resume_from() == 2
    fit(learn)
    assert_same_run(result(ref), result(learn))
    for name, attrs in (('early_stopping', ('best', 'wait')), ('save_model', ('best',))):
        for a in attrs: assert getattr(getattr(ref, name), a) == getattr(getattr(learn, name), a), (name, a)


class NaNLossAt(Callback):
    "Make the training loss of one batch NaN, as a diverging step does (before `StopOnNaN` looks at it)."
    order = 0
    def __init__(self, epoch, it): self.at = (epoch, it)
    def after_loss(self):
        if self.training and (self.epoch, self.iter) == self.at:
            self.learn.loss_grad = self.learn.loss_grad * float('nan'); self.learn.loss = self.learn.loss_grad.clone()


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(uninterrupted, tmp_path):
    ref, _ = uninterrupted
    learn = build(tmp_path, cbs=[StopOnNaN(), NaNLossAt(2, 1)])
    with pytest.raises(NonFiniteError, match=r'loss is nan at epoch 2 \(0-based\), batch 1 of 5 \(step 11\); this batch did not '
                                             r'update the weights\. The last good checkpoint, .*ckpt.pt, is kept'):
        fit(learn)
    assert load_checkpoint(tmp_path/CKPT)['next_epoch'] == 2
    learn = build(tmp_path, seed=3)             # resume from the last good epoch: the run is not lost
    fit(learn, start_epoch=learn.resume_from(CKPT))
    assert_same_run(ref, result(learn))


def test_nan_weights_are_never_checkpointed(tmp_path):
    "Without `StopOnNaN`, the NaN step goes through, but `Checkpoint` refuses to write a NaN state over the good one."
    learn = build(tmp_path, cbs=[NaNLossAt(1, 4)])
    with pytest.raises(NonFiniteError, match=r'Not saving the checkpoint of epoch 1: its weights hold NaN.*ckpt.pt is kept'):
        fit(learn)
    ck = load_checkpoint(tmp_path/CKPT)
    assert ck['next_epoch'] == 1 and all(torch.isfinite(v).all() for v in ck['model'].values() if v.is_floating_point())


def test_disk_full_during_a_checkpoint_write(uninterrupted, tmp_path, monkeypatch):
    "ENOSPC in the middle of the epoch-1 write: a clear error, the epoch-0 checkpoint intact, and the run resumes exactly."
    ref, _ = uninterrupted
    real = torch.save
    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get('format') == 'igdmfast.checkpoint' and obj['epoch'] == 1:
            buf = io.BytesIO(); real(obj, buf, *args, **kwargs); data = buf.getvalue()
            f.write(data[:len(data)//3]); f.flush()
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, 'save', save)
    with pytest.raises(OSError, match=r'Could not write .*ckpt.pt: No space left on device \(the disk is full.*The previous '
                                      r'ckpt.pt is untouched') as e:
        fit(build(tmp_path))
    monkeypatch.undo()
    assert e.value.errno == errno.ENOSPC
    assert load_checkpoint(tmp_path/CKPT)['next_epoch'] == 1 and not list(tmp_path.glob(f'.{CKPT}.*.tmp'))
    learn = build(tmp_path, seed=8)
    fit(learn, start_epoch=learn.resume_from(CKPT))
    assert_same_run(ref, result(learn))


def test_resume_refuses_a_different_fit(uninterrupted, tmp_path):
    _, out = uninterrupted
    for kwargs, msg in ((dict(n=N_EPOCH + 1), 'fit of 4 epochs'), (dict(start_epoch=2), 'start_epoch=2'),
                        (dict(lr_max=1e-2), 'schedule differs')):
        learn = build(tmp_path)
        learn.resume_from(out/CKPT)
        n = kwargs.pop('n', N_EPOCH)
        with pytest.raises(ValueError, match=msg), learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(n, **kwargs)


def test_resume_from_a_finished_run_trains_nothing(uninterrupted, tmp_path):
    ref, out = uninterrupted
    (tmp_path/CKPT).write_bytes((out/CKPT).read_bytes())
    learn = build(tmp_path, seed=3)
    assert learn.resume_from() == N_EPOCH     # the Checkpoint callback's own file
    fit(learn)
    assert_same_run(ref, result(learn))


def test_validate_does_not_write(uninterrupted, tmp_path):
    _, out = uninterrupted
    learn = build(tmp_path)
    learn.validate()
    assert not (tmp_path/CKPT).exists()


def _record_offset(path):
    "Where the bytes of the checkpoint's largest tensor record start in the file."
    import zipfile
    with zipfile.ZipFile(path) as z: info = max((i for i in z.infolist() if '/data/' in i.filename), key=lambda i: i.file_size)
    raw = Path(path).read_bytes()
    n_name, n_extra = int.from_bytes(raw[info.header_offset+26:info.header_offset+28], 'little'), \
                      int.from_bytes(raw[info.header_offset+28:info.header_offset+30], 'little')
    return info.header_offset + 30 + n_name + n_extra


def test_damaged_missing_and_unsafe_files(uninterrupted, tmp_path):
    _, out = uninterrupted
    data = (out/CKPT).read_bytes()
    with pytest.raises(FileNotFoundError, match='missing.pt'): load_checkpoint(tmp_path/'missing.pt')
    for name, content in (('empty.pt', b''), ('cut.pt', data[:len(data)//2]), ('tail.pt', data[:-10]),
                          ('junk.pt', b'not a checkpoint' * 100)):
        (tmp_path/name).write_bytes(content)
        with pytest.raises(CheckpointError, match='truncated or corrupted'): load_checkpoint(tmp_path/name)
    flipped = bytearray(data); flipped[_record_offset(out/CKPT) + 3] ^= 0x01   # a bit flipped in a tensor: the CRC catches it
    (tmp_path/'flip.pt').write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError): load_checkpoint(tmp_path/'flip.pt')
    torch.save({'format': 'igdmfast.checkpoint', 'x': Path('.')}, tmp_path/'unsafe.pt')   # needs pickled code
    with pytest.raises(CheckpointError, match='cannot be loaded safely'): load_checkpoint(tmp_path/'unsafe.pt')
    torch.save({'w': torch.zeros(1)}, tmp_path/'weights.pt')
    with pytest.raises(CheckpointError, match='not an igdmfast training checkpoint'): load_checkpoint(tmp_path/'weights.pt')
    learn = build(tmp_path)
    with pytest.raises(CheckpointError): learn.resume_from(tmp_path/'cut.pt')


if __name__ == '__main__':
    main(*sys.argv[1:])
