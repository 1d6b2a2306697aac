"""Nothing lost, nothing silently wrong (issue #14): the run folder's safety and the inputs that used to get through.

Each test is the issue's reproduction: it failed on the main of that day and passes now.
- `--force` removes only what a run of ours wrote, never an input of the same command, never a user's file.
- One command at a time per folder: an OS lock; the second command exits 2 at once; after a SIGKILL `--resume` proceeds.
- `igdmfast eval` claims its folder before any compute and never overwrites a run's results.
- A refused command leaves no claim: the corrected command runs without `--force`.
- Confident wrong results: the real AutoAttack count, one-class data, unseen labels, an 8x8 model on 16x16 data.
- What a user sees: logs written to a file read one line per epoch, `import igdmfast.all` prints no warning.
"""
import json, os, signal, subprocess, sys, time
from pathlib import Path

os.environ.setdefault('MPLBACKEND', 'Agg')
import numpy as np
import pytest
import timm
import torch

from igdmfast.models import save_weights
from igdmfast.cli import RunFolder, CLIError, LOCK_FILE, main

EXE = [sys.executable, '-m', 'igdmfast.cli']
F = ['--epochs', '1', '--steps', '1', '--n-aa', '0', '--n-train', '64', '--n-valid', '50', '--bs', '32', '--device', 'cpu']


def run(*args, cwd=None):
    return subprocess.run([*EXE, *args], capture_output=True, text=True, cwd=cwd, timeout=600,
                          env=dict(os.environ, MPLBACKEND='Agg'))


def start(*args):
    return subprocess.Popen([*EXE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, MPLBACKEND='Agg'))


def teacher(path, num_classes=10, in_chans=1):
    "A small untrained teacher saved as `save_weights` writes it (fast; these tests are about files, not robustness)."
    torch.manual_seed(0)
    net = timm.create_model('small_cnn', num_classes=num_classes, in_chans=in_chans, width=4)
    return save_weights(net, path, arch='small_cnn')


def listing(folder):
    "Every file under `folder` with its bytes (the lock file aside)."
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob('*')) if p.is_file() and p.name != LOCK_FILE}


def run_main(argv, monkeypatch, cwd):
    monkeypatch.chdir(cwd)
    try: return main(argv)
    except SystemExit as e: return e.code


# ------------------------------------------------------------------------------------------------ --force

def test_force_removes_only_what_a_run_of_ours_wrote(tmp_path):
    "The issue's reproduction: a teacher, notes, a CSV and a subfolder with a copied config.json all survive `--force`."
    proj = tmp_path/'proj'; (proj/'sub').mkdir(parents=True)
    teacher(proj/'teacher.pt')
    (proj/'NOTES.md').write_text('x'); (proj/'labels.csv').write_text('a')
    (proj/'sub'/'mydata.txt').write_text('y'); (proj/'sub'/'config.json').write_text('{"command": "train", "epochs": 1}')
    mine = listing(proj)
    r = run('train', *F, '--teacher', str(proj/'teacher.pt'), '--out', str(proj), '--force')
    assert r.returncode == 0, r.stderr[-2000:]
    after = listing(proj)
    assert all(after.get(k) == v for k, v in mine.items()), sorted(set(mine) - set(after))   # every user file, unchanged
    assert {'student.pt', 'config.json', 'metrics.json', 'history.csv'} <= set(after)
    # --force again, over the finished run: the run's own files go (and are listed), the user's stay
    r = run('train', *F, '--method', 'rslad', '--teacher', str(proj/'teacher.pt'), '--out', str(proj), '--force')
    assert r.returncode == 0, r.stderr[-2000:]
    assert '--force: removed' in r.stdout and 'student.pt' in r.stdout and 'teacher.pt' not in r.stdout.split('--force: removed')[1].splitlines()[0]
    after = listing(proj)
    assert all(after.get(k) == v for k, v in mine.items())
    assert json.loads((proj/'config.json').read_text())['method'] == 'rslad'


def test_a_folder_with_only_the_users_teacher_is_not_another_run(tmp_path):
    d = tmp_path/'proj'; d.mkdir(); teacher(d/'teacher.pt')
    with RunFolder(d, inputs=[d/'teacher.pt']) as rf: rf.claim(dict(command='train'))   # no --force needed
    assert (d/'teacher.pt').is_file()


def test_a_users_file_we_would_overwrite_is_refused_even_with_force(tmp_path):
    d = tmp_path/'proj'; d.mkdir(); (d/'metrics.json').write_text('{"mine": 1}')
    for force in (False, True):
        with pytest.raises(CLIError, match=r'holds metrics.json, which igdmfast did not write'):
            with RunFolder(d, force=force) as rf: rf.claim(dict(command='train'))
    assert (d/'metrics.json').read_text() == '{"mine": 1}' and not (d/'config.json').exists()


