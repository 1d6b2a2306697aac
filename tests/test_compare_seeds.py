"""`igdmfast compare --seeds` end to end (issue #18, items 1-2): one resumable run per (method, ±IGDM, seed), killed
mid-grid and resumed without rerunning finished variants; `compare.json` lists its seeds and carries the per-seed
numbers and their aggregate, which is checked here against a hand computation from the variants' own `result.json`."""
import json, os, signal, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

EXE = [sys.executable, '-m', 'igdmfast.cli']
ARGS = ['compare', '--methods', 'ard', '--seeds', '0,1', '--epochs', '2', '--steps', '1', '--n-train', '96', '--n-valid', '40',
        '--bs', '32', '--n-aa', '0', '--n-curve', '0', '--device', 'cpu']


def run(*args):
    return subprocess.run([*EXE, *args], capture_output=True, text=True, timeout=900, env=dict(os.environ, MPLBACKEND='Agg'))


def test_compare_seeds_killed_mid_grid_resumes_and_aggregates(tmp_path):
    out = tmp_path/'cmp'
    p = subprocess.Popen([*EXE, *ARGS, '--out', str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, MPLBACKEND='Agg'))
    first = out/'seed0'/'ard'/'result.json'
    deadline = time.time() + 600
    while not first.exists() and p.poll() is None and time.time() < deadline: time.sleep(0.05)
    assert p.poll() is None, f'the comparison ended before it could be killed: {p.stderr.read()[-2000:]}'
    p.send_signal(signal.SIGKILL); p.wait()
    kept = first.read_bytes(); mtime = first.stat().st_mtime_ns
    assert not (out/'compare.json').exists()

    r = run(*ARGS, '--out', str(out), '--resume')
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'seed0/ard: finished earlier (result.json), kept.' in r.stdout
    assert first.read_bytes() == kept and first.stat().st_mtime_ns == mtime   # not rerun

    res = json.loads((out/'compare.json').read_text())
    assert res['seeds'] == [0, 1] and res['config']['seeds'] == [0, 1]
    assert sorted((row['seed'], row['igdm']) for row in res['rows']) == [(0, False), (0, True), (1, False), (1, True)]
    # every variant is its own run, seeded with its seed
    for s in (0, 1):
        for v, ig in (('ard', False), ('ard_igdm', True)):
            cfg = json.loads((out/f'seed{s}'/v/'config.json').read_text())
            assert (cfg['seed'], cfg['igdm'], cfg['method']) == (s, ig, 'ard')
    # the aggregate against a hand computation from the variants' result.json
    val = lambda s, v, k: json.loads((out/f'seed{s}'/v/'result.json').read_text())[k]
    agg = res['aggregate']
    diff = next(d for d in agg['differences'] if d['method'] == 'ard')['metrics']
    for k in ('clean', 'pgd20', 'gc'):
        d = np.array([val(s, 'ard_igdm', k) - val(s, 'ard', k) for s in (0, 1)])
        assert diff[k]['diffs'] == pytest.approx(d.tolist(), abs=1e-12)
        assert diff[k]['mean'] == pytest.approx(d.mean(), abs=1e-12)
        if d.std(ddof=1) > 0:
            lo, hi = stats.t.interval(0.95, 1, loc=d.mean(), scale=d.std(ddof=1) / np.sqrt(2))
            assert (diff[k]['low'], diff[k]['high']) == pytest.approx((lo, hi), abs=1e-9)
        var = next(v for v in agg['variants'] if v['method'] == 'ard' and not v['igdm'])['metrics'][k]
        assert var['mean'] == pytest.approx(np.mean([val(s, 'ard', k) for s in (0, 1)]), abs=1e-12)
    md = (out/'compare.md').read_text()
    assert 'Over seeds' in md and 'paired t' in md and (out/'seeds.png').is_file()

    # a finished comparison resumed again reruns nothing and gives the same aggregate
    again = run(*ARGS, '--out', str(out), '--resume')
    assert again.returncode == 0 and again.stdout.count('finished earlier') == 4, again.stderr[-2000:]
    assert json.loads((out/'compare.json').read_text())['aggregate'] == agg


def test_a_single_seed_says_no_interval_can_be_given(tmp_path):
    out = tmp_path/'one'
    r = run(*[a if a != '0,1' else '3' for a in ARGS], '--out', str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out/'compare.json').read_text())
    assert res['seeds'] == [3] and json.loads((out/'ard'/'config.json').read_text())['seed'] == 3   # the single-seed layout
    assert 'no interval' in (out/'compare.md').read_text().lower()


@pytest.mark.parametrize('seeds, msg', [('0,x', 'comma-separated non-negative integers'), ('1,1', 'lists a seed twice'),
                                        ('-1', 'comma-separated non-negative integers')])
def test_bad_seeds_are_refused(seeds, msg, tmp_path, capsys, monkeypatch):
    from igdmfast.cli import main
    monkeypatch.chdir(tmp_path)
    assert main(['compare', '--seeds', seeds, '--out', str(tmp_path/'x')]) == 2
    assert msg in capsys.readouterr().err and not (tmp_path/'x').exists()
