"""Nothing lost, nothing mixed (issue #25, items 1, 2, 4, 5, 8, 9, 11, 14): run folders, resumes, early refusals, messages.

Each test is the issue's reproduction: it failed on the main of that day and passes now.
- `--force` never touches another run kept in a subfolder, finished or running (holding its lock) (1), and removes only
  the files the command writes, as its manifest lists them; an older folder without one loses only those names (2).
- A resume refuses what it would mix: `compare`'s cached evaluations under other `--n-aa`/`--n-curve` (4), another
  teacher file at the same path (5, its sha256 in config.json).
- Refused before anything trains: a student that cannot take the images (8), a seed out of range (9).
- `eval`: its refusal names no `--resume` (it has none), and two models of the same name get two folders (11).
- Item 14's messages: fewer training images than classes, a truncated checkpoint on `--resume`, `--milestones ,`,
  and the same file mode for every file of a run.
"""
import contextlib, fcntl, json, os, shutil, stat
from pathlib import Path

os.environ.setdefault('MPLBACKEND', 'Agg')
import pytest

from igdmfast.cli import RunFolder, CLIError, LOCK_FILE
from igdmfast.runs import MANIFEST_FILE, parse_schedule
from test_cli_safety import F, teacher, listing, run_main


@contextlib.contextmanager
def held(folder):
    "Hold `folder`'s lock as a running command does (another open file, so the command under test cannot take it)."
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder/LOCK_FILE, 'a+') as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB); f.write('4242\n'); f.flush()
        yield


def removed_line(out:str)->str:
    "The `--force: removed ...` line of a command's output ('' when there is none)."
    return next((l for l in out.splitlines() if l.startswith('--force: removed')), '')


@pytest.fixture(scope='module')
def nest(tmp_path_factory):
    "`igdmfast teacher` in nest/, then a finished `igdmfast train` from its teacher in nest/rslad/ (the issue's layout)."
    root = tmp_path_factory.mktemp('nest')
    mp = pytest.MonkeyPatch()
    try:
        assert run_main(['teacher', *F, '--out', 'nest'], mp, root) == 0
        assert run_main(['train', *F, '--method', 'rslad', '--teacher', 'nest/teacher.pt', '--out', 'nest/rslad'], mp, root) == 0
    finally: mp.undo()
    return root/'nest'


# ------------------------------------------------------------------------------------------------ 1, 2: --force

def test_force_of_a_parent_leaves_the_runs_in_its_subfolders_alone(nest, tmp_path, monkeypatch, capsys):
    "nest/rslad (finished) and nest/ard (running: it holds its lock) are untouched by `teacher --force` and `train --force` of nest."
    d = tmp_path/'nest'; shutil.copytree(nest, d)
    t = teacher(tmp_path/'t.pt')
    with held(d/'ard'):
        (d/'ard'/'config.json').write_text(json.dumps(dict(command='train', method='ard')))
        (d/'ard'/'checkpoint.pt').write_bytes(b'epoch 1'); (d/'ard'/'history.csv').write_text('epoch\n0\n')
        before = {s: listing(d/s) for s in ('rslad', 'ard')}
        assert before['rslad'] and 'student.pt' in before['rslad']
        for argv in (['teacher', *F, '--out', str(d), '--force'], ['train', *F, '--teacher', str(t), '--out', str(d), '--force']):
            capsys.readouterr()
            assert run_main(argv, monkeypatch, tmp_path) == 0, capsys.readouterr().err
            line = removed_line(capsys.readouterr().out)
            assert line and 'rslad' not in line and 'ard/' not in line, line
            assert {s: listing(d/s) for s in ('rslad', 'ard')} == before   # every file, byte for byte
        assert json.loads((d/'config.json').read_text())['command'] == 'train'


def test_compare_force_refuses_a_variant_folder_another_command_holds(tmp_path):
    d = tmp_path/'cmp'
    cfg = dict(command='compare', methods=['ard'], seeds=[0], teacher='t.pt')
    with RunFolder(d) as rf:
        rf.claim(cfg); (d/'ard').mkdir(); (d/'ard'/'student.pt').write_bytes(b'variant')
    with held(d/'ard'):
        with pytest.raises(CLIError, match=r'cmp/ard is in use by another igdmfast command \(process 4242\)'):
            with RunFolder(d, force=True) as rf: rf.claim(cfg)
    assert (d/'ard'/'student.pt').read_bytes() == b'variant' and (d/'config.json').is_file()


