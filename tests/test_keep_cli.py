"""`igdmfast train --keep last|best|swa|ema` (#29, the CLI side): the kept weights in student.pt, the last epoch's beside them in the report;
EMA, the SWA start and the BatchNorm pass (`--ema-decay`, `--swa-start`, `--bn-on`), checked, recorded, resumed bit for bit."""
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
    for args, msg in ((('--keep', 'best', '--holdout', '0'), 'not 0'), (('--keep', 'median'), '--keep must be'),
                      (('--keep', 'best', '--holdout', '96'), '--holdout 96')):
        r = run('train', *TINY, '--out', str(tmp_path/'bad'), *args)
        assert r.returncode == 2 and msg in r.stderr, r.stderr[-2000:]


# --keep ema, --swa-start, --ema-decay, --bn-on: the committed digits teacher (no teacher to train), 4 epochs
TEACHER = Path(__file__).resolve().parents[1]/'experiments'/'convergent'/'grid'/'teacher'/'teacher.pt'
EMA = ('--teacher', str(TEACHER), '--epochs', '4', '--keep', 'ema', '--ema-decay', '0.5', '--bn-on', 'clean')
SWA_FROM = ('--teacher', str(TEACHER), '--keep', 'swa', '--swa-start', '1', '--bn-on', 'clean')


@pytest.fixture(scope='module')
def averaged(tmp_path_factory):
    "An EMA run (decay 0.5, BatchNorm on clean images) and an SWA run from epoch 1, both with the hold-out column."
    d = tmp_path_factory.mktemp('avg')
    return dict(ema=train(d/'ema', *EMA), swa=train(d/'swa', *SWA_FROM))


