"""MTARD on two processes (torchrun, gloo, CPU): the adaptive weight is the global batch's, the same on every rank and
the same as one process on that batch (issue #30 item 3)."""
import json, os, subprocess, sys
from pathlib import Path
import torch
from test_distributed import torchrun, max_diff

HERE = Path(__file__).resolve().parent


def test_two_processes_move_the_weight_of_the_global_batch(tmp_path):
    two, one = tmp_path/'two', tmp_path/'one'
    two.mkdir(); one.mkdir()
    r = torchrun([str(HERE/'_distributed_mtard.py'), str(two), '8'], cwd=two)
    assert r.returncode == 0, r.stderr[-4000:]
    r = subprocess.run([sys.executable, str(HERE/'_distributed_mtard.py'), str(one), '16'], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    w = [json.loads((d/f'w_rank{k}.json').read_text()) for d, k in ((two, 0), (two, 1), (one, 0))]
    assert w[0] == w[1], w                                 # every rank moved the same weight
    assert abs(w[0] - w[2]) < 1e-6 and abs(w[2] - 0.5) > 1e-2, w   # the global batch's (float32 losses), and it moved
    s0, s1, s = (torch.load(d/f'student_rank{k}.pt') for d, k in ((two, 0), (two, 1), (one, 0)))
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    assert max_diff(s, s0) < 1e-5, max_diff(s, s0)