# ------------------------------------------------------------------------------------------------ the lock

def test_two_commands_started_together_one_runs_the_other_is_refused(tmp_path):
    t = teacher(tmp_path/'t.pt'); out = tmp_path/'run'
    a = start('train', *F, '--method', 'adaad', '--teacher', str(t), '--out', str(out))
    b = start('train', *F, '--method', 'rslad', '--teacher', str(t), '--out', str(out))
    ra, rb = a.communicate(timeout=600), b.communicate(timeout=600)
    codes = sorted([a.returncode, b.returncode])
    assert codes == [0, 2], (a.returncode, ra[1][-1500:], b.returncode, rb[1][-1500:])
    refused = ra if a.returncode == 2 else rb
    # refused by the lock (or, when its start was slow enough to find the first run already finished, as another run)
    assert ('in use by another igdmfast command' in refused[1] or 'holds another run' in refused[1]), refused[1][-1500:]
    assert 'Traceback' not in refused[1]
    winner = 'adaad' if a.returncode == 0 else 'rslad'
    assert json.loads((out/'config.json').read_text())['method'] == winner
    assert len((out/'history.csv').read_text().splitlines()) == 2   # one header, one epoch: nothing interleaved


def test_the_lock_dies_with_a_killed_command_and_resume_proceeds(tmp_path):
    "A command frozen mid-training (SIGSTOP) holds the folder: a second is refused; after a SIGKILL, --resume proceeds."
    t = teacher(tmp_path/'t.pt'); out = tmp_path/'run'
    args = ('train', *[a if a != '1' else '3' for a in F[:2]], *F[2:], '--method', 'ard', '--teacher', str(t), '--out', str(out))
    a = start(*args)
    deadline = time.time() + 300
    while not (out/'checkpoint.pt').exists() and a.poll() is None and time.time() < deadline: time.sleep(0.02)
    a.send_signal(signal.SIGSTOP)
    try:
        assert a.poll() is None, 'the first command ended before the test could stop it'
        b = run(*args, '--resume')                     # while the first holds the folder
        assert b.returncode == 2 and 'in use by another igdmfast command' in b.stderr, b.stderr[-2000:]
        assert f'process {a.pid}' in b.stderr and 'Traceback' not in b.stderr
    finally:
        a.send_signal(signal.SIGKILL); a.wait()
    c = run(*args, '--resume')
    assert c.returncode == 0 and 'Resuming' in c.stdout, c.stderr[-2000:]
    assert len((out/'history.csv').read_text().splitlines()) == 4   # one row per epoch


# ------------------------------------------------------------------------------------------------ eval

@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
    d = tmp_path_factory.mktemp('finished')
    t = teacher(d/'t.pt')
    r = run('train', *F, '--method', 'ard', '--teacher', str(t), '--out', str(d/'run'))
    assert r.returncode == 0, r.stderr[-2000:]
    return d/'run'


def test_eval_never_overwrites_a_runs_results(finished_run, tmp_path, monkeypatch):
    before = listing(finished_run)
    code = run_main(['eval', str(finished_run/'student.pt'), '--out', str(finished_run), '--attacks', 'clean', '--device', 'cpu'],
                    monkeypatch, tmp_path)
    assert code == 2 and listing(finished_run) == before


def test_eval_checks_its_folder_before_any_attack(finished_run, tmp_path, monkeypatch, capsys):
    import igdmfast.evaluate
    def no_attack(*a, **k): raise AssertionError('an attack ran before the folder was checked')
    monkeypatch.setattr(igdmfast.evaluate, 'robust_eval', no_attack)
    (tmp_path/'afile').write_text('x')
    code = run_main(['eval', str(finished_run/'student.pt'), '--out', str(tmp_path/'afile'), '--device', 'cpu'], monkeypatch, tmp_path)
    assert code == 2 and 'is a file, not a folder' in capsys.readouterr().err


def test_eval_default_folders_do_not_overwrite_each_other(finished_run, tmp_path, monkeypatch):
    t = teacher(tmp_path/'other'/'t.pt')
    for m in (finished_run/'student.pt', t):
        assert run_main(['eval', str(m), '--attacks', 'clean', '--n', '20', '--device', 'cpu'], monkeypatch, tmp_path) == 0
    reports = sorted(p.parent.name[:-9] for p in (tmp_path/'runs'/'eval').glob('*/report.md'))   # less '-<8 hex digits>' (#25)
    assert reports == ['other-t', 'run-student']
    # evaluating the same model again into its folder needs --force
    argv = ['eval', str(t), '--attacks', 'clean', '--n', '20', '--device', 'cpu']
    assert run_main(argv, monkeypatch, tmp_path) == 2
    assert run_main(argv + ['--force'], monkeypatch, tmp_path) == 0