def test_ema_and_swa_start_are_recorded_reported_and_kept(averaged):
    import torch
    from igdmfast.callback.averaging import describe_kept
    for kind, out in averaged.items():
        cfg, m = json.loads((out/'config.json').read_text()), json.loads((out/'metrics.json').read_text())
        kept, epochs = m['extra']['kept'], cfg['epochs']
        assert cfg['keep'] == kept['keep'] == kind and cfg['bn_on'] == kept['bn_on'] == 'clean'
        assert student_state(out)['meta']['kept'] == {k: v for k, v in kept.items() if k not in ('holdout', 'every')}
        steps = len(history(out)) and (cfg['holdout'] and (96 - cfg['holdout']) // 32)   # full batches per epoch (drop_last)
        if kind == 'ema':
            assert (cfg['ema_decay'], kept['ema_decay'], kept['start_epoch']) == (0.5, 0.5, 0) and cfg['swa_start'] is None
            assert kept['n_averaged'] == epochs * steps   # every optimizer step of every epoch
        else:
            assert (cfg['swa_start'], kept['start_epoch'], kept['n_averaged'], cfg['ema_decay']) == ('1', 1, epochs - 1, None)
        students = [n for n in m['models'] if n.startswith('student')]
        assert len(students) == 1 and describe_kept(kept, epochs) in students[0]   # the report names the kept weights
        report = (out/'report.md').read_text()
        assert f'--keep {kind}: student.pt' in report and '(--bn-on clean)' in report and 'BatchNorm recomputed on clean images' in report
        # student.pt holds the average's parameters, from the checkpoint (the last epoch's state plus the average)
        ck = torch.load(out/'checkpoint.pt', weights_only=False)
        avg, sd = ck['callbacks'][kind]['avg'], student_state(out)['state_dict']
        names = [k for k in ck['model'] if not any(b in k for b in ('running_', 'num_batches_tracked'))]
        assert len(names) == sum(k.startswith('module.') for k in avg)
        assert all(torch.equal(sd[n], avg[f'module.{i}']) for i, n in enumerate(names))
        same = [torch.equal(sd[n], ck['model'][n]) for n in names]
        if kind == 'swa': assert all(same)   # the SWA of epoch 1 alone (of 2) is the last epoch's parameters, exactly
        else: assert not all(same)           # EMA (decay 0.5) of 4 epochs' steps: not the last weights
        buffers = [k for k in ck['model'] if 'running_' in k]
        assert buffers and not all(torch.equal(sd[k], ck['model'][k]) for k in buffers)   # BatchNorm recomputed (on clean images)


def test_killed_ema_run_resumes_bit_for_bit(averaged, tmp_path):
    "An EMA run SIGKILLed after its first epoch and resumed ends with the uninterrupted run's student and numbers."
    import signal, time, torch
    out = tmp_path/'killed'
    p = subprocess.Popen([*EXE, 'train', *TINY, *EMA, '--out', str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env=dict(os.environ, MPLBACKEND='Agg'))
    deadline = time.time() + 600
    while not (out/'checkpoint.pt').exists() and time.time() < deadline and p.poll() is None: time.sleep(0.02)
    assert p.poll() is None, 'the run ended before it could be killed'
    p.send_signal(signal.SIGKILL); p.wait()
    assert not (out/'metrics.json').exists()
    train(out, *EMA, '--resume')
    ref, got = student_state(averaged['ema']), student_state(out)
    assert set(ref['state_dict']) == set(got['state_dict']) and all(torch.equal(ref['state_dict'][k], got['state_dict'][k]) for k in ref['state_dict'])
    numbers = lambda o: {n: e['numbers'] for n, e in json.loads((o/'metrics.json').read_text())['models'].items()}
    assert numbers(out) == numbers(averaged['ema']) and history(out) == history(averaged['ema'])


def test_resume_with_other_averaging_is_refused(averaged):
    for kind, args, msg in (('ema', (*EMA, '--ema-decay', '0.9'), 'ema_decay: 0.5 there, 0.9 now'),
                            ('swa', (*SWA_FROM, '--bn-on', 'adv'), "bn_on: 'clean' there, 'adv' now"),
                            ('swa', (*SWA_FROM, '--swa-start', '0'), "swa_start: '1' there, '0' now")):
        r = run('train', *TINY, *args, '--out', str(averaged[kind]), '--resume')
        assert r.returncode == 2 and msg in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize('args,msg', [
    (('--keep', 'swa', '--swa-start', '2'), 'this fit has 2 epochs'), (('--keep', 'swa', '--swa-start', '1.5'), 'fraction of --epochs'),
    (('--keep', 'swa', '--swa-start', '1.0'), r'(--swa-start 1)'), (('--keep', 'swa', '--swa-start', 'x'), 'takes an epoch'),
    (('--keep', 'ema', '--swa-start', '1'), 'leave --swa-start out'), (('--keep', 'swa', '--ema-decay', '0.9'), 'leave --ema-decay out'),
    (('--keep', 'best', '--bn-on', 'clean'), 'add --keep swa'), (('--swa-start', '1'), 'add --keep swa'),
    (('--keep', 'ema', '--ema-decay', '1'), 'in [0, 1)'), (('--keep', 'ema', '--bn-on', 'test'), '--bn-on must be one of clean, adv')])
def test_bad_averaging_options_exit_2(tmp_path, args, msg):
    r = run('train', *TINY, '--out', str(tmp_path/'bad'), *args)
    assert r.returncode == 2 and msg in r.stderr and 'Traceback' not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path/'bad').exists()   # refused before the folder is claimed


def test_card_names_the_kept_weights_and_shows_the_last_epoch(averaged, tmp_path):
    "The exported card says which weights it holds (SWA from epoch 1, BatchNorm on clean images) and the last epoch's numbers beside them."
    from igdmfast.callback.averaging import describe_kept
    from igdmfast.export import export_student
    from igdmfast.stats import binomial_ci
    run_dir = averaged['swa']
    m = json.loads((run_dir/'metrics.json').read_text())
    kept = m['extra']['kept']
    r = export_student(run_dir, tmp_path/'x', onnx=False)
    card, rb = (tmp_path/'x'/'README.md').read_text(), r['robustbench']
    words = describe_kept(kept, 2)
    assert words == "SWA of epochs 1–1, BatchNorm recomputed on clean images"
    assert f"| Weights | {words} (`--keep swa`; 10 training images held out, never trained on, for the PGD-10 curve) |" in card
    assert f"Weights: {words}" in rb['footnote'] and json.loads((tmp_path/'x'/'config.json').read_text())['igdmfast']['kept'].startswith(words)
    last = next(v for k, v in m['models'].items() if k.startswith('last epoch'))
    assert "The last epoch's weights (epoch 1, not exported), measured the same way on the same images:" in card
    for k in ('clean', 'pgd20'):
        ci = last['intervals'][k]
        w = binomial_ci(ci['correct'], ci['n'])
        assert f"| {last['numbers'][k]:.2f} | {ci['correct']} / {ci['n']} | {w['low']:.1f}–{w['high']:.1f} |" in card
