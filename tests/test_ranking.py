"""Teacher ranking (`igdmfast.ranking`, `igdmfast rank-teachers`): the criterion of Lee & Chung (ICML 2026) against
hand computations, a ranking whose answer is known by construction, and the command with its bad inputs.

The hand computations are written from the authors' code (`HongsinLee/why-robust-teachers-fail`,
`real_exp/attacks.py` PGD lines 24-49, `real_exp/identify_train_unlearnset.py` lines 114-141 and 264-265) and from the
definition of the Shannon entropy, in Python floats or float64, never with igdmfast's functions."""
import json, math, re
from pathlib import Path
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from igdmfast.core import ThreatModel
from igdmfast.data import tensor_dls
from igdmfast.ranking import (predictive_entropy, rank_teachers, ranking_markdown, robust_correct, save_ranking,
                              train_images, unlearnable_set)

N, K = 8, 3
LABELS = torch.arange(N) % K


class Lookup(nn.Module):
    "Logits read from `table` by the gray level of a constant image: image i of N is (i + 1/2)/N, whatever an 8/255 attack does."
    def __init__(self, table):
        super().__init__()
        self.register_buffer('table', torch.as_tensor(table, dtype=torch.float32))
    def forward(self, x):
        i = (x.mean((1, 2, 3)) * len(self.table)).floor().long().clamp(0, len(self.table) - 1)
        return self.table[i] + 0 * x.sum((1, 2, 3))[:, None]


def table(wrong=(), soft=(), scale=8., soft_scale=None):
    "Per image: `scale` on its label, or on the next class for `wrong`; `soft` images get zeros (or `soft_scale` on the label)."
    t = torch.zeros(N, K)
    for i in range(N):
        if i in soft and soft_scale is None: continue
        t[i, (int(LABELS[i]) + (i in wrong)) % K] = soft_scale if i in soft else scale
    return t


@pytest.fixture
def toy():
    x = ((torch.arange(N) + 0.5) / N).view(N, 1, 1, 1).expand(N, 1, 4, 4).contiguous()
    return tensor_dls(x, LABELS, x, LABELS, bs=3, device='cpu')   # bs 3: the in-order pass crosses batch boundaries


REFS = dict(a=Lookup(table(wrong={1, 3, 5, 6})), b=Lookup(table(wrong={1, 3, 6, 7})), c=Lookup(table(wrong={1, 2, 3, 6})))
UNLEARNABLE = [1, 3, 6]                        # wrong for every reference
LEARNABLE = [0, 4]                             # right for every reference


def hand_entropy(logits):
    "Shannon entropy in nats of softmax(logits), in Python floats."
    m = max(logits)
    e = [math.exp(v - m) for v in logits]
    p = [v / sum(e) for v in e]
    return -sum(q * math.log(q) for q in p if q > 0)


def test_predictive_entropy_by_hand():
    z = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [30.0, 0.0, -5.0, 1.0], [1e4, 0.0, 0.0, 0.0]], dtype=torch.float64)
    got = predictive_entropy(z)
    assert got.dtype == torch.float64
    for g, row in zip(got.tolist(), z.tolist()): assert abs(g - hand_entropy(row)) < 1e-12
    assert abs(got[1].item() - math.log(4)) < 1e-12 and got[3].item() == 0.0


def authors_pgd(model, x, y, eps, alpha, steps, g):
    "The authors' PGD (real_exp/attacks.py lines 24-49) with the random start drawn from `g`, in float64."
    x_adv = (x + (2 * torch.rand(x.shape, generator=g, dtype=x.dtype) - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = x_adv.detach() + alpha * grad.sign()
        x_adv = (x + (x_adv - x).clamp(-eps, eps)).clamp(0, 1)
    return x_adv


def test_robust_correct_is_the_authors_evaluation():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3)).double().eval()
    x, y = torch.rand(20, 1, 4, 4, dtype=torch.float64), torch.arange(20) % 3
    got = robust_correct(net, [(x, y)], ThreatModel(eps=0.15, step_size=0.04, n_steps=7), seed=5)
    x_ref = authors_pgd(net, x, y, 0.15, 0.04, 7, torch.Generator().manual_seed(5))
    with torch.no_grad(): want = net(x_ref).argmax(1) == y
    assert torch.equal(got, want)
    assert 0 < int(got.sum()) < 20   # the attack breaks some images and not others: the comparison means something