def test_eval_refuses_data_of_another_size_than_the_model_was_trained_on(finished_run, tmp_path, monkeypatch, capsys):
    "A digits (8x8) student on 16x16 images: refused, naming both sizes (it used to score near chance without a word)."
    rng = np.random.default_rng(0)
    big = tmp_path/'big.npz'
    np.savez(big, x_train=rng.random((40, 1, 16, 16), dtype=np.float32), y_train=np.arange(40) % 10,
             x_test=rng.random((20, 1, 16, 16), dtype=np.float32), y_test=np.arange(20) % 10)
    code = run_main(['eval', str(finished_run/'student.pt'), '--data', str(big), '--attacks', 'clean', '--bs', '16', '--device', 'cpu',
                     '--out', str(tmp_path/'e')], monkeypatch, tmp_path)
    err = capsys.readouterr().err
    assert code == 2 and '1x8x8' in err and '1x16x16' in err, err[-2000:]
    assert not (tmp_path/'e').exists()   # refused: nothing claimed


# ------------------------------------------------------------------------------------------------ refused runs

def test_a_refused_run_leaves_no_claim(tmp_path, monkeypatch, capsys):
    "A teacher with the wrong class count is refused; the corrected command then runs without --force."
    out = tmp_path/'run'
    bad, good = teacher(tmp_path/'t5.pt', num_classes=5), teacher(tmp_path/'t10.pt')
    assert run_main(['train', *F, '--teacher', str(bad), '--out', str(out)], monkeypatch, tmp_path) == 2
    assert 'classes' in capsys.readouterr().err
    assert not out.exists()
    assert run_main(['train', *F, '--teacher', str(good), '--out', str(out)], monkeypatch, tmp_path) == 0


@pytest.mark.parametrize('bad', [['--alpha', 'inf'], ['--bs', '1'], ['--eps', 'nan']])
def test_refused_options_claim_nothing(tmp_path, monkeypatch, bad):
    out = tmp_path/'run'
    assert run_main(['train', *F, *bad, '--out', str(out)], monkeypatch, tmp_path) == 2
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ wrong results

def test_the_report_names_the_real_autoattack_count():
    from igdmfast.runs import aa_note as _aa_note
    from igdmfast.data import get_dls
    dls = get_dls('digits', n_train=64, n_valid=20, bs=16, device='cpu')
    assert _aa_note(100000, dls) == 'AutoAttack (standard) on all 20 validation images (--n-aa 100000 asked for more)'
    assert _aa_note(10, dls) == 'AutoAttack (standard) on a seeded subset of 10'
    assert _aa_note(0, dls) == 'AutoAttack skipped (--n-aa 0)'


def _npz(tmp, **change):
    rng = np.random.default_rng(0)
    d = dict(x_train=rng.random((40, 1, 8, 8), dtype=np.float32), y_train=np.arange(40) % 4,
             x_test=rng.random((20, 1, 8, 8), dtype=np.float32), y_test=np.arange(20) % 4)
    d.update(change); p = tmp/'d.npz'; np.savez(p, **d)
    return str(p)


@pytest.mark.parametrize('change, msg', [
    (dict(y_train=np.zeros(40, np.int64), y_test=np.zeros(20, np.int64)), 'one class only'),
    (dict(y_test=np.where(np.arange(20) == 3, 12, np.arange(20) % 4)), r'validation labels include 12, which no training image has'),
])
def test_data_that_would_give_a_confident_wrong_result_is_refused(tmp_path, monkeypatch, capsys, change, msg):
    import re
    argv = ['train', *F, '--n-train', '40', '--n-valid', '20', '--bs', '8', '--data', _npz(tmp_path, **change), '--out', str(tmp_path/'o')]
    assert run_main(argv, monkeypatch, tmp_path) == 2
    assert re.search(msg, capsys.readouterr().err)


# ------------------------------------------------------------------------------------------------ what a user sees

def test_logs_written_to_a_file_read_one_line_per_epoch(tmp_path):
    t = teacher(tmp_path/'t.pt')
    r = run('train', *[a if a != '1' else '2' for a in F[:2]], *F[2:], '--method', 'ard', '--teacher', str(t), '--out', str(tmp_path/'run'))
    assert r.returncode == 0, r.stderr[-2000:]
    assert '\r' not in r.stdout and '\r' not in r.stderr
    lines = r.stdout.splitlines()
    head = next(i for i, l in enumerate(lines) if l.split()[:2] == ['epoch', 'train_loss'])
    assert [l.split()[0] for l in lines[head + 1:head + 3]] == ['0', '1']


