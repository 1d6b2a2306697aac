"""Nothing lost, nothing unsafe loaded, the teacher never changed (issue #8, items 2-4).

- A failed checkpoint write (disk full, permission denied) raises an `OSError` of the same kind that names the file
  and what to do, leaves the previous file intact and no temporary file behind (`atomic_save`, `save_weights`).
- A crafted file whose unpickling would run code (it would create a marker file) is refused by `load_teacher`,
  `load_checkpoint` and `resume`, and the code never runs (the marker does not appear); a file with NaN weights is
  not resumed from.
- The teacher's parameters, buffers, module modes, `requires_grad` flags and `.grad`s are exactly as they were
  after distillation steps (one of which raises in the middle of the attack), evaluations (one of which raises after
  a batch) and exports.

The NaN-loss stop and the disk-full stop of a real run, each followed by a bit-identical resume, are in
`test_checkpoint.py` (they reuse its uninterrupted reference run), as are the SIGKILL tests.
"""
import errno
import os
import warnings
from pathlib import Path

os.environ.setdefault('MPLBACKEND', 'Agg')
import pytest
import timm
import torch
from torch import nn
from fastai.callback.core import Callback
import fastai.callback.progress  # noqa: F401  (no_bar)

import igdmfast.core as core
from igdmfast.core import ThreatModel, atomic_save, check_logits
from igdmfast.data import get_dls
from igdmfast.models import load_teacher, save_weights, CheckpointError, UnsafeCheckpointError
from igdmfast.learner import distill_learner
from igdmfast.callback.checkpoint import Checkpoint, load_checkpoint, resume
from igdmfast.evaluate import robust_eval, grad_alignment, accuracy_vs_eps, taylor_remainder, pointwise_distance

THREAT = ThreatModel(eps=0.1, step_size=0.05, n_steps=2)


@pytest.fixture(scope='module')
def dls():
    return get_dls('digits', n_train=64, n_valid=32, bs=32, device='cpu')


def small(seed, num_classes=10):
    torch.manual_seed(seed)
    return timm.create_model('small_cnn', num_classes=num_classes, in_chans=1, width=4)


# ------------------------------------------------------------------------------------------------ failed writes

def _only(folder): return sorted(p.name for p in Path(folder).iterdir())


@pytest.mark.parametrize('code, hint', [(errno.ENOSPC, 'the disk is full'), (errno.EDQUOT, 'quota'),
                                        (errno.EACCES, 'permission denied'), (errno.EROFS, 'read-only')])