def test_unlearnable_set_is_the_intersection(toy):
    dl = train_images(toy)
    assert [int(v) for v in torch.cat([yb for _, yb in dl])] == LABELS.tolist()   # every image once, in order
    s = unlearnable_set(REFS, dl)
    assert s['unlearnable'].tolist() == UNLEARNABLE and s['learnable'].tolist() == LEARNABLE and s['n_models'] == 3
    assert s['score'].tolist() == [3, 0, 2, 0, 3, 2, 0, 2]


def teachers():
    "Three teachers whose order under the criterion is known, and opposite to their entropy over all images."
    return dict(confident=Lookup(table(soft={0, 2, 4, 5, 7})),         # confident on the unlearnable set, uniform elsewhere
                medium=Lookup(table(soft=set(UNLEARNABLE), soft_scale=1.0)),
                uncertain=Lookup(table(soft=set(UNLEARNABLE))))        # uniform on the unlearnable set


def test_ranking_on_fabricated_teachers(toy, tmp_path):
    ts = teachers()
    res = rank_teachers(ts, None, toy, references=REFS)
    assert res['order'] == ['uncertain', 'medium', 'confident']
    assert [r['rank'] for r in res['rows']] == [1, 2, 3]
    assert (res['n_train'], res['n_unlearnable'], res['n_learnable']) == (8, 3, 2)
    for r in res['rows']:
        t = ts[r['teacher']].table.double().tolist()
        assert abs(r['entropy'] - sum(hand_entropy(t[i]) for i in UNLEARNABLE) / 3) < 1e-12
        assert abs(r['entropy_all'] - sum(hand_entropy(t[i]) for i in range(N)) / N) < 1e-12
        hand_acc = 100 * sum(max(range(K), key=lambda c: (t[i][c], -c)) == LABELS[i] for i in range(N)) / N   # first maximum
        assert r['clean'] == pytest.approx(hand_acc) and r['robust'] == r['clean'] and r['n_eval'] == N   # no attack moves a Lookup
    assert abs(res['rows'][0]['entropy'] - math.log(3)) < 1e-12
    # ranking by the entropy over all training images would put the confident teacher first: the set matters
    assert max(res['rows'], key=lambda r: r['entropy_all'])['teacher'] == 'confident'
    # the order the candidates are given in does not matter
    assert rank_teachers(dict(reversed(list(ts.items()))), None, toy, references=REFS)['order'] == res['order']
    save_ranking(res, tmp_path, config=dict(seed=0))
    md = (tmp_path/'ranking.md').read_text()
    assert md.index('| 1 | uncertain') < md.index('| 2 | medium') < md.index('| 3 | confident')
    assert '3 of 8 training images' in md and md == '# igdmfast rank-teachers\n\n' + ranking_markdown(res)
    js = json.loads((tmp_path/'ranking.json').read_text())
    assert js['order'] == res['order'] and js['config'] == dict(seed=0)


@pytest.mark.parametrize('cands, refs, msg', [
    (lambda: dict(only=teachers()['medium']), REFS, r'at least two candidate teachers, got 1 \(only\)'),
    (lambda: [], REFS, r'at least two candidate teachers, got 0'),
    (lambda: dict(a=teachers()['medium'], four=Lookup(torch.zeros(N, 4))), REFS, r"teacher 'four' outputs 4 classes but the data .* has 3"),
    (lambda: teachers(), dict(r=Lookup(torch.zeros(N, 5))), r"reference student 'r' outputs 5 classes"),
    (lambda: teachers(), dict(good=Lookup(table())), r'unlearnable set is empty'),
])
def test_ranking_bad_input(toy, cands, refs, msg):
    with pytest.raises(ValueError, match=msg): rank_teachers(cands(), None, toy, references=refs)


# the command

def run_main(argv):
    from igdmfast.cli import main
    try: return main(argv)
    except SystemExit as e: return e.code


FAST = ['--n-train', '64', '--n-valid', '32', '--steps', '1', '--bs', '32', '--device', 'cpu', '--threads', '1']


def small_cnn_file(path, num_classes=10, seed=0, width=8):
    "A digits-sized small_cnn (untrained, seeded) saved as igdmfast saves teachers."
    import timm
    import igdmfast.models  # noqa: F401
    from igdmfast.weights import save_weights
    torch.manual_seed(seed)
    m = timm.create_model('small_cnn', num_classes=num_classes, in_chans=1, width=width)
    save_weights(m, path, arch='small_cnn')
    return str(path)


