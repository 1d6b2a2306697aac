"""Multi-process training through fastai's distrib_ctx (accelerate, gloo on the CPU): two processes keep identical
students, match one process on the same global batch, and the command line writes one run folder."""
import json, os, subprocess, sys
from pathlib import Path
import pytest
import torch

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def torchrun(args, cwd, timeout=600):
    "Start `args` on 2 CPU processes with torchrun (a free local port, one thread each)."
    env = dict(os.environ, OMP_NUM_THREADS='1', MPLBACKEND='Agg')
    return subprocess.run([str(BIN/'torchrun'), '--standalone', '--nproc_per_node', '2', *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='module')
def fits(tmp_path_factory):
    "The same 2-epoch IGDM fit on 2 processes of batch 8 and on 1 process of batch 16 (one global batch per epoch)."
    two, one, halves = (tmp_path_factory.mktemp(n) for n in ('two', 'one', 'halves'))
    r = torchrun([str(HERE/'_distributed_fit.py'), str(two), '8'], cwd=two)
    assert r.returncode == 0, r.stderr[-4000:]
    for d, bs in ((one, '16'), (halves, '8')):   # halves: one process, the batch of 8 twice per epoch (what no DDP would do)
        r = subprocess.run([sys.executable, str(HERE/'_distributed_fit.py'), str(d), bs], capture_output=True, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=600)
        assert r.returncode == 0, r.stderr[-4000:]
    load = lambda d, r: (torch.load(d/f'student_rank{r}.pt'), json.loads((d/f'log_rank{r}.json').read_text()))
    groups = [json.loads((two/f'group_rank{r}.json').read_text()) for r in (0, 1)]
    return dict(rank0=load(two, 0), rank1=load(two, 1), single=load(one, 0), halves=load(halves, 0), groups=groups)


def max_diff(a, b): return max((a[k] - b[k]).abs().max().item() for k in a)


def test_ranks_hold_the_same_student(fits):
    (s0, _), (s1, _) = fits['rank0'], fits['rank1']
    assert s0.keys() == s1.keys()
    for k in s0: assert torch.equal(s0[k], s1[k]), k   # DDP averages the gradients: bit-identical updates


def test_two_processes_match_one_on_the_global_batch(fits):
    (s2, log2), (s1, log1) = fits['rank0'], fits['single']
    assert max_diff(s1, s2) < 1e-5, max_diff(s1, s2)
    # the logged values are gathered over the processes: the validation loss and accuracy of all 8 images, and the
    # training components (base loss and IGDM loss) of the whole global batch
    for a, b in zip(log2, log1):
        for k in ('valid_loss', 'accuracy', 'base_loss', 'igdm_loss', 'igdm_weight'):
            assert abs(a[k] - b[k]) < 1e-5 * max(1, abs(b[k])), (k, a[k], b[k])


def test_every_rank_leaves_the_process_group_at_exit(fits):
    "A gloo process still in its group at the interpreter's teardown can abort (SIGABRT); the exit handlers leave it."
    assert fits['groups'] == [dict(left_at_exit=True)] * 2


def test_the_comparison_can_fail(fits):
    "Steps on the halves of the batch one after the other (what two processes without DDP amount to) end elsewhere."
    assert max_diff(fits['single'][0], fits['halves'][0]) > 1e-3


def test_cli_on_two_processes_writes_one_run_folder(tmp_path):
    r = torchrun(['-m', 'igdmfast.cli', 'train', '--epochs', '2', '--n-aa', '0', '--n-train', '512', '--out', 'run'], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ['run']   # nothing written elsewhere by the other rank
    run = tmp_path/'run'
    for f in ('config.json', 'history.csv', 'teacher_history.csv', 'student.pt', 'teacher.pt', 'checkpoint.pt', 'metrics.json', 'report.md'):
        assert (run/f).is_file(), f
    rows = (run/'history.csv').read_text().splitlines()
    assert [l.split(',')[0] for l in rows[1:]] == ['0', '1']   # one CSV row per epoch: one logger, on rank 0
    assert r.stdout.count('| model | Clean |') == 1 and r.stdout.count('Distilling into') == 1   # rank 0 prints
    from igdmfast.models import load_teacher
    student = load_teacher(run/'student.pt')
    assert sum(p.numel() for p in student.parameters()) > 0
    assert json.loads((run/'metrics.json').read_text())
