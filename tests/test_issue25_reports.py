"""Issue #25, items 3, 6, 7, 10, 12, 13 and 15: masking warnings reach every report; a comparison over seeds reports every
seed; fastai's own DataLoaders train; `eval` prints every attack it ran; output for logs and pipes; plot titles and epoch
axes; RobustBench's `mu`/`sigma` buffers. Each test reproduces the defect as the issue reports it, on CPU-tiny data."""
import contextlib, io, json, os

os.environ.setdefault('MPLBACKEND', 'Agg')

import numpy as np
import pytest
import torch
from torch import nn
from fastai.learner import Learner
import fastai.callback.schedule  # noqa: F401  (fit_one_cycle)

import igdmfast.cli as cli
import igdmfast.evaluate as E
import igdmfast.plots as P
import igdmfast.report as R
from igdmfast.core import seed_everything
from igdmfast.data import get_dls
from igdmfast.models import CheckpointError, load_teacher, robustbench_path, save_weights, small_cnn

TINY = ['--epochs', '1', '--steps', '1', '--n-train', '96', '--n-valid', '40', '--bs', '32', '--n-aa', '0', '--device', 'cpu',
        '--student', 'small_cnn']


class RoundInput(nn.Module):
    "Quantize the input to 5 grey levels: its input gradient is exactly zero (gradient masking by a non-differentiable layer)."
    def forward(self, x): return torch.round(x * 4) / 4


@pytest.fixture(scope='module')
def net():
    "A small CNN trained naturally on the embedded digits (about a second)."
    seed_everything(0)
    m = small_cnn(num_classes=10, in_chans=1)
    learn = Learner(get_dls('digits', bs=64, device='cpu'), m, loss_func=nn.CrossEntropyLoss())
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(3, 3e-3)
    return m.eval()


@pytest.fixture(scope='module')
def net_pt(net, tmp_path_factory):
    return save_weights(net, tmp_path_factory.mktemp('net')/'t.pt', arch='small_cnn')


def run_cli(argv, teacher=None):
    "`igdmfast ARGV` in this process, stdout and stderr captured as a log file would (not terminals); `teacher` replaces --teacher's model."
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        if teacher is not None: mp.setattr(cli, 'load_teacher_arg', lambda *a, **k: teacher)
        rc = cli.main(argv)
    assert rc == 0, err.getvalue()[-3000:]
    return out.getvalue(), err.getvalue()


@pytest.fixture(scope='module')
def masked_compare(net, net_pt, tmp_path_factory):
    "`igdmfast compare` with a teacher that rounds its input (zero input gradients): its folder, stdout and stderr."
    out = tmp_path_factory.mktemp('cmp')/'c'
    stdout, stderr = run_cli(['compare', '--methods', 'ard', '--n-curve', '40', '--teacher', str(net_pt), '--out', str(out), *TINY],
                             teacher=nn.Sequential(RoundInput(), net).eval())
    return out, stdout, stderr


# ---------------------------------------------------------------- item 3: masking warnings reach the reports

def test_item3_compare_reports_carry_the_masking_warning(masked_compare):
    out, _, _ = masked_compare
    sign = 'no better than uniform random noise'
    md = (out/'compare.md').read_text()
    section = md[md.index('## Evaluation warnings'):]
    assert f'- **teacher (t.pt)**: PGD-20 does {sign}' in section, section
    report = (out/'report.md').read_text()
    warns = report[report.index('## Warnings'):]
    assert f'- **teacher (t.pt)**: PGD-20 does {sign}' in warns and 'None: no sign' not in warns, warns
    metrics = json.loads((out/'metrics.json').read_text())['models']
    assert any(sign in w for w in metrics['teacher (t.pt)']['warnings']), metrics['teacher (t.pt)']
    cached = json.loads((out/'result.json').read_text())   # what a resumed comparison reads back
    assert any(sign in w for w in cached['warnings'])


def test_item3_train_report_carries_the_warning(net, net_pt, tmp_path):
    "A teacher whose outputs are probabilities (a softmax that flattens the gradients: false robustness), through `train`."
    out = tmp_path/'tr'
    run_cli(['train', '--method', 'ard', '--teacher', str(net_pt), '--out', str(out), *TINY], teacher=nn.Sequential(net, nn.Softmax(1)).eval())
    report = (out/'report.md').read_text()
    warns = report[report.index('## Warnings'):]
    assert '- **teacher (t.pt)**: The model\'s outputs are non-negative and every row sums to 1' in warns, warns
    assert 'None: no sign' not in warns
    metrics = json.loads((out/'metrics.json').read_text())['models']
    assert any('look like probabilities' in w for w in metrics['teacher (t.pt)']['warnings'])