def test_force_removes_only_the_files_the_command_writes(nest, tmp_path, monkeypatch, capsys):
    "A user's compare.md and result.json in a train folder (names `train` never writes) survive `train --force`."
    d = tmp_path/'run'; shutil.copytree(nest/'rslad', d)
    assert 'student.pt' in json.loads((d/MANIFEST_FILE).read_text())   # what the run wrote
    (d/'compare.md').write_text('my comparison'); (d/'result.json').write_text('{"mine": 1}')
    (d/'sub').mkdir(); (d/'sub'/'student.pt').write_bytes(b'mine')
    mine = {k: v for k, v in listing(d).items() if k in ('compare.md', 'result.json', 'sub/student.pt')}
    argv = ['train', *F, '--method', 'ard', '--teacher', str(nest/'teacher.pt'), '--out', str(d), '--force']
    assert run_main(argv, monkeypatch, tmp_path) == 0, capsys.readouterr().err
    line = removed_line(capsys.readouterr().out)
    assert 'student.pt' in line and not any(k in line for k in ('compare.md', 'result.json', 'sub/')), line
    assert all(listing(d).get(k) == v for k, v in mine.items())


def test_an_older_folder_without_manifest_loses_only_the_names_its_command_writes(tmp_path):
    d = tmp_path/'old'; (d/'rslad').mkdir(parents=True)
    (d/'config.json').write_text(json.dumps(dict(command='train', teacher='t.pt')))
    for f in ('student.pt', 'checkpoint.pt', 'compare.md', 'result.json', 'notes.txt'): (d/f).write_text(f)
    (d/'rslad'/'config.json').write_text(json.dumps(dict(command='train'))); (d/'rslad'/'student.pt').write_text('x')
    with RunFolder(d, force=True) as rf: rf.claim(dict(command='train', teacher='t.pt'))
    assert sorted(p.name for p in d.iterdir() if not p.name.startswith('.')) == ['compare.md', 'config.json', 'notes.txt',
                                                                               'result.json', 'rslad']
    assert sorted(p.name for p in (d/'rslad').iterdir()) == ['config.json', 'student.pt']


def test_a_file_the_earlier_run_did_not_write_is_refused_not_overwritten(nest, tmp_path):
    "`compare --force` on a train folder holding the user's compare.md: refused, nothing removed."
    d = tmp_path/'run'; shutil.copytree(nest/'rslad', d); (d/'compare.md').write_text('mine')
    before = listing(d)
    with pytest.raises(CLIError, match=r'holds compare.md, which the earlier run there did not write'):
        with RunFolder(d, force=True) as rf: rf.claim(dict(command='compare', methods=['ard'], seeds=[0], teacher='t.pt'))
    assert listing(d) == before


# ------------------------------------------------------------------------------------------------ 4, 5: resumes that would mix

def test_compare_resume_refuses_other_evaluation_settings(nest, tmp_path, monkeypatch, capsys):
    out = tmp_path/'cmp'
    argv = ['compare', *F, '--methods', 'ard', '--n-curve', '0', '--teacher', str(nest/'teacher.pt'), '--out', str(out)]
    assert run_main(argv, monkeypatch, tmp_path) == 0, capsys.readouterr().err
    before = listing(out)
    capsys.readouterr()
    assert run_main(argv + ['--n-aa', '5', '--n-curve', '10', '--resume'], monkeypatch, tmp_path) == 2   # the last value counts
    err = capsys.readouterr().err
    assert 'n_aa: 0 there, 5 now' in err and 'n_curve: 0 there, 10 now' in err and 'reuses those results' in err, err
    assert listing(out) == before   # nothing mixed: compare.md and every result.json as they were


def test_resume_refuses_another_teacher_file_at_the_same_path(tmp_path, monkeypatch, capsys):
    t = teacher(tmp_path/'myteacher.pt'); out = tmp_path/'s1'
    argv = ['train', *F, '--method', 'ard', '--teacher', str(t), '--out', str(out)]
    assert run_main(argv, monkeypatch, tmp_path) == 0, capsys.readouterr().err
    cfg = json.loads((out/'config.json').read_text())
    assert len(cfg['teacher_sha256']) == 64
    before = listing(out)
    import torch, timm
    from igdmfast.models import save_weights
    torch.manual_seed(1)   # the same architecture, other weights: other bytes at the same path
    save_weights(timm.create_model('small_cnn', num_classes=10, in_chans=1, width=4), t, arch='small_cnn')
    capsys.readouterr()
    assert run_main(argv + ['--resume'], monkeypatch, tmp_path) == 2
    err = capsys.readouterr().err
    assert f"the teacher file: sha256 {cfg['teacher_sha256'][:12]}" in err and 'give the teacher file it was distilled from' in err, err
    assert 'Resuming' not in capsys.readouterr().out and listing(out) == before


# ------------------------------------------------------------------------------------------------ 8, 9: refused before training

def test_a_student_that_cannot_take_the_images_is_refused_before_the_teacher_trains(tmp_path, monkeypatch, capsys):
    out = tmp_path/'v'
    assert run_main(['train', *F, '--student', 'vit_tiny_patch16_224', '--out', str(out)], monkeypatch, tmp_path) == 2
    cap = capsys.readouterr()
    assert '--student vit_tiny_patch16_224 cannot classify the digits images (1x8x8' in cap.err and 'Nothing was trained' in cap.err
    assert 'Training a robust teacher' not in cap.out and not out.exists()   # nothing trained, nothing claimed


