"""igdmfast's RobustBench teachers against RobustBench's own code (robustbench==1.1.1), and `load_teacher` by name.

RobustBench is installed with `pip install --no-deps --target <cache> robustbench==1.1.1` once per machine (the pytest
cache, else the temporary folder, keyed by version; see `tests/_robustbench.py`). Without PyPI the comparison tests
FAIL with the pip output: they are never skipped.
"""
import os, pickle, re, tempfile
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import _robustbench as RB
from igdmfast.models import (ROBUSTBENCH_TEACHERS, CheckpointError, UnsafeCheckpointError, WideResNet, load_teacher,
                             robustbench_path, save_weights, _rb_norm)

ENTRIES = [(d, n) for d, names in ROBUSTBENCH_TEACHERS.items() for n in names]

# The teachers of the paper (spec c.2, issue #16): every one must be known by name.
PAPER = {'cifar10': {'Chen2021LTD_WRN34_10', 'Chen2021LTD_WRN34_20', 'Wang2023Better_WRN-28-10', 'Cui2023Decoupled_WRN-28-10'},
         'cifar100': {'Chen2021LTD_WRN34_10', 'Wang2023Better_WRN-28-10', 'Cui2023Decoupled_WRN-28-10', 'Rice2020Overfitting',
                      'Sitawarin2020Improving', 'Chen2020Efficient', 'Hendrycks2019Using', 'Cui2020Learnable_34_10_LBGAT6'}}

# RobustBench keeps these two models' normalization in persistent `mu`/`sigma` buffers that their checkpoints lack
# (`_safe_load_state_dict` loads them with strict=False); igdmfast keeps it in non-persistent buffers, and accepts a state
# dict saved from RobustBench's module, which has them, when they equal its own (`_rb_norm`).
NON_STRICT = {'Rice2020Overfitting', 'Chen2020Efficient'}

# A forward of WRN-34-20 (184M parameters) with its construction took about 15 s on one thread here, over the ~10 s
# budget: its logits are compared at depth 10, width 2 of the same family (keys and shapes at the named size).
REDUCED = {'wrn34_20': dict(depth=10, widen_factor=2)}


@pytest.fixture(scope='session')
def rb_dir(request):
    "The folder holding robustbench==1.1.1, installed once (pytest cache, else the temporary folder)."
    cache = getattr(request.config, 'cache', None)
    root = cache.mkdir('igdmfast-robustbench') if cache is not None else Path(tempfile.gettempdir())/'igdmfast-robustbench'
    try: return RB.install(Path(root)/f'robustbench-{RB.VERSION}')
    except RuntimeError as e: why = str(e)
    pytest.fail(why, pytrace=False)  # outside the except block: the message alone, not a chained traceback


@pytest.fixture(scope='session')
def rb_zoo(rb_dir):
    "RobustBench's constructors of our teachers: `{dataset: {name: constructor}}` at the named size, and reduced."
    full = {d: RB.zoo(rb_dir, d, list(names)) for d, names in ROBUSTBENCH_TEACHERS.items()}
    reduced = {d: {a: RB.zoo(rb_dir, d, [n for n, e in names.items() if e['arch'] == a], **kw) for a, kw in REDUCED.items()}
               for d, names in ROBUSTBENCH_TEACHERS.items()}
    return full, reduced


def _shapes(m): return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def _random_weights(model, seed):
    "Random weights for every parameter and buffer of the state dict, with batch-norm statistics that keep activations O(1)."
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in model.state_dict().items():
        if not v.is_floating_point() or k in ('mu', 'sigma'): sd[k] = v.clone()  # RobustBench's normalization constants stay
        elif v.ndim > 1: sd[k] = torch.randn(v.shape, generator=g) * (2/v[0].numel())**0.5
        elif k.endswith(('running_var', 'weight')): sd[k] = torch.rand(v.shape, generator=g) + 0.5
        else: sd[k] = torch.randn(v.shape, generator=g) * 0.1
    model.load_state_dict(sd, strict=False)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns: m.reset_running_stats(); m.momentum = None  # running stats := those of one calibration batch
    with torch.no_grad(): model.train()(torch.rand(4, 3, 32, 32, generator=g))
    for m in bns: m.momentum = 0.1
    return model.eval()