def test_item3_paper_eval_keeps_the_warnings_of_robust_eval(net):
    ds = get_dls('digits', bs=64, device='cpu').valid.dataset
    xy = ds.x[:48].float(), ds.y[:48]
    with pytest.warns(E.EvaluationWarning, match='look like probabilities'):
        r = E.paper_eval(nn.Sequential(net, nn.Softmax(1)).eval(), xy, E.ThreatModel(), n_aa=0)
    assert any('look like probabilities' in w for w in r['warnings']), r['warnings']
    assert E.paper_eval(net, xy, E.ThreatModel(), n_aa=0)['warnings'] == []   # a working model: none


# ---------------------------------------------------------------- item 6: a comparison over seeds shows every seed

def _row(seed, igdm, gc):
    rng = np.random.default_rng(seed * 2 + igdm)
    cos = np.clip(rng.normal(gc, 0.05, 40), -1, 1)
    return dict(seed=seed, method='ard', igdm=igdm, clean=80. + 2.5 * seed, fgsm=50., pgd20=40. + 2.5 * seed, cw=37.5, aa=None, gd=0.5,
                gc=float(cos.mean()), n=40, per_sample_gc=cos.tolist(), alpha=5. if igdm else None, seconds_per_epoch=1.,
                curve=dict(eps=[0, 8/255], acc=[80. + seed, 40. + 10 * seed], noise=[80., 78.]), warnings=[])


def test_item6_multi_seed_report_and_plots_show_every_seed(tmp_path, monkeypatch):
    rows = [_row(s, ig, 0.02 + 0.02 * s) for s in (0, 1) for ig in (False, True)]
    teacher = dict(name='t.pt', clean=90., fgsm=60., pgd20=50., cw=47.5, aa=None, n=40, warnings=[],
                   curve=dict(eps=[0, 8/255], acc=[90., 50.], noise=[90., 88.]))
    panels = {}
    real = R.plot_panels
    monkeypatch.setattr(R, 'plot_panels', lambda p, path, *a, **k: panels.setdefault(path.name, (p, k.get('title'))) and real(p, path, *a, **k))
    R.save_compare(tmp_path, teacher, rows, [0, 1], 'notes')
    report = (tmp_path/'report.md').read_text()
    for s in (0, 1):
        for v in ('ard', 'ard+IGDM'): assert f'| {v}, seed {s} |' in report, report
    gc, title = panels['grad_cosines.png']
    ig = [r for r in rows if r['igdm']]
    assert len(gc['ARD']['+IGDM']) == 80 and 'seeds 0, 1' in title
    assert np.mean(gc['ARD']['+IGDM']) == pytest.approx(np.mean([r['gc'] for r in ig]))   # the mean the table gives
    curves, title = panels['acc_vs_eps.png']
    assert curves['ARD']['+IGDM'][1] == pytest.approx([80.5, 45.]) and 'mean over seeds 0, 1' in title


# ---------------------------------------------------------------- item 7: fastai's own DataLoaders

@pytest.mark.parametrize('device', [None, 'cpu'])
def test_item7_fastai_dataloaders_of_any_device(device):
    from fastai.data.core import DataLoaders
    from igdmfast.learner import adv_learner, distill_learner
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)
    ds = list(zip(x, y))
    cnn = lambda: small_cnn(num_classes=10, in_chans=1)
    for make in (lambda d: distill_learner(cnn(), cnn(), d, method='ard', alpha=1., check_teacher=False), lambda d: adv_learner(cnn(), d)):
        dls = DataLoaders.from_dsets(ds, ds, bs=32, device=device)
        learn = make(dls)
        with learn.no_bar(), learn.no_logging(): learn.fit(1)
        assert isinstance(dls.device, torch.device) and next(learn.model.parameters()).device == dls.device


# ---------------------------------------------------------------- item 10: eval prints every attack it computed

def test_item10_eval_table_shows_every_computed_attack(net_pt, tmp_path):
    out = tmp_path/'e'
    stdout, _ = run_cli(['eval', str(net_pt), '--attacks', 'clean,pgd50,cw30', '--n', '16', '--device', 'cpu', '--out', str(out)])
    m = json.loads((out/'metrics.json').read_text())['models']['t.pt']['numbers']
    head = next(l for l in stdout.splitlines() if l.startswith('| model |'))
    row = next(l for l in stdout.splitlines() if l.startswith('| t.pt |'))
    cells = dict(zip([c.strip() for c in head.split('|')[1:-1]], [c.strip() for c in row.split('|')[1:-1]]))
    assert cells['PGD-50'] == f"{m['pgd50']:.2f}" and cells['C&W∞-30'] == f"{m['cw30']:.2f}", (head, row)
    assert cells['Clean'] == f"{m['clean']:.2f}"


# ---------------------------------------------------------------- item 12: output for log files and pipes