def test_importing_igdmfast_prints_no_warning():
    r = subprocess.run([sys.executable, '-c', 'import igdmfast.all'], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and 'torch.jit.script' not in r.stderr, r.stderr


def test_auto_threads_leave_out_the_busy_cores(monkeypatch):
    "A quiet 2-core machine gets 2 threads, one with a busy core 1 (2 threads there ran the main job ~3x slower)."
    import igdmfast.options as runs
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    monkeypatch.setattr(runs.os, 'sched_getaffinity', lambda pid: {0, 1})
    for load, n in ((0.1, 2), (1.0, 1), (3.7, 1)):
        monkeypatch.setattr(runs.os, 'getloadavg', lambda load=load: (load, load, load))
        assert runs.cpu_threads('auto') == n
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    assert runs.cpu_threads('auto') == 1 and runs.cpu_threads('3') == 3
    for bad in ('0', 'many'):
        with pytest.raises(CLIError, match="--threads must be 'auto' or a positive integer"): runs.cpu_threads(bad)


def test_main_restores_the_thread_count(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    assert run_main(['train', '--threads', '1', '--epochs', '0', '--out', str(tmp_path/'o')], monkeypatch, tmp_path) == 2
    assert torch.get_num_threads() == before


def test_a_full_disk_reported_by_torch_names_the_file_and_the_resume(tmp_path, monkeypatch):
    "torch reports a failed write as `[enforce fail at inline_container.cc]`: with the disk full it becomes ENOSPC (issue #14)."
    import collections, errno
    import igdmfast.core as core
    def failing_save(obj, f, *a, **k): f.write(b'abc'); raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0')
    monkeypatch.setattr(torch, 'save', failing_save)
    monkeypatch.setattr(core.shutil, 'disk_usage', lambda p: collections.namedtuple('usage', 'total used free')(100, 100, 0))
    with pytest.raises(OSError) as e: core.atomic_save({'w': torch.zeros(3)}, tmp_path/'checkpoint.pt')
    assert e.value.errno == errno.ENOSPC and 'checkpoint.pt' in str(e.value) and '--resume' in str(e.value)
    assert 'inline_container' not in str(e.value) and list(tmp_path.iterdir()) == []   # no temporary file left


def test_igdm_bn_option(tmp_path, monkeypatch, capsys):
    "`--igdm-bn keep` reaches the learner and the run's config; an unknown value is refused before anything is claimed."
    out, t = tmp_path/'run', teacher(tmp_path/'t.pt')
    assert run_main(['train', *F, '--teacher', str(t), '--igdm-bn', 'frozen', '--out', str(out)], monkeypatch, tmp_path) == 2
    assert "--igdm-bn must be one of update, keep, eval, recalibrate, got 'frozen'" in capsys.readouterr().err and not out.exists()
    assert run_main(['train', *F, '--teacher', str(t), '--method', 'ard', '--igdm-bn', 'keep', '--out', str(out)], monkeypatch, tmp_path) == 0
    assert json.loads((out/'config.json').read_text())['igdm_bn'] == 'keep'
    assert run_main(['train', *F, '--teacher', str(t), '--method', 'ard', '--igdm-bn', 'update', '--resume', '--out', str(out)], monkeypatch, tmp_path) == 2
    assert "igdm_bn: 'keep' there, 'update' now" in capsys.readouterr().err   # a resume with the other choice is refused


def test_igdm_bn_auto_is_resolved_and_recorded(tmp_path, monkeypatch, capsys):
    "The default `--igdm-bn auto` runs and records 'keep', or 'update' with --protocol paper; a resume keeps what the run recorded."
    t = teacher(tmp_path/'t.pt')
    def cfg(out): return json.loads((tmp_path/out/'config.json').read_text())
    assert run_main(['train', *F, '--teacher', str(t), '--method', 'ard', '--out', 'a'], monkeypatch, tmp_path) == 0
    assert cfg('a')['igdm_bn'] == 'keep'
    assert run_main(['train', *F, '--teacher', str(t), '--method', 'ard', '--protocol', 'paper', '--out', 'p'], monkeypatch, tmp_path) == 0
    assert cfg('p')['igdm_bn'] == 'update'
    # a run recorded before 'auto' existed ('update', the old default): a resume without --igdm-bn continues it as it was
    old = dict(cfg('a'), igdm_bn='update'); (tmp_path/'a'/'config.json').write_text(json.dumps(old))
    capsys.readouterr()
    assert run_main(['train', *F, '--teacher', str(t), '--method', 'ard', '--resume', '--out', 'a'], monkeypatch, tmp_path) == 0
    assert cfg('a')['igdm_bn'] == 'update' and 'other settings' not in capsys.readouterr().err
    # compare records 'auto' for the comparison and what each variant ran
    assert run_main(['compare', *F, '--teacher', str(t), '--methods', 'ard', '--n-curve', '0', '--out', 'c'], monkeypatch, tmp_path) == 0
    assert cfg('c')['igdm_bn'] == 'auto' and cfg('c/ard_igdm')['igdm_bn'] == 'keep'
