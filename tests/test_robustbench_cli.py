"""`igdmfast train --teacher NAME` (issue #16, item 2): a RobustBench teacher by name, found in RobustBench's layout.

The real checkpoints cannot be downloaded here, so the file holds fabricated (seeded random) weights of the right
architecture, saved as RobustBench saves them (a `module.`-prefixed `state_dict`). The data are 8x8 colour images
(the DM WideResNet runs on any size) so that the teacher's forwards stay cheap on a CPU; two training batches."""
import json, os, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import igdmfast.models  # noqa: F401 (registers dm_wrn28_10)
from igdmfast.models import ROBUSTBENCH_TEACHERS

NAME = 'Wang2023Better_WRN-28-10'


def fabricated(path, dataset='cifar10'):
    entry = ROBUSTBENCH_TEACHERS[dataset][NAME]
    torch.manual_seed(0)
    net = timm.create_model(entry['arch'], **entry['kwargs']).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({'state_dict': {f'module.{k}': v for k, v in net.state_dict().items()}}, path)
    return net


def test_train_with_a_robustbench_teacher_by_name(tmp_path):
    net = fabricated(tmp_path/'models'/'cifar10'/'Linf'/f'{NAME}.pt')
    rng = np.random.default_rng(0)
    data = tmp_path/'colour8.npz'
    np.savez(data, x_train=rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8), y_train=np.arange(10),
             x_test=rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8), y_test=np.arange(10))
    out = tmp_path/'run'
    r = subprocess.run([sys.executable, '-m', 'igdmfast.cli', 'train', '--data', str(data), '--teacher', NAME,
                        '--teacher-dir', str(tmp_path/'models'), '--method', 'ard', '--epochs', '1', '--bs', '5', '--steps', '1',
                        '--n-aa', '0', '--device', 'cpu', '--out', str(out)],
                       capture_output=True, text=True, timeout=900, env=dict(os.environ, MPLBACKEND='Agg'))
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((out/'config.json').read_text())
    assert cfg['teacher'] == NAME and cfg['teacher_dir'] == str(tmp_path/'models')
    assert len((out/'history.csv').read_text().splitlines()) == 2   # one epoch of two batches (10 images, --bs 5)
    # the teacher the run evaluated is the file's network: its clean accuracy, computed here from the weights
    from igdmfast.data import load_npz
    x = torch.from_numpy(load_npz(data)['x_test']).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad(): acc = (net(x).argmax(1) == torch.arange(10)).float().mean().item() * 100
    teacher_row = next(v for k, v in json.loads((out/'metrics.json').read_text())['models'].items() if k.startswith('teacher'))
    assert teacher_row['numbers']['clean'] == pytest.approx(acc)


def test_a_missing_robustbench_file_names_the_path(tmp_path, capsys, monkeypatch):
    from igdmfast.cli import main
    monkeypatch.chdir(tmp_path)
    code = main(['train', '--data', 'cifar100', '--teacher', NAME, '--teacher-dir', str(tmp_path/'tm'), '--out', str(tmp_path/'o')])
    err = capsys.readouterr().err
    assert code == 2 and str(tmp_path/'tm'/'cifar100'/'Linf'/f'{NAME}.pt') in err and 'load_model' in err, err
    assert not (tmp_path/'o').exists()


def test_a_teacher_that_is_neither_file_nor_name(tmp_path, capsys, monkeypatch):
    from igdmfast.cli import main
    monkeypatch.chdir(tmp_path)
    assert main(['train', '--teacher', 'Wang2023Beter', '--out', str(tmp_path/'o')]) == 2
    assert 'RobustBench name' in capsys.readouterr().err
