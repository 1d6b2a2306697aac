"experiments/paper: every command of the paper's CIFAR-100 tables parses, builds its configuration and trains two batches."
import importlib.util, math, sys
from pathlib import Path
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location('paper', ROOT / 'experiments' / 'paper' / 'paper.py')
paper = importlib.util.module_from_spec(spec); sys.modules['paper'] = paper; spec.loader.exec_module(paper)


@pytest.fixture(scope='module')
def teachers(tmp_path_factory):
    "Stand-in teachers of the right architectures, saved as bare state dicts like RobustBench's files, loaded once."
    from igdmfast.cli import _teacher_arg
    d = tmp_path_factory.mktemp('teachers')
    files = {k: paper.stand_in_teacher(d / f'{file}.pt', arch) for k, (file, arch) in paper.TEACHERS.items()}
    return {k: (f, _teacher_arg(f, 'cpu', paper.TEACHERS[k][1])) for k, f in files.items()}


def test_commands_sh_is_current():
    assert (ROOT / 'experiments' / 'paper' / 'commands.sh').read_text() == paper.commands_sh(), \
        'run `python experiments/paper/paper.py --write`'


def test_rows_cover_both_tables():
    rows = paper.rows()
    assert len(rows) == 2 * len(paper.TEACHERS) * len(paper.METHODS) * 2
    assert {r.student for r in rows} == {'resnet18', 'mobilenetv2'}
    assert len({r.name for r in rows}) == len(rows)   # one run folder per row


@pytest.mark.parametrize('row', paper.rows(), ids=lambda r: r.name)
def test_dry_run(row, teachers):
    file, model = teachers[row.teacher]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = paper.dry_run(row, file, teacher=model)
    assert len(res['losses']) == 2 and all(math.isfinite(l) for l in res['losses']), res
    assert res['alpha'] == (paper.ALPHA_TABLE[('cifar100', row.student, row.teacher)][row.method] if row.igdm else None)
    assert res['opt'] == 'Optimizer' and res['lr'] == 0.1 and res['epochs'] == row.epochs
    assert res['milestones'] == list(row.milestones)   # the decays land on exactly the paper's epochs
    assert res['threat'].eps == 8 / 255 and res['threat'].step_size == 2 / 255 and res['threat'].n_steps == 10
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # the teacher is never changed