def test_cli_rank_teachers(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t = [small_cnn_file(tmp_path/f't{i}.pt', seed=i) for i in range(3)]
    out = tmp_path/'rank'
    code = run_main(['rank-teachers', '--teachers', ','.join(t), '--student', 'small_cnn', '--ref-epochs', '1', *FAST, '--out', str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:]
    res = json.loads((out/'ranking.json').read_text())
    assert sorted(res['order']) == sorted(t) and len(res['rows']) == 3
    assert res['references'] == ['pgd_at_seed0', 'trades_seed0'] and res['n_train'] == 64
    assert res['config']['command'] == 'rank-teachers' and res['config']['teachers'] == t
    ents = [r['entropy'] for r in res['rows']]
    assert ents == sorted(ents, reverse=True)
    for f in ('config.json', 'ranking.md', 'ranking.json', 'reference_pgd_at_seed0.pt', 'reference_trades_seed0.pt'):
        assert (out/f).is_file(), f
    assert 'predicted rank' in printed.out and 'Predicted order' in (out/'ranking.md').read_text()
    # the reference students it saved are reused with --references, giving the same unlearnable set and order
    refs = ','.join(str(out/f) for f in ('reference_pgd_at_seed0.pt', 'reference_trades_seed0.pt'))
    code = run_main(['rank-teachers', '--teachers', ','.join(t), '--references', refs, *FAST, '--out', str(tmp_path/'again')])
    assert code == 0, capsys.readouterr().err[-3000:]
    again = json.loads((tmp_path/'again'/'ranking.json').read_text())
    assert again['order'] == res['order'] and again['n_unlearnable'] == res['n_unlearnable']
    assert [r['entropy'] for r in again['rows']] == ents
    assert not any((tmp_path/'again').glob('reference_*.pt'))
    # a second ranking into the same folder is refused without --force
    assert run_main(['rank-teachers', '--teachers', ','.join(t), '--references', refs, *FAST, '--out', str(out)]) == 2
    assert 'holds another run' in capsys.readouterr().err


@pytest.mark.parametrize('name, argv, msg', [
    ('one-candidate', lambda t: ['--teachers', small_cnn_file(t/'a.pt')], r'--teachers needs at least two candidates to rank, got 1'),
    ('no-teachers', lambda t: [], r'--teachers needs at least two candidates to rank, got 0'),
    ('twice', lambda t: ['--teachers', f"{small_cnn_file(t/'a.pt')},{t/'a.pt'}"], r'--teachers lists a teacher twice'),
    ('other-classes', lambda t: ['--teachers', f"{small_cnn_file(t/'a.pt')},{small_cnn_file(t/'b.pt', num_classes=3)}"],
     r"teacher '.*b\.pt' outputs 3 classes but the data \(digits\) has 10"),
    ('missing-file', lambda t: ['--teachers', f"{small_cnn_file(t/'a.pt')},{t/'nowhere.pt'}"], r"No checkpoint file at '.*nowhere\.pt'"),
    ('missing-robustbench', lambda t: ['--teachers', f"{small_cnn_file(t/'a.pt')},Chen2021LTD_WRN34_10", '--teacher-dir', str(t/'rb')],
     r'igdmfast downloads nothing'),
    ('missing-reference', lambda t: ['--teachers', f"{small_cnn_file(t/'a.pt')},{small_cnn_file(t/'b.pt', seed=1)}", '--references', str(t/'r.pt')],
     r"Reference student '.*r\.pt' not found"),
    ('reference-other-classes', lambda t: ['--teachers', f"{small_cnn_file(t/'a.pt')},{small_cnn_file(t/'b.pt', seed=1)}",
                                           '--references', small_cnn_file(t/'r.pt', num_classes=4)], r"reference student '.*r\.pt' outputs 4 classes"),
    ('ref-method-with-teacher', lambda t: ['--teachers', f"{small_cnn_file(t/'a.pt')},{small_cnn_file(t/'b.pt', seed=1)}", '--ref-methods', 'ard'],
     r'--ref-methods takes pgd_at or trades'),
    ('ref-seeds', lambda t: ['--teachers', f"{small_cnn_file(t/'a.pt')},{small_cnn_file(t/'b.pt', seed=1)}", '--ref-seeds', '0,0'],
     r'--ref-seeds lists a seed twice'),
])
def test_cli_rank_teachers_bad_input(name, argv, msg, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path/'out'
    code = run_main(['rank-teachers', *argv(tmp_path), '--student', 'small_cnn', *FAST, '--out', str(out)])
    err = capsys.readouterr().err
    assert code == 2, f"exit code {code}; stderr: {err[-2000:]}"
    assert 'Traceback' not in err and err.startswith('igdmfast: error: '), err[-2000:]
    assert re.search(msg, err, re.S), err[-2000:]
    assert not out.exists()   # nothing claimed, nothing written
