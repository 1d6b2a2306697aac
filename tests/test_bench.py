"""The benchmarks' own correctness, never their timings: the plain-PyTorch reference step of bench/ (written the way the
official IGDM scripts are) and igdmfast's Learner step compute the same loss, gradients and x′ in float64, with and
without conv→BN folding; and each `bench/*.py` script runs end to end on a tiny setting and prints its table."""
import argparse, re, sys
from pathlib import Path
import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / 'bench'
sys.path.insert(0, str(BENCH))
import bench_step, bench_efficiency, bench_eval, bench_table6   # noqa: E402
from _common import models, images   # noqa: E402


@pytest.mark.parametrize('method', ['rslad', 'adaad'])
def test_reference_and_igdmfast_same_math(method):
    "One step each from the same weights, batch and seed, in float64: the same x′, loss and gradients."
    args = argparse.Namespace(bs=16, classes=10, batches=1)
    teacher, student = models(10, 0)
    x, y = images(16, 10, 0)
    dev = torch.device('cpu')
    r = bench_step.ref_once(method, teacher, student, x, y, args, dev, torch.float64, 7)
    for opts in ({}, dict(fold_bn=False)):
        e = bench_step.errors(bench_step.lib_once(method, teacher, student, x, y, args, dev, torch.float64, 7, **opts), r)
        assert e['x_adv'] == 0 and e['loss'] < 1e-10 and e['grad'] < 1e-9, (opts, e)
    # the check can fail: another α gives another loss
    bench_step.ALPHA[method] *= 2
    try: e = bench_step.errors(bench_step.lib_once(method, teacher, student, x, y, args, dev, torch.float64, 7), r)
    finally: bench_step.ALPHA[method] /= 2
    assert e['loss'] > 1e-6


def test_bench_step_runs(capsys):
    bench_step.main(['--bs', '16', '--classes', '10', '--batches', '1', '--repeats', '1', '--no-memory', '--methods', 'adaad'])
    out = capsys.readouterr().out
    assert 'float64: igdmfast vs reference' in out and 'SAME' in out and 'DIFFERENT' not in out
    assert re.search(r'adaad\+igdm\s+reference', out) and re.search(r'adaad\+igdm\s+igdmfast', out), out


def test_bench_efficiency_runs(capsys):
    bench_efficiency.main(['--bs', '16', '--classes', '10', '--batches', '1', '--repeats', '1', '--methods', 'rslad'])
    out = capsys.readouterr().out
    assert 'efficiency' in out and 'rslad+igdm' in out


def test_bench_eval_runs(capsys, tmp_path):
    bench_eval.main(['--n', '16', '--eval-bs', '16', '--train-epochs', '1', '--repeats', '1', '--aa-version', 'custom',
                     '--aa-attacks', 'apgd-ce', '--json', str(tmp_path / 'eval.json')])
    out = capsys.readouterr().out
    assert 'PGD-20' in out and 'AutoAttack' in out
    assert (tmp_path / 'eval.json').exists()


def test_bench_table6_runs(capsys):
    "The four Table 6 variants on the grid's teacher, each fitted once: a row each, AdaAD's ratio exactly 1."
    rows = bench_table6.main(['--n-train', '256', '--epochs', '1', '--repeats', '1'])
    out = capsys.readouterr().out
    assert [r['variant'] for r in rows] == list(bench_table6.VARIANTS) and rows[0]['vs_adaad'] == 1.0
    assert all(r['s_per_epoch'] > 0 for r in rows) and 'teacher-free inner + IGDM' in out and 'cpu' in out