# ------------------------------------------------------------------------------------------- the table

def test_every_paper_teacher_is_known():
    for d, names in PAPER.items(): assert names <= set(ROBUSTBENCH_TEACHERS[d]), names - set(ROBUSTBENCH_TEACHERS[d])
    for d, n in ENTRIES: assert timm.is_model(ROBUSTBENCH_TEACHERS[d][n]['arch'])


# ------------------------------------------------------------------------- against RobustBench's code

@pytest.mark.parametrize('dataset,name', ENTRIES)
def test_same_keys_and_shapes_as_robustbench(rb_zoo, dataset, name):
    "At the named size (on the meta device): RobustBench's module and ours have the same state-dict keys and shapes."
    e = ROBUSTBENCH_TEACHERS[dataset][name]
    with torch.device('meta'):
        theirs, ours = rb_zoo[0][dataset][name](), timm.create_model(e['arch'], **e['kwargs'])
    t, o = _shapes(theirs), _shapes(ours)
    extra = set(t) - set(o)
    assert extra == ({'mu', 'sigma'} if name in NON_STRICT else set())
    assert o == {k: v for k, v in t.items() if k not in extra}
    assert list(o) == [k for k in t if k not in extra]  # same order too


@pytest.mark.parametrize('dataset,name', ENTRIES)
def test_same_logits_as_robustbench(rb_zoo, dataset, name):
    """The same random weights give the same logits (1e-5) on random [0,1] images, normalization included, in eval mode.
    At the named size, except WRN-34-20 (`REDUCED`: depth 10, width 2 of the same constructor, over ~10 s on one thread)."""
    e = ROBUSTBENCH_TEACHERS[dataset][name]
    if e['arch'] in REDUCED:
        theirs = rb_zoo[1][dataset][e['arch']][name]()
        keep = {k: v for k, v in e['kwargs'].items() if k in ('num_classes', 'sub_block1', 'mean', 'std')}
        ours = WideResNet(**REDUCED[e['arch']], **keep)
        assert _shapes(ours) == {k: v for k, v in _shapes(theirs).items() if k not in ('mu', 'sigma')}
    else: theirs, ours = rb_zoo[0][dataset][name](), timm.create_model(e['arch'], **e['kwargs'])
    _random_weights(theirs, seed=len(name))
    sd = theirs.state_dict()   # what `torch.save(load_model(...).state_dict())` keeps (issue #25, item 15)
    assert set(sd) - set(ours.state_dict()) == ({'mu', 'sigma'} if name in NON_STRICT else set())
    ours.load_state_dict(_rb_norm(sd, ours, name), strict=True)   # their mu/sigma equal our built-in normalization
    if name in NON_STRICT:
        with pytest.raises(CheckpointError, match='differs from the one igdmfast builds'):
            _rb_norm(dict(sd, sigma=sd['sigma'] * 1.01), ours, name)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(): want, got = theirs.eval()(x), ours.eval()(x)
    assert got.shape == (2, e['kwargs']['num_classes'])
    assert 0.05 < want.std() and want.abs().max() < 100  # logits of a usable scale, so 1e-5 is a real test
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    with torch.no_grad(): shifted = theirs(x.clamp(0.2, 0.8)*0.5)  # the normalization matters: other inputs, other logits
    assert (shifted - want).abs().max() > 1e-3


# ------------------------------------------------------------------------------------- load by name

def _fabricate(dataset, name, folder, wrap=lambda sd: sd, seed=0):
    "Random weights for `name` written where RobustBench's layout puts them, as `wrap(state_dict)`; returns the model."
    e = ROBUSTBENCH_TEACHERS[dataset][name]
    torch.manual_seed(seed)
    m = timm.create_model(e['arch'], **e['kwargs'])
    with torch.no_grad():
        for p in m.parameters(): p.add_(0.01*torch.randn_like(p))
    p = Path(folder)/dataset/'Linf'/f'{name}.pt'
    p.parent.mkdir(parents=True, exist_ok=True)
    torch.save(wrap(m.state_dict()), p)
    return m.eval()


def _prefixed(pre): return lambda sd: {f'{pre}{k}': v for k, v in sd.items()}

X = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize('wrap', [lambda sd: sd, _prefixed('module.'), lambda sd: {'state_dict': _prefixed('module.')(sd)},
                                  lambda sd: {'model_state_dict': sd, 'epoch': 99}, _prefixed('module.model.')],
                         ids=['bare', 'module', 'state_dict-module', 'model_state_dict', 'module-model'])
def test_load_by_name_in_robustbench_layout(tmp_path, wrap):
    want = _fabricate('cifar100', 'Rice2020Overfitting', tmp_path, wrap)
    t = load_teacher('Rice2020Overfitting', dataset='cifar100', teacher_dir=tmp_path)
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    assert torch.equal(t(X), want(X))
    # the normalization is RobustBench's Rice2020OverfittingNet (CIFAR-100) constants, inside the model
    torch.testing.assert_close(t.mean.flatten(), torch.tensor([0.5070751592371323, 0.48654887331495095, 0.4409178433670343]))


def test_load_dm_teacher_by_name_and_round_trip(tmp_path):
    want = _fabricate('cifar100', 'Wang2023Better_WRN-28-10', tmp_path, _prefixed('module.'))
    t = load_teacher('Wang2023Better_WRN-28-10', dataset='CIFAR-100', teacher_dir=str(tmp_path))  # the CLI's names and others
    assert type(t).__name__ == 'DMWideResNet' and t.num_classes == 100
    assert torch.equal(t(X), want(X))
    torch.testing.assert_close(t.std.flatten(), torch.tensor([0.2673, 0.2564, 0.2762]))
    back = load_teacher(save_weights(t, tmp_path/'copy.pt'))  # save_weights keeps the normalization and activation
    assert torch.equal(back(X), want(X))
    # by path with arch=: 100 classes read from the weights give CIFAR-100's normalization, as RobustBench's entry has
    by_path = load_teacher(robustbench_path('Wang2023Better_WRN-28-10', 'cifar100', tmp_path), arch='dm_wrn28_10')
    assert torch.equal(by_path(X), want(X))


def test_teacher_dir_env_and_default(tmp_path, monkeypatch):
    env, arg = tmp_path/'env', tmp_path/'arg'
    a = _fabricate('cifar100', 'Rice2020Overfitting', env, seed=1)
    b = _fabricate('cifar100', 'Rice2020Overfitting', arg, seed=2)
    c = _fabricate('cifar100', 'Rice2020Overfitting', tmp_path/'cwd'/'models', seed=3)
    monkeypatch.chdir(tmp_path/'cwd')
    monkeypatch.delenv('IGDMFAST_TEACHERS', raising=False)
    assert robustbench_path('Rice2020Overfitting', 'cifar100') == Path('models')/'cifar100'/'Linf'/'Rice2020Overfitting.pt'
    assert torch.equal(load_teacher('Rice2020Overfitting', dataset='cifar100')(X), c(X))            # default: models/
    monkeypatch.setenv('IGDMFAST_TEACHERS', str(env))
    assert robustbench_path('Rice2020Overfitting', 'cifar100') == env/'cifar100'/'Linf'/'Rice2020Overfitting.pt'
    assert torch.equal(load_teacher('Rice2020Overfitting', dataset='cifar100')(X), a(X))            # $IGDMFAST_TEACHERS
    assert torch.equal(load_teacher('Rice2020Overfitting', dataset='cifar100', teacher_dir=arg)(X), b(X))  # teacher_dir first
    with pytest.raises(FileNotFoundError, match=re.escape(str(env/'cifar100'/'Linf'/'Cui2020Learnable_34_10_LBGAT6.pt'))):
        load_teacher('Cui2020Learnable_34_10_LBGAT6')  # a name of one dataset only needs no dataset


def test_missing_checkpoint_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv('IGDMFAST_TEACHERS', str(tmp_path/'env'))
    with pytest.raises(FileNotFoundError) as e: load_teacher('Wang2023Better_WRN-28-10', dataset='cifar10')
    msg = str(e.value)
    assert str(tmp_path/'env'/'cifar10'/'Linf'/'Wang2023Better_WRN-28-10.pt') in msg and '$IGDMFAST_TEACHERS' in msg
    assert "load_model(model_name='Wang2023Better_WRN-28-10', dataset='cifar10', threat_model='Linf'" in msg
    with pytest.raises(FileNotFoundError) as e: load_teacher('Chen2021LTD_WRN34_20', dataset='cifar10', teacher_dir=tmp_path/'x')
    assert str(tmp_path/'x'/'cifar10'/'Linf'/'Chen2021LTD_WRN34_20.pt') in str(e.value)