@pytest.mark.parametrize('argv', [['compare', '--seeds', '99999999999999999999'], ['train', '--seed', '99999999999999999999'],
                                  ['eval', 'student.pt', '--seed', str(2**32)]])
def test_a_seed_out_of_range_is_refused_with_the_other_options(argv, tmp_path, monkeypatch, capsys):
    (tmp_path/'student.pt').write_bytes(b'x')   # refused before the file is read
    assert run_main([*argv, '--out', str(tmp_path/'x'), '--device', 'cpu'], monkeypatch, tmp_path) == 2
    err = capsys.readouterr().err
    assert 'a seed must be a non-negative integer of at most 4294967295' in err and 'Overflow' not in err, err
    assert not (tmp_path/'x').exists()


# ------------------------------------------------------------------------------------------------ 11: eval's folder

def test_eval_default_folders_of_two_models_of_the_same_name_differ(nest, tmp_path, monkeypatch, capsys):
    for exp in ('expA', 'expB'): (tmp_path/exp/'run').mkdir(parents=True); shutil.copy(nest/'rslad'/'student.pt', tmp_path/exp/'run')
    for exp in ('expA', 'expB'):
        argv = ['eval', f'{exp}/run/student.pt', '--attacks', 'clean', '--n', '20', '--device', 'cpu']
        assert run_main(argv, monkeypatch, tmp_path) == 0, capsys.readouterr().err
    folders = sorted(p.parent for p in (tmp_path/'runs'/'eval').glob('*/report.md'))
    assert len(folders) == 2 and all(p.name.startswith('run-student-') for p in folders), folders
    capsys.readouterr()
    assert run_main(argv, monkeypatch, tmp_path) == 2   # the same model again: its folder holds its evaluation
    err = capsys.readouterr().err
    assert 'holds another run' in err and '--force' in err and '--resume' not in err, err


# ------------------------------------------------------------------------------------------------ 14: messages

def test_fewer_training_images_than_classes_is_named_as_such(tmp_path, monkeypatch, capsys):
    argv = ['train', *F, '--n-train', '5', '--bs', '2', '--out', str(tmp_path/'x')]
    assert run_main(argv, monkeypatch, tmp_path) == 2
    err = capsys.readouterr().err
    assert 'n_train=5 keeps fewer training images than digits has classes (10)' in err and '--n-train 10' in err, err
    assert 'Check the label files' not in err


def test_a_truncated_checkpoint_on_resume_says_what_to_do(nest, tmp_path, monkeypatch, capsys):
    d = tmp_path/'run'; shutil.copytree(nest/'rslad', d)
    ck = d/'checkpoint.pt'; ck.write_bytes(ck.read_bytes()[:1000])
    argv = ['train', *F, '--method', 'rslad', '--teacher', 'nest/teacher.pt', '--out', str(d), '--resume']
    assert run_main(argv, monkeypatch, nest.parent) == 2
    err = capsys.readouterr().err
    assert 'truncated or corrupted' in err and 'rerun with --force instead of --resume' in err, err


def test_milestones_that_list_no_epoch_are_refused():
    with pytest.raises(CLIError, match='lists no epoch'): parse_schedule('paper', ',', 10)


def test_every_file_of_a_run_has_the_same_mode(nest):
    um = os.umask(0); os.umask(um)
    modes = {str(p.relative_to(nest)): stat.S_IMODE(p.stat().st_mode) for p in nest.rglob('*') if p.is_file() and p.name != LOCK_FILE}
    assert set(modes.values()) == {0o666 & ~um}, modes   # metrics.json, config.json, teacher.pt were 0600


def test_resume_refuses_another_natural_teacher_file_at_the_same_path(tmp_path, monkeypatch, capsys):
    "MTARD's second teacher is held to the same rule as the first: its sha256 in config.json, other bytes refused on --resume."
    t, nat, out = teacher(tmp_path/'robust.pt'), teacher(tmp_path/'natural.pt'), tmp_path/'m1'
    argv = ['train', *F, '--method', 'mtard', '--no-igdm', '--teacher', str(t), '--nat-teacher', str(nat), '--out', str(out)]
    assert run_main(argv, monkeypatch, tmp_path) == 0, capsys.readouterr().err
    cfg = json.loads((out/'config.json').read_text())
    assert len(cfg['nat_teacher_sha256']) == 64
    before = listing(out)
    import torch, timm
    from igdmfast.models import save_weights
    torch.manual_seed(1)   # the same architecture, other weights: other bytes at the same path
    save_weights(timm.create_model('small_cnn', num_classes=10, in_chans=1, width=4), nat, arch='small_cnn')
    capsys.readouterr()
    assert run_main(argv + ['--resume'], monkeypatch, tmp_path) == 2
    err = capsys.readouterr().err
    assert (f"the natural teacher file: sha256 {cfg['nat_teacher_sha256'][:12]}" in err
            and 'give the teacher files it was distilled from' in err and 'the teacher file: sha256' not in err), err
    assert listing(out) == before
