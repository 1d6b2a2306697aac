"The `igdmfast` command as a user runs it: subprocesses, offline, on the embedded data."
import json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest

EXE = [sys.executable, '-m', 'igdmfast.cli']
# Small settings shared by the quick runs: digits, 512 training and 100 validation images, 2 PGD steps.
FAST = ('--bs', '64', '--steps', '2', '--n-train', '512', '--n-valid', '100', '--n-aa', '0')


def run(*args, cwd=None, timeout=900):
    env = dict(os.environ, MPLBACKEND='Agg')
    return subprocess.run([*EXE, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def state(path):
    import torch
    return torch.load(path, weights_only=True)['state_dict']


def same_weights(a, b, params_only=False):
    keys = [k for k in a if not params_only or not any(s in k for s in ('running_', 'num_batches_tracked'))]
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and bool((a[k] == b[k]).all()) for k in keys)


@pytest.fixture(scope='module')
def teacher_pt(tmp_path_factory):
    "A robust teacher from `igdmfast teacher`, shared by the tests of this file."
    out = tmp_path_factory.mktemp('teacher') / 'run'
    r = run('teacher', *FAST, '--epochs', '3', '--out', str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out / 'teacher.pt'


@pytest.fixture(scope='module')
def small_run(tmp_path_factory, teacher_pt):
    "A finished small `igdmfast train` run from a given teacher."
    out = tmp_path_factory.mktemp('small') / 'run'
    args = ('train', *FAST, '--epochs', '2', '--method', 'ard', '--teacher', str(teacher_pt), '--seed', '1', '--out', str(out))
    r = run(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, args


def test_help_lists_options_with_defaults():
    r = run('train', '--help')
    assert r.returncode == 0
    for opt in ('--data', '--teacher', '--student', '--method', '--igdm', '--no-igdm', '--alpha', '--epochs', '--bs',
                '--lr', '--eps', '--step', '--steps', '--n-train', '--n-valid', '--seed', '--out', '--resume', '--force',
                '--device', '--bf16', '--debug'):
        assert opt in r.stdout
    assert '1/255' in r.stdout and 'default: digits' in r.stdout
    for cmd, opts in (('teacher', ('--arch', '--method', '--resume')), ('compare', ('--methods', '--n-curve', '--teacher')),
                      ('eval', ('--attacks', '--curve', '--teacher'))):
        r = run(cmd, '--help')
        assert r.returncode == 0 and all(o in r.stdout for o in opts), r.stdout


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / 'igdmfast'
    assert exe.exists(), 'pip install -e . should install the igdmfast console script'
    r = subprocess.run([str(exe), '--help'], capture_output=True, text=True)
    assert r.returncode == 0 and all(c in r.stdout for c in ('train', 'teacher', 'compare', 'eval'))


def test_teacher_command(teacher_pt):
    "`igdmfast teacher` writes a teacher that `load_teacher` (and `--teacher`) accept, with its report."
    from igdmfast.models import load_teacher
    out = teacher_pt.parent
    for f in ('teacher.pt', 'teacher_checkpoint.pt', 'teacher_history.csv', 'config.json', 'metrics.json', 'report.md',
              'training_curves.png'):
        assert (out / f).exists(), f
    model = load_teacher(teacher_pt)
    assert model.pretrained_cfg['architecture'] == 'small_cnn'
    assert json.loads((out / 'config.json').read_text())['teacher_method'] == 'pgd_at'
    n = json.loads((out / 'metrics.json').read_text())['models']['teacher (small_cnn, pgd_at)']['numbers']
    assert n['clean'] > 30 and n['pgd20'] <= n['clean'], n


def test_resumed_finished_teacher_keeps_its_evaluation(tmp_path, teacher_pt):
    "A finished teacher resumed with the same settings is neither trained nor evaluated again; another --n-aa re-evaluates."
    import shutil
    out = tmp_path / 'teacher'
    shutil.copytree(teacher_pt.parent, out)
    before = {f: (out / f).read_bytes() for f in ('teacher.pt', 'metrics.json', 'report.md')}
    r = run('teacher', *FAST, '--epochs', '3', '--out', str(out), '--resume')
    assert r.returncode == 0 and 'finished earlier' in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert 'Evaluating' not in r.stdout and all((out / f).read_bytes() == b for f, b in before.items())
    fast = [a for a in FAST if a not in ('--n-aa', '0')]
    r = run('teacher', *fast, '--n-aa', '4', '--epochs', '3', '--out', str(out), '--resume')
    assert r.returncode == 0 and 'finished earlier' not in r.stdout and 'Evaluating' in r.stdout, r.stdout[-2000:]
    m = json.loads((out / 'metrics.json').read_text())
    assert m['extra']['config']['n_aa'] == 4 and m['models']['teacher (small_cnn, pgd_at)']['numbers']['aa'] is not None
    assert (out / 'teacher.pt').read_bytes() == before['teacher.pt']


def test_compare_writes_both_rows_and_plots(tmp_path, teacher_pt):
    "Two methods with and without IGDM: the paper's layout, compare.json, side-by-side plots, resumable."
    args = ('compare', *FAST, '--epochs', '2', '--methods', 'ard,rslad', '--teacher', str(teacher_pt), '--n-curve', '40',
            '--out', str(tmp_path / 'c'))
    r = run(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / 'c'
    md = (out / 'compare.md').read_text()
    lines = [l.split('|')[1].strip() for l in md.splitlines() if l.startswith('| ') and not l.startswith('| Method')]
    assert lines[:5] == ['Teacher (teacher.pt)', 'ARD', '+IGDM', 'RSLAD', '+IGDM'], lines
    assert lines[5:] == ['ARD', 'RSLAD']   # the table of differences
    res = json.loads((out / 'compare.json').read_text())
    assert [(r['method'], r['igdm']) for r in res['rows']] == [('ard', False), ('ard', True), ('rslad', False), ('rslad', True)]
    for row in res['rows']:
        assert all(row[k] is not None for k in ('clean', 'fgsm', 'pgd20', 'cw', 'gd', 'gc', 'seconds_per_epoch')), row
        assert (row['alpha'] > 0) if row['igdm'] else row['alpha'] is None
    from PIL import Image
    for f in ('acc_vs_eps.png', 'grad_cosines.png'):
        w, h = Image.open(out / f).size
        assert w > 1.8 * h, (f, w, h)   # two panels side by side
    for v in ('ard', 'ard_igdm', 'rslad', 'rslad_igdm'):
        assert (out / v / 'student.pt').exists() and (out / v / 'history.csv').exists()
        curve = json.loads((out / v / 'result.json').read_text())['curve']   # at --eps 8: 0 to 16/255
        assert curve['eps'] == pytest.approx([k / 255 for k in (0, 2, 4, 6, 8, 12, 16)], abs=1e-12), curve['eps']
    h0 = (out / 'ard' / 'history.csv').read_text().splitlines()
    h1 = (out / 'ard_igdm' / 'history.csv').read_text().splitlines()
    assert len(h0) == len(h1) == 3
    again = run(*args, '--resume')   # a finished comparison resumes without training anything
    assert again.returncode == 0 and again.stdout.count('finished earlier') == 4, again.stdout[-2000:]


def test_curve_radii_span_twice_the_threat_radius():
    "The accuracy-vs-eps radii follow --eps: MNIST's 0.3 gets 0 to 0.6, not CIFAR's 0 to 16/255."
    from igdmfast.evaluate import curve_radii as _curve_radii
    assert _curve_radii(0.3) == pytest.approx([0, 0.075, 0.15, 0.225, 0.3, 0.45, 0.6], abs=1e-12)
    assert _curve_radii(8 / 255) == tuple(k / 255 for k in (0, 2, 4, 6, 8, 12, 16))


def test_seeded_runs_repeat(tmp_path, small_run):
    "The same command and seed give bit-identical weights and the same numbers."
    out, args = small_run
    b = run(*[a if a != str(out) else str(tmp_path / 'b') for a in args])
    assert b.returncode == 0, b.stderr[-2000:]
    ma = json.loads((out / 'metrics.json').read_text())
    mb = json.loads((tmp_path / 'b' / 'metrics.json').read_text())
    assert ma['models'] == mb['models'] and ma['alignment'] == mb['alignment']
    assert same_weights(state(out / 'student.pt'), state(tmp_path / 'b' / 'student.pt'))


def test_output_folder_of_another_run(tmp_path, small_run):
    "A folder that holds a run is refused, --resume with other settings is refused, --force starts over."
    out, args = small_run
    r = run(*args)
    assert r.returncode == 2 and 'holds another run' in r.stderr and '--resume' in r.stderr and 'Traceback' not in r.stderr
    other = [a if a != '1' else '2' for a in args]   # --seed 2
    r = run(*other, '--resume')
    assert r.returncode == 2 and 'seed: 1 there, 2 now' in r.stderr, r.stderr[-2000:]



def test_sigkill_mid_epoch_then_resume_gives_the_same_student(tmp_path, teacher_pt):
    "A run killed (SIGKILL) in the middle of an epoch and resumed ends with the weights of a run never killed."
    args = ('train', *FAST, '--epochs', '3', '--method', 'ard', '--teacher', str(teacher_pt))
    ref = run(*args, '--out', str(tmp_path / 'ref'))
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / 'killed'
    p = subprocess.Popen([*EXE, *args, '--out', str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env=dict(os.environ, MPLBACKEND='Agg'))
    deadline = time.time() + 600
    while not (out / 'checkpoint.pt').exists() and time.time() < deadline and p.poll() is None: time.sleep(0.05)
    time.sleep(0.5)   # into the second epoch
    assert p.poll() is None, 'the run ended before it could be killed'
    p.send_signal(signal.SIGKILL); p.wait()
    r = run(*args, '--out', str(out), '--resume')
    assert r.returncode == 0 and 'Resuming' in r.stdout, r.stderr[-2000:]
    assert same_weights(state(tmp_path / 'ref' / 'student.pt'), state(out / 'student.pt'))
    assert len((out / 'history.csv').read_text().splitlines()) == 4   # one row per epoch, none repeated
    history = (out / 'history.csv').read_text()
    again = run(*args, '--out', str(out), '--resume')   # resuming a finished run trains nothing and changes nothing
    assert again.returncode == 0, again.stderr[-2000:]
    assert same_weights(state(tmp_path / 'ref' / 'student.pt'), state(out / 'student.pt'))
    assert (out / 'history.csv').read_text() == history


def test_eval_command(tmp_path, small_run, teacher_pt):
    "igdmfast eval on a run folder's student: the paper's table, GD/GC against the teacher, the eps curve."
    out, _ = small_run
    r = run('eval', str(out / 'student.pt'), '--attacks', 'clean,fgsm,pgd20,cw', '--n', '64',
            '--teacher', str(teacher_pt), '--curve', '--out', str(tmp_path / 'e'))
    assert r.returncode == 0, r.stderr
    assert '| model | Clean | FGSM | PGD-20 | C&W∞ | AA | GD | GC |' in r.stdout
    for f in ('metrics.json', 'report.md', 'acc_vs_eps.png'): assert (tmp_path / 'e' / f).exists(), f
    m = json.loads((tmp_path / 'e' / 'metrics.json').read_text())['models']['student.pt']['numbers']
    assert m['pgd20'] <= m['clean'] and -1 <= m['gc'] <= 1 and m['gd'] >= 0, m
    cfg = json.loads((tmp_path / 'e' / 'metrics.json').read_text())['extra']['config']   # the report says how it was made
    assert cfg['command'] == 'eval' and cfg['n'] == 64 and cfg['attacks'] == ['clean', 'fgsm', 'pgd20', 'cw'], cfg
    assert set(cfg['versions']) >= {'igdmfast', 'torch', 'fastai', 'timm', 'python'}, cfg
    bad = run('eval', str(tmp_path / 'nope.pt'))
    assert bad.returncode == 2 and 'nope.pt' in bad.stderr and 'Traceback' not in bad.stderr


@pytest.mark.parametrize('cmd, args, message', [
    ('train', ('--eps', '0'), 'eps must be positive'),
    ('train', ('--eps', '300'), 'larger than 1'),
    ('train', ('--data', 'no_such_dataset'), 'no_such_dataset'),
    ('train', ('--data', 'missing_file.npz'), 'missing_file.npz'),
    ('train', ('--student', 'no_such_model'), 'no_such_model'),
    ('train', ('--method', 'mart'), 'Known methods'),
    ('train', ('--teacher', 'missing_teacher.pt'), 'missing_teacher.pt'),
    ('train', ('--alpha', '-1'), 'non-negative'),
    ('train', ('--epochs', '0'), 'epochs'),
    ('train', ('--device', 'cuda:7'), 'device'),
    ('teacher', ('--method', 'ard'), 'pgd_at or trades'),
    ('teacher', ('--arch', 'no_such_model'), 'no_such_model'),
    ('compare', ('--methods', 'ard,mart'), 'Known methods'),
    ('compare', ('--methods', ','), '--methods is empty'),
])
def test_bad_input_is_one_clear_line_and_leaves_no_run_folder(tmp_path, cmd, args, message):
    r = run(cmd, '--out', str(tmp_path / 'x'), *args)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert 'Traceback' not in r.stderr
    assert message in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / 'x').exists()   # nothing that a later --resume would trip on


# --------------------------------------------------------------------------- MTARD's second teacher (issue #30)

@pytest.fixture(scope='module')
def nat_teachers(tmp_path_factory):
    "A natural teacher (small_cnn trained 3 epochs on clean digits) and one for 5 classes, saved with their architecture."
    import timm, torch
    from fastai.learner import Learner
    import fastai.callback.progress, fastai.callback.schedule  # noqa: F401  (no_bar, fit_one_cycle)
    from igdmfast.core import seed_everything
    from igdmfast.data import get_dls
    from igdmfast.weights import save_weights
    import igdmfast.models  # noqa: F401  (small_cnn)
    d = tmp_path_factory.mktemp('nat')
    seed_everything(0)
    dls = get_dls('digits', bs=64, device='cpu', n_train=512, n_valid=100)
    learn = Learner(dls, timm.create_model('small_cnn', num_classes=10, in_chans=1), loss_func=torch.nn.CrossEntropyLoss())
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(3, 3e-3)
    save_weights(learn.model, d / 'nat.pt', arch='small_cnn')
    save_weights(timm.create_model('small_cnn', num_classes=5, in_chans=1), d / 'nat5.pt', arch='small_cnn')
    return d / 'nat.pt', d / 'nat5.pt'


def test_mtard_train_and_recalibrate(tmp_path, teacher_pt, nat_teachers):
    "`igdmfast train --method mtard --nat-teacher PATH`: the adaptive weight logged and checkpointed; recalibrate-bn reloads both teachers."
    import torch
    out = tmp_path / 'mtard'
    r = run('train', *FAST, '--epochs', '2', '--method', 'mtard', '--no-igdm', '--teacher', str(teacher_pt),
            '--nat-teacher', str(nat_teachers[0]), '--out', str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    head = (out / 'history.csv').read_text().splitlines()[0].split(',')
    assert 'nat_weight' in head
    w = [float(l.split(',')[head.index('nat_weight')]) for l in (out / 'history.csv').read_text().splitlines()[1:]]
    assert len(w) == 2 and all(0 < v < 1 for v in w) and w[0] != 0.5, w
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['method'] == 'mtard' and cfg['nat_teacher'] == str(nat_teachers[0]) and len(cfg['nat_teacher_sha256']) == 64, cfg
    ck = torch.load(out / 'checkpoint.pt', weights_only=True)
    assert abs(ck['callbacks']['method_state']['nat_weight'].item() - w[-1]) < 0.05
    rc = run('recalibrate-bn', str(out), '--out', str(tmp_path / 'recal'))
    assert rc.returncode == 0, rc.stderr[-3000:]


@pytest.mark.parametrize('cmd, args, message', [
    ('train', ('--method', 'mtard', '--no-igdm'), 'pass --nat-teacher PATH'),
    ('train', ('--method', 'ard', '--nat-teacher', '{nat}'), 'leave --nat-teacher out'),
    ('train', ('--method', 'mtard', '--nat-teacher', 'missing_nat.pt', '--no-igdm'), 'missing_nat.pt: no such file'),
    ('train', ('--method', 'mtard', '--nat-teacher', '{nat}'), 'no alpha for mtard; pass --alpha A, or --no-igdm'),
    ('compare', ('--methods', 'ard,mtard', '--nat-teacher', '{nat}'), 'no alpha for mtard'),
    ('train', ('--method', 'mtard', '--no-igdm', '--nat-teacher', '{nat5}', '--teacher', '{teacher}'),
     'natural teacher (small_cnn) outputs 5 classes but the student'),
    ('train', ('--method', 'saad', '--igdm-bn', 'keep'), "leave out --igdm-bn (it must be 'update')"),
])
def test_mtard_bad_inputs(tmp_path, teacher_pt, nat_teachers, cmd, args, message):
    fill = dict(nat=str(nat_teachers[0]), nat5=str(nat_teachers[1]), teacher=str(teacher_pt))
    r = run(cmd, *FAST, '--out', str(tmp_path / 'x'), *[a.format(**fill) for a in args])
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert 'Traceback' not in r.stderr and message in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / 'x').exists()


def test_saad_train(tmp_path, teacher_pt):
    "`igdmfast train --method saad`: its own IGDM term (α 1 by default, no additive column) and its SWA into student.pt."
    out = tmp_path / 'saad'
    r = run('train', *FAST, '--epochs', '2', '--method', 'saad', '--teacher', str(teacher_pt), '--out', str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    head = (out / 'history.csv').read_text().splitlines()[0].split(',')
    assert 'base_loss' in head and 'igdm_loss' not in head, head
    m = json.loads((out / 'metrics.json').read_text())
    assert m['extra']['config']['alpha_used'] == 1.0 and m['extra']['config']['method'] == 'saad'
