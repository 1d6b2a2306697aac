"`igdmfast train --keep last|best|swa` (#29 item 1, the CLI side): the kept weights in student.pt, the last epoch's beside them in the report."
import csv, json, os, subprocess, sys
from pathlib import Path
import pytest

EXE = [sys.executable, '-m', 'igdmfast.cli']
TINY = ('--epochs', '2', '--steps', '1', '--n-aa', '0', '--n-train', '96', '--n-valid', '40', '--bs', '32', '--device', 'cpu')


def run(*args, timeout=600):
    env = dict(os.environ, MPLBACKEND='Agg')
    return subprocess.run([*EXE, *args], capture_output=True, text=True, env=env, timeout=timeout)


def train(out, *more):
    r = run('train', *TINY, '--out', str(out), *more)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def history(out):
    with open(out/'history.csv', newline='') as f: return list(csv.DictReader(f))


def files(out): return sorted(p.name for p in out.iterdir() if not p.name.startswith('.'))


def student_state(out):
    import torch
    return torch.load(out/'student.pt', weights_only=True)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    "One run of each --keep, from the same seed (the teacher each trains with --teacher auto)."
    d = tmp_path_factory.mktemp('keep')
    return dict(last=train(d/'last'), best=train(d/'best', '--keep', 'best'), swa=train(d/'swa', '--keep', 'swa', '--keep-every', '2'))


def test_last_is_the_default_and_changes_nothing(runs):
    out = runs['last']
    cfg = json.loads((out/'config.json').read_text())
    assert (cfg['keep'], cfg['holdout']) == ('last', None)
    assert not any(k.startswith('holdout') for k in history(out)[0])   # no new column
    assert files(out) == files(runs['best']) == files(runs['swa'])     # the same files
    m = json.loads((out/'metrics.json').read_text())
    assert 'kept' not in m['extra'] and not any(n.startswith('last epoch') for n in m['models'])
    assert 'kept' not in student_state(out)['meta'] and '--keep' not in (out/'report.md').read_text()


@pytest.mark.parametrize('keep', ['best', 'swa'])
def test_keep_records_reports_and_logs(runs, keep):
    out = runs[keep]
    cfg = json.loads((out/'config.json').read_text())
    assert cfg['keep'] == keep and cfg['holdout'] == 10 and cfg['keep_every'] == (1 if keep == 'best' else 2)   # 10% of 96
    m = json.loads((out/'metrics.json').read_text())
    students = [n for n in m['models'] if n.startswith('student')]
    last = [n for n in m['models'] if n.startswith('last epoch')]
    assert len(students) == 1 and 'kept:' in students[0] and len(last) == 1 and 'not kept' in last[0]   # `export` finds one student
    for n in students + last:   # both rows evaluated the same way, each accuracy with its Wilson interval
        assert set(m['models'][n]['intervals']) >= {'clean', 'fgsm', 'pgd20', 'cw'}
        assert m['models'][n]['intervals']['pgd20']['n'] == 40
    assert m['extra']['kept']['keep'] == keep and student_state(out)['meta']['kept']['keep'] == keep
    report = (out/'report.md').read_text()
    assert f'--keep {keep}: student.pt' in report and report.count(last[0]) >= 2 and report.count(students[0]) >= 2
    col = [r['holdout_pgd10_acc'] for r in history(out)]
    assert len(col) == 2 and col[-1] not in ('', 'None', '#na#')   # always measured after the last epoch
    if keep == 'swa': assert col[0] in ('None', '#na#', '')         # --keep-every 2: not at epoch 0
    else: assert m['extra']['kept']['epoch'] in (0, 1) and abs(float(col[m['extra']['kept']['epoch']]) - m['extra']['kept']['holdout_acc']) < 1e-9


def test_best_student_holds_the_best_epoch(runs):
    "student.pt holds the kept weights (what the report's student row evaluated); the last epoch's are the checkpoint's."
    import torch
    out = runs['best']
    kept = json.loads((out/'metrics.json').read_text())['extra']['kept']
    sd, ck = student_state(out)['state_dict'], torch.load(out/'checkpoint.pt', weights_only=False)
    best = ck['callbacks']['best_robust']
    assert best['best_epoch'] == kept['epoch']
    assert all(torch.equal(sd[k], best['best_state'][k]) for k in sd)


def test_resume_with_another_keep_is_refused(runs):
    for other in ('best', 'last'):
        r = run('train', *TINY, '--out', str(runs['swa']), '--resume', '--keep', other)
        assert r.returncode == 2 and "keep: 'swa' there" in r.stderr, r.stderr[-2000:]


def test_resume_of_a_finished_keep_run_gives_the_same_student(runs, tmp_path):
    "A finished --keep swa run resumed: nothing is trained, and the checkpoint's average gives student.pt again, bit for bit."
    import shutil, torch
    out = tmp_path/'again'
    shutil.copytree(runs['swa'], out)
    before = student_state(out)['state_dict']
    train(out, '--keep', 'swa', '--keep-every', '2', '--resume')
    after = student_state(out)['state_dict']
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)


def test_bad_keep_options_exit_2(tmp_path):
    for args, msg in ((('--keep', 'best', '--holdout', '0'), 'not 0'), (('--keep', 'ema'), '--keep must be'),
                      (('--keep', 'best', '--holdout', '96'), '--holdout 96')):
        r = run('train', *TINY, '--out', str(tmp_path/'bad'), *args)
        assert r.returncode == 2 and msg in r.stderr, r.stderr[-2000:]
