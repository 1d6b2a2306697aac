"""`igdmfast recalibrate-bn` (issue #26): a trained student's BatchNorm running statistics recomputed on a run folder.
Post-hoc on an `--igdm-bn update` run it gives, bit for bit, the student of the same run trained with
`--igdm-bn recalibrate` (whose fit ends with the same pass), and it refuses what it cannot use."""
import json
import pytest
import torch
from igdmfast.cli import main
from igdmfast.models import read_checkpoint

F = ['--epochs', '1', '--steps', '2', '--n-aa', '0', '--n-train', '96', '--n-valid', '40', '--bs', '32', '--device', 'cpu',
     '--method', 'ard', '--igdm', '--alpha', '5', '--seed', '3']

def run_main(argv, monkeypatch, cwd):
    monkeypatch.chdir(cwd)
    try: return main(argv)
    except SystemExit as e: return e.code

def state(path): return read_checkpoint(path)[0]

def test_post_hoc_equals_the_training_variant(tmp_path, monkeypatch):
    assert run_main(['train', *F, '--igdm-bn', 'update', '--out', 'up'], monkeypatch, tmp_path) == 0
    assert run_main(['train', *F, '--igdm-bn', 'recalibrate', '--out', 'rc'], monkeypatch, tmp_path) == 0
    assert run_main(['recalibrate-bn', 'up', '--out', 'post'], monkeypatch, tmp_path) == 0
    up, rc, post = (state(tmp_path/d/'student.pt') for d in ('up', 'rc', 'post'))
    assert up.keys() == rc.keys() == post.keys()
    assert all(torch.equal(rc[k], post[k]) for k in rc)                                  # the same pass, bit for bit
    moved = [k for k in up if not torch.equal(up[k], post[k])]
    assert moved and all(k.split('.')[-1] in ('running_mean', 'running_var', 'num_batches_tracked') for k in moved)
    meta = read_checkpoint(tmp_path/'post'/'student.pt')[1]['meta']
    assert meta['recalibrated_bn'] == 'adv' and meta['method'] == 'ard'
    assert json.loads((tmp_path/'post'/'config.json').read_text())['command'] == 'recalibrate-bn'
    assert run_main(['recalibrate-bn', 'up', '--on', 'clean', '--out', 'clean'], monkeypatch, tmp_path) == 0
    clean = state(tmp_path/'clean'/'student.pt')
    assert not torch.equal(clean['features.0.1.running_mean' if 'features.0.1.running_mean' in clean else moved[0]],
                           post['features.0.1.running_mean' if 'features.0.1.running_mean' in post else moved[0]])

@pytest.mark.parametrize('args, msg', [
    (['recalibrate-bn', 'nowhere', '--out', 'o'], "nowhere is not a finished train run: it needs config.json and student.pt"),
    (['recalibrate-bn', 'nowhere'], "igdmfast recalibrate-bn needs --out DIR"),
    (['recalibrate-bn', 'nowhere', '--on', 'test', '--out', 'o'], "--on must be one of clean, adv, got 'test'"),
])
def test_refusals(tmp_path, monkeypatch, capsys, args, msg):
    assert run_main(args, monkeypatch, tmp_path) == 2
    assert msg in capsys.readouterr().err and not (tmp_path/'o').exists()