def test_failed_write_keeps_the_last_good_file(tmp_path, monkeypatch, code, hint):
    good = atomic_save({'w': torch.arange(5)}, tmp_path/'ck.pt')
    real_save = torch.save
    def failing_save(obj, f, *a, **k):     # half the bytes reach the temporary file, then the disk says no
        import io
        buf = io.BytesIO(); real_save(obj, buf); data = buf.getvalue()
        f.write(data[:len(data)//2]); f.flush()
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(torch, 'save', failing_save)
    with pytest.raises(OSError) as e: atomic_save({'w': torch.zeros(100)}, good)
    monkeypatch.undo()
    assert e.value.errno == code and type(e.value) is type(OSError(code, ''))
    msg = str(e.value)
    assert f'Could not write {good}' in msg and hint in msg and 'The previous ck.pt is untouched' in msg and 'resume' in msg
    assert torch.equal(torch.load(good, weights_only=True)['w'], torch.arange(5))   # the last good file, intact
    assert _only(tmp_path) == ['ck.pt']                                               # no temporary file left


def test_unwritable_folder(tmp_path, monkeypatch):
    "A folder without write permission (really, unless running as root, where it is simulated)."
    d = tmp_path/'ro'; d.mkdir()
    atomic_save({'w': torch.ones(1)}, d/'ck.pt')
    if os.geteuid() == 0:   # root ignores permissions: make creating the temporary file fail as it would
        def denied(*a, **k): raise PermissionError(errno.EACCES, 'Permission denied')
        monkeypatch.setattr(core.tempfile, 'mkstemp', denied)
    else: d.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match=r'Could not write .*ck.pt: Permission denied \(permission denied: make the '
                                                   r'folder writable.*The previous ck.pt is untouched'):
            atomic_save({'w': torch.zeros(1)}, d/'ck.pt')
        with pytest.raises(PermissionError, match='Nothing was written'): atomic_save({'w': torch.zeros(1)}, d/'new.pt')
    finally: d.chmod(0o755)
    assert torch.equal(torch.load(d/'ck.pt', weights_only=True)['w'], torch.ones(1)) and _only(d) == ['ck.pt']


@pytest.mark.parametrize('suffix', ['.pt', '.safetensors'])
def test_save_weights_disk_full(tmp_path, monkeypatch, suffix):
    m = small(0)
    p = save_weights(m, tmp_path/f'teacher{suffix}')
    before = p.read_bytes()
    real_replace = os.replace
    def full(src, dst):   # the last moment a write can fail: everything written, the rename refused
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(os, 'replace', full)
    with pytest.raises(OSError, match=r'disk is full.*previous teacher'): save_weights(small(1), p)
    monkeypatch.setattr(os, 'replace', real_replace)
    assert p.read_bytes() == before and _only(tmp_path) == [p.name]
    load_teacher(p)


# ------------------------------------------------------------------------------------------------ unsafe files

class Evil:
    "Unpickling it runs code: it creates the file `marker`."
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_crafted_files_are_refused_and_their_code_never_runs(tmp_path, dls):
    marker = tmp_path/'PWNED'
    student = small(0)
    weights = tmp_path/'weights.pt'
    torch.save({'state_dict': student.state_dict(), 'extra': Evil(marker)}, weights)
    ck_file = tmp_path/'checkpoint.pt'
    learn = distill_learner(small(1).eval().requires_grad_(False), student, dls, method='ard', threat=THREAT,
                            check_teacher=False, cbs=Checkpoint(ck_file))
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    ck = torch.load(ck_file, weights_only=True)
    ck['meta']['note'] = Evil(marker)   # a real checkpoint, plus one object that runs code
    torch.save(ck, tmp_path/'evil_checkpoint.pt')
    # the files are real threats: loading them the unsafe way runs the code
    for f in (weights, tmp_path/'evil_checkpoint.pt'):
        torch.load(f, weights_only=False)
        assert marker.exists(); marker.unlink()
    # igdmfast refuses them without running anything
    with pytest.raises(UnsafeCheckpointError, match=r'refused for safety.*TRUST'): load_teacher(weights, arch='small_cnn')
    with pytest.raises(UnsafeCheckpointError, match=r'cannot be loaded safely.*TRUST'): load_checkpoint(tmp_path/'evil_checkpoint.pt')
    with pytest.raises(UnsafeCheckpointError): resume(learn, tmp_path/'evil_checkpoint.pt')
    with pytest.raises(UnsafeCheckpointError): learn.resume_from(tmp_path/'evil_checkpoint.pt')
    assert not marker.exists()
    assert issubclass(UnsafeCheckpointError, CheckpointError) and issubclass(CheckpointError, ValueError)


def test_truncated_and_nan_checkpoints(tmp_path, dls):
    learn = distill_learner(small(1).eval().requires_grad_(False), small(0), dls, method='ard', threat=THREAT,
                            check_teacher=False, cbs=Checkpoint(tmp_path/'ck.pt'))
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    data = (tmp_path/'ck.pt').read_bytes()
    for n in (len(data) // 3, len(data) - 7, 0):
        (tmp_path/'cut.pt').write_bytes(data[:n])
        with pytest.raises(CheckpointError, match='truncated or corrupted'): resume(learn, tmp_path/'cut.pt')
        with pytest.raises(CheckpointError, match='corrupted or truncated'): load_teacher(tmp_path/'cut.pt', arch='small_cnn')
    ck = torch.load(tmp_path/'ck.pt', weights_only=True)
    k = next(k for k, v in ck['model'].items() if v.is_floating_point())
    ck['model'][k] = torch.full_like(ck['model'][k], float('nan'))
    torch.save(ck, tmp_path/'nan.pt')
    with pytest.raises(CheckpointError, match=rf'NaN or inf weights \({k}'): resume(learn, tmp_path/'nan.pt')


# ------------------------------------------------------------------------------------------------ the teacher

def snapshot(m):
    return dict(state={k: v.detach().clone() for k, v in m.state_dict().items()},
                ids=[id(p) for p in m.parameters()] + [id(b) for b in m.buffers()],
                training=[sub.training for sub in m.modules()], requires_grad=[p.requires_grad for p in m.parameters()],
                grads=[p.grad for p in m.parameters()], hooks=sum(len(s._forward_hooks) + len(s._forward_pre_hooks) +
                                                                 len(s._backward_hooks) for s in m.modules()))

def assert_unchanged(m, before, when):
    now = snapshot(m)
    diff = [k for k in before['state'] if not torch.equal(before['state'][k], now['state'][k])]
    assert not diff, f"{when}: teacher tensors changed: {diff}"
    for key in ('ids', 'training', 'requires_grad', 'hooks'): assert now[key] == before[key], f"{when}: teacher {key} changed"
    assert all(g is None for g in now['grads']), f"{when}: the teacher got .grad"


class RaiseInAttack(Callback):
    "Make the student's forward raise inside the attack of the second training batch, while the teacher is in use."
    order = -20
    def before_fit(self): self.n, self.h = 0, self.learn.model.register_forward_pre_hook(self.hook)
    def hook(self, module, args):
        self.n += 1
        if self.n == 5: raise RuntimeError('boom inside the attack')
    def after_fit(self): self.h.remove()


class BadSecondBatch:
    "Evaluation data whose second batch has labels the model cannot output."
    def __init__(self, x, y): self.x, self.y = x, y
    def __iter__(self):
        yield self.x[:8], self.y[:8]
        yield self.x[8:16], self.y[8:16] + 10


@pytest.mark.parametrize('method', ['adaad', 'rslad'])
def test_teacher_never_changes(tmp_path, dls, method):
    teacher = small(7).eval().requires_grad_(False)    # as `load_teacher` returns it
    before = snapshot(teacher)
    student = small(3)
    learn = distill_learner(teacher, student, dls, method=method, igdm=True, threat=THREAT, check_teacher=False, path=tmp_path)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1)
        assert_unchanged(teacher, before, 'after a fit')
        hook = RaiseInAttack()
        with pytest.raises(RuntimeError, match='boom inside the attack'): learn.fit(1, cbs=hook)
        hook.h.remove()   # fastai skips after_fit on an exception
        assert_unchanged(teacher, before, 'after a step that raised inside the attack')
        learn.fit(1)      # and training goes on normally
        learn.validate()
    assert_unchanged(teacher, before, 'after fitting again')
    x, y = dls.valid.dataset.x.float(), dls.valid.dataset.y
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        robust_eval(teacher, (x, y), attacks=('clean', 'fgsm', 'pgd5', 'cw5'), progress=False)
        grad_alignment(student, teacher, (x, y))
        pointwise_distance(student, teacher, (x[:8], y[:8]), delta=method, threat=THREAT)
        accuracy_vs_eps(teacher, (x[:8], y[:8]), eps_list=[0, 0.05], n_steps=2, progress=False)
        taylor_remainder(teacher, (x[:8], y[:8]))
        check_logits(teacher, x[:8], y[:8])
        with pytest.raises(ValueError, match='labels up to'): robust_eval(teacher, BadSecondBatch(x, y), attacks=('pgd5',), progress=False)
        with pytest.raises(ValueError, match='labels up to'): grad_alignment(student, teacher, BadSecondBatch(x, y))
    assert_unchanged(teacher, before, 'after evaluation')
    learn.export(tmp_path/'export.pkl')
    learn.export_student('student.pt')
    save_weights(teacher, tmp_path/'teacher.pt')
    assert_unchanged(teacher, before, 'after export')
    assert set(load_teacher(tmp_path/'student.pt').state_dict()) == set(student.state_dict())