def test_item12_no_bar_fragments_and_one_line_warnings(masked_compare, net, capsys):
    _, stdout, stderr = masked_compare
    for text in (stdout, stderr): assert '\r' not in text and '█' not in text
    warns = [l for l in stderr.splitlines() if 'gradient masking' in l]
    assert warns and all(l.startswith('EvaluationWarning: PGD-20') for l in warns), stderr[-2000:]
    assert 'warnings.warn' not in stderr and '.py:' not in stderr, stderr[-2000:]   # no source file, line or code
    E.robust_eval(net, get_dls('digits', bs=64, device='cpu'), attacks=('clean', 'fgsm'), n=64, bs=16)   # progress=True
    captured = capsys.readouterr()
    assert '\r' not in captured.out + captured.err and '█' not in captured.out + captured.err


# ---------------------------------------------------------------- item 13: plot titles and epoch axes

def _figures(monkeypatch):
    "Capture the figures the plotting functions save."
    figs, real = [], P._save_fig
    monkeypatch.setattr(P, '_save_fig', lambda fig, path: figs.append(fig) or real(fig, path))
    return figs


def _texts_inside(fig):
    "The titles and axis labels of `fig` that run past its left or right edge (matplotlib cuts them there)."
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig).draw()
    texts = [*fig.texts, *(t for ax in fig.axes for t in (ax.title, ax.xaxis.label, ax.yaxis.label))]
    out = [(t.get_text(), t.get_window_extent()) for t in texts if t.get_text().strip()]
    return [(s, round(b.x0), round(b.x1)) for s, b in out if b.x0 < -1 or b.x1 > fig.bbox.width + 1]


def test_item13_titles_fit_and_epochs_count_as_in_history(tmp_path, monkeypatch):
    figs = _figures(monkeypatch)
    P.plot_panels({'ARD': {'ard': ([0, 8, 16], [80, 40, 20]), '+IGDM': ([0, 8, 16], [82, 44, 22])}}, tmp_path/'a.png',
                  'ε (Linf, in 1/255 units)', 'PGD-20 accuracy (%)',
                  title='Robust accuracy against the attack radius, with and without IGDM (mean over seeds 0, 1, 2, 3, 4)')
    assert _texts_inside(figs[-1]) == []
    (tmp_path/'history.csv').write_text('epoch,train_loss,valid_loss,accuracy,time\n0,2.1,2.0,0.3,00:01\n')
    P.plot_training_curves(tmp_path/'history.csv', tmp_path/'t.png',
                           title='Training curves of a student distilled with ARD + IGDM from a robust teacher, one epoch')
    fig = figs[-1]
    assert _texts_inside(fig) == []
    for ax in fig.axes:
        assert [list(l.get_xdata()) for l in ax.lines] == [[0]] * len(ax.lines)   # epoch 0, as history.csv numbers it
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks == [0], (ax.get_xlim(), ticks)


# ---------------------------------------------------------------- item 15: RobustBench's mu/sigma buffers

# RobustBench 1.1.1, model_zoo/cifar100.py, Rice2020OverfittingNet: its `mu` and `sigma` buffers (an independent copy).
RB_MU = torch.tensor([0.5070751592371323, 0.48654887331495095, 0.4409178433670343]).view(1, 3, 1, 1)
RB_SIGMA = torch.tensor([0.2673342858792401, 0.2564384629170883, 0.27615047132568404]).view(1, 3, 1, 1)


def test_item15_robustbench_state_dict_with_mu_sigma(tmp_path):
    import timm
    from igdmfast.models import ROBUSTBENCH_TEACHERS
    e = ROBUSTBENCH_TEACHERS['cifar100']['Rice2020Overfitting']
    torch.manual_seed(0)
    ours = timm.create_model(e['arch'], **e['kwargs']).eval()
    sd = dict(ours.state_dict(), mu=RB_MU.clone(), sigma=RB_SIGMA.clone())   # what `torch.save(rb_model.state_dict())` holds
    p = robustbench_path('Rice2020Overfitting', 'cifar100', tmp_path)
    p.parent.mkdir(parents=True)
    torch.save(sd, p)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(): want = ours(x)
    by_name = load_teacher('Rice2020Overfitting', dataset='cifar100', teacher_dir=tmp_path)
    by_path = load_teacher(p, arch='preactresnet18')   # the normalization is read from the file's own buffers
    with torch.no_grad(): assert torch.equal(by_name(x), want) and torch.equal(by_path(x), want)
    torch.save(dict(sd, sigma=RB_SIGMA * 2), p)   # another normalization: another model
    with pytest.raises(CheckpointError, match=r"sigma=\(0\.534669.*differs from the one igdmfast builds"):
        load_teacher('Rice2020Overfitting', dataset='cifar100', teacher_dir=tmp_path)
    q = tmp_path/'small.pt'
    torch.save(dict(small_cnn(num_classes=10, in_chans=1).state_dict(), mu=RB_MU, sigma=RB_SIGMA), q)
    with pytest.raises(CheckpointError, match='has none'): load_teacher(q, arch='small_cnn')
