"The `igdmfast` command as a user runs it: a subprocess, offline, on the embedded data."
import json, os, subprocess, sys
from pathlib import Path
import pytest

EXE = [sys.executable, '-m', 'igdmfast.cli']


def run(*args, cwd=None):
    env = dict(os.environ, MPLBACKEND='Agg')
    return subprocess.run([*EXE, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_help_lists_options_with_defaults():
    r = run('train', '--help')
    assert r.returncode == 0
    for opt in ('--data', '--teacher', '--student', '--method', '--igdm', '--no-igdm', '--alpha', '--epochs', '--bs',
                '--lr', '--eps', '--steps', '--n-train', '--n-valid', '--seed', '--out', '--resume', '--device'):
        assert opt in r.stdout
    assert '1/255' in r.stdout and 'default: digits' in r.stdout


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / 'igdmfast'
    assert exe.exists(), 'pip install -e . should install the igdmfast console script'
    r = subprocess.run([str(exe), '--help'], capture_output=True, text=True)
    assert r.returncode == 0 and 'train' in r.stdout


def test_train_end_to_end(tmp_path):
    r = run('train', '--epochs', '4', '--bs', '64', '--method', 'ard', '--steps', '3', '--n-train', '640', '--n-valid', '200', '--n-aa', '8',
            '--out', str(tmp_path / 'run'), '--seed', '1')
    assert r.returncode == 0, r.stderr
    assert '| model | Clean | FGSM | PGD-20 | C&W∞ | AA | GD | GC |' in r.stdout
    run_dir = tmp_path / 'run'
    for f in ('teacher.pt', 'student.pt', 'checkpoint.pt', 'history.csv', 'teacher_history.csv', 'config.json',
              'metrics.json', 'report.md', 'grad_cosines.png', 'training_curves.png'):
        assert (run_dir / f).exists(), f
    cfg = json.loads((run_dir / 'config.json').read_text())
    assert cfg['seed'] == 1 and cfg['method'] == 'ard' and cfg['igdm'] and set(cfg['versions']) >= {'igdmfast', 'torch', 'fastai'}
    report = (run_dir / 'report.md').read_text()
    assert '| Clean | FGSM | PGD-20 | C&W∞ | AA | GD | GC |' in report.replace('Model | ', '')
    models = json.loads((run_dir / 'metrics.json').read_text())['models']
    for name, m in models.items():
        r = m['numbers']
        assert r['pgd20'] <= r['clean'] and r['cw'] <= r['clean'], (name, r)
        assert r['clean'] > 30, (name, r)   # 4 short epochs on digits: far above the 10% of chance
        assert 0 <= r['aa'] <= 100
    student = [m['numbers'] for name, m in models.items() if name.startswith('student')][0]
    assert -1 <= student['gc'] <= 1 and student['gd'] >= 0
    assert 'igdm_loss' in (run_dir / 'history.csv').read_text().splitlines()[0]
    from igdmfast.models import load_teacher
    for f in ('teacher.pt', 'student.pt'):   # both load safely and rebuild themselves
        model = load_teacher(run_dir / f)
        assert not any(p.requires_grad for p in model.parameters())


def test_seeded_runs_repeat(tmp_path):
    fast = ('--epochs', '1', '--bs', '64', '--method', 'ard', '--steps', '2', '--n-train', '256', '--n-valid', '100', '--n-aa', '0')
    a = run('train', *fast, '--out', str(tmp_path / 'a'))
    b = run('train', *fast, '--out', str(tmp_path / 'b'))
    assert a.returncode == b.returncode == 0
    ma = json.loads((tmp_path / 'a' / 'metrics.json').read_text())
    mb = json.loads((tmp_path / 'b' / 'metrics.json').read_text())
    assert ma['models'] == mb['models'] and ma['alignment'] == mb['alignment']   # every accuracy, GD and GC
    import torch
    sa = torch.load(tmp_path / 'a' / 'student.pt', weights_only=True)['state_dict']
    sb = torch.load(tmp_path / 'b' / 'student.pt', weights_only=True)['state_dict']
    assert all(torch.equal(sa[k], sb[k]) for k in sa)   # the same seed gives bit-identical weights


@pytest.mark.parametrize('args, message', [
    (('--eps', '0'), 'eps must be positive'),
    (('--eps', '300'), 'larger than 1'),
    (('--data', 'no_such_dataset'), 'no_such_dataset'),
    (('--data', 'missing_file.npz'), 'missing_file.npz'),
    (('--student', 'no_such_model'), 'no_such_model'),
    (('--method', 'mart'), 'Known methods'),
    (('--teacher', 'missing_teacher.pt'), 'missing_teacher.pt'),
    (('--alpha', '-1'), 'non-negative'),
    (('--epochs', '0'), 'epochs'),
    (('--device', 'cuda:7'), 'device'),
])
def test_bad_input_is_one_clear_line(tmp_path, args, message):
    r = run('train', '--out', str(tmp_path / 'x'), *args)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert 'Traceback' not in r.stderr
    assert message in r.stderr, r.stderr[-2000:]


def test_resume_of_a_finished_run_changes_nothing(tmp_path):
    "A run continued with --resume after it finished reloads its checkpoints and gives the same student."
    import torch
    fast = ('--epochs', '2', '--bs', '64', '--method', 'ard', '--steps', '2', '--n-train', '256', '--n-valid', '100',
            '--n-aa', '0', '--out', str(tmp_path / 'r'))
    assert run('train', *fast).returncode == 0
    first = torch.load(tmp_path / 'r' / 'student.pt', weights_only=True)['state_dict']
    r = run('train', *fast, '--resume')
    assert r.returncode == 0, r.stderr
    assert 'Resuming' in r.stdout
    again = torch.load(tmp_path / 'r' / 'student.pt', weights_only=True)['state_dict']
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_eval_command(tmp_path):
    "igdmfast eval on a run folder's student: the paper's table, GD/GC against the teacher, the eps curve."
    fast = ('--epochs', '2', '--bs', '64', '--method', 'ard', '--steps', '2', '--n-train', '256', '--n-valid', '100',
            '--n-aa', '0', '--out', str(tmp_path / 'r'))
    assert run('train', *fast).returncode == 0
    r = run('eval', str(tmp_path / 'r' / 'student.pt'), '--attacks', 'clean,fgsm,pgd20,cw', '--n', '64',
            '--teacher', str(tmp_path / 'r' / 'teacher.pt'), '--curve', '--out', str(tmp_path / 'e'))
    assert r.returncode == 0, r.stderr
    assert '| model | Clean | FGSM | PGD-20 | C&W∞ | AA | GD | GC |' in r.stdout
    for f in ('metrics.json', 'report.md', 'acc_vs_eps.png'): assert (tmp_path / 'e' / f).exists(), f
    m = json.loads((tmp_path / 'e' / 'metrics.json').read_text())['models']['student.pt']['numbers']
    assert m['pgd20'] <= m['clean'] and -1 <= m['gc'] <= 1 and m['gd'] >= 0, m
    bad = run('eval', str(tmp_path / 'nope.pt'))
    assert bad.returncode == 2 and 'nope.pt' in bad.stderr and 'Traceback' not in bad.stderr