def test_unknown_names_and_datasets(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown RobustBench teacher 'Cui2020Learnable_34_10_LBGAT6' for cifar10.*Known for cifar10: "
                                         r"Chen2021LTD_WRN34_10, Chen2021LTD_WRN34_20, Wang2023Better_WRN-28-10"):
        load_teacher('Cui2020Learnable_34_10_LBGAT6', dataset='cifar10', teacher_dir=tmp_path)
    with pytest.raises(ValueError, match='exists for cifar10 and cifar100: pass dataset='): load_teacher('Chen2021LTD_WRN34_10')
    with pytest.raises(ValueError, match='cifar10 and cifar100 only'): load_teacher('Chen2021LTD_WRN34_10', dataset='svhn')
    with pytest.raises(ValueError, match='Known for cifar100'): robustbench_path('Chen2021LTD_WRN34_20', 'cifar100')
    _fabricate('cifar100', 'Rice2020Overfitting', tmp_path)
    with pytest.raises(ValueError, match='RobustBench teacher: igdmfast builds it as preactresnet18'):
        load_teacher('Rice2020Overfitting', arch='wrn34_10', dataset='cifar100', teacher_dir=tmp_path)


def test_checkpoint_of_another_architecture(tmp_path):
    p = robustbench_path('Wang2023Better_WRN-28-10', 'cifar100', tmp_path)
    p.parent.mkdir(parents=True)
    torch.save({'state_dict': timm.create_model('wrn28_10', num_classes=100).state_dict()}, p)  # a TRADES WRN-28-10, not DeepMind's
    with pytest.raises(CheckpointError) as e: load_teacher('Wang2023Better_WRN-28-10', dataset='cifar100', teacher_dir=tmp_path)
    msg = str(e.value)
    assert str(p) in msg and 'dm_wrn28_10' in msg
    assert 'missing in the checkpoint: init_conv.weight' in msg and 'unexpected in the checkpoint: conv1.weight' in msg


# -------------------------------------------------------------- issue #14, items 8-9: clear messages

class _Code:
    "Unpickling it runs `os.system`, which creates the file `marker`."
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (os.system, (f'touch {self.marker}',))


@pytest.mark.filterwarnings('ignore:Detected pickle protocol')
@pytest.mark.parametrize('how', ['torch.save', 'legacy', 'pickle'])
def test_code_in_a_checkpoint_is_named_not_corrupted(tmp_path, how):
    p, marker = tmp_path/'evil.pt', tmp_path/'PWNED'
    obj = {'state_dict': nn.Linear(2, 2).state_dict(), 'extra': _Code(marker)}
    if how == 'pickle': p.write_bytes(pickle.dumps(obj, protocol=4))
    else: torch.save(obj, p, _use_new_zipfile_serialization=how == 'torch.save')
    with pytest.raises(UnsafeCheckpointError) as e: load_teacher(p, arch='small_cnn')
    msg = str(e.value)
    assert 'contains code (a pickled object), not loaded for that reason; re-save its state_dict' in msg
    assert f'{os.system.__module__}.system' in msg and 'corrupted' not in msg
    assert not marker.exists()


def test_missing_names_are_clear(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for spec in ('missing.pt', 'runs/x/teacher.pt'):
        with pytest.raises(FileNotFoundError, match=rf"No checkpoint file at '{re.escape(spec)}'\. Check the path"): load_teacher(spec)
    with pytest.raises(FileNotFoundError, match="'my_teacher' is neither a file nor a RobustBench teacher name") as e:
        load_teacher('my_teacher')
    assert 'Wang2023Better_WRN-28-10' in str(e.value) and 'Hugging Face' not in str(e.value)
    with pytest.raises(FileNotFoundError, match='close matches: Chen2021LTD_WRN34_10'): load_teacher('Chen2021LTD_WRN34-10')
    with pytest.raises(FileNotFoundError, match="'resnet18' is an architecture name, not a checkpoint"): load_teacher('resnet18')
