"""Tests of `igdmfast.models`: the registered backbones, `cifar_stem`, and checkpoint saving/loading."""
import re
import numpy as np
import pytest
import timm
import torch
from torch import nn

from igdmfast.core import Normalize, normalized
from igdmfast.models import (CIFAR_ARCHS, CheckpointError, UnsafeCheckpointError, WideResNet, cifar_stem, load_teacher,
                             n_params, save_weights)

# Parameter counts for 10 classes. resnet18_cifar, mobilenetv2_cifar and the WRNs are the published numbers;
# preactresnet18 is Rice et al. / RobustBench `bn_before_fc=True` (11,171,146 without the final BN).
PUBLISHED = {'resnet18_cifar': 11_173_962, 'mobilenetv2_cifar': 2_296_922, 'wrn34_10': 46_160_474,
             'wrn28_10': 36_479_194, 'preactresnet18': 11_172_170}


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _tiny(**kw): return timm.create_model('tiny_resnet_cifar', width=8, **kw)


# ----------------------------------------------------------------------------------------------- backbones

def test_registered_with_timm():
    assert all(timm.is_model(a) for a in CIFAR_ARCHS)
    assert {'resnet18_cifar', 'mobilenetv2_cifar', 'tiny_resnet_cifar', 'tiny_mobilenet_cifar'} <= set(timm.list_models('*cifar*'))


@pytest.mark.parametrize('num_classes', [10, 100])
@pytest.mark.parametrize('arch', CIFAR_ARCHS)
def test_backbone_forward_backward(arch, num_classes):
    torch.manual_seed(0)
    m = timm.create_model(arch, num_classes=num_classes)
    x = torch.rand(2, 3, 32, 32)
    out = m(x)
    assert out.shape == (2, num_classes)
    out.logsumexp(1).sum().backward()
    assert all(p.grad is not None for p in m.get_classifier().parameters())
    assert m.pretrained_cfg['architecture'] == arch and m.num_classes == num_classes
    if num_classes == 10 and arch in PUBLISHED: assert n_params(m) == PUBLISHED[arch]


def test_published_parameter_counts():
    with torch.device('meta'):
        counts = {a: n_params(timm.create_model(a)) for a in PUBLISHED}
    assert counts == PUBLISHED
    with torch.device('meta'):
        assert n_params(timm.create_model('preactresnet18', bn_before_fc=False)) == 11_171_146


def test_reference_key_names():
    with torch.device('meta'):
        r18, wrn, mb = timm.create_model('resnet18_cifar'), timm.create_model('wrn34_10'), timm.create_model('mobilenetv2_cifar')
    assert {'conv1.weight', 'bn1.weight', 'layer1.0.conv1.weight', 'layer2.0.shortcut.0.weight', 'layer2.0.shortcut.1.running_mean',
            'layer4.1.bn2.weight', 'linear.weight', 'linear.bias'} <= set(r18.state_dict())
    assert {'conv1.weight', 'block1.layer.0.bn1.weight', 'block1.layer.0.convShortcut.weight', 'block2.layer.0.conv1.weight',
            'block3.layer.4.conv2.weight', 'bn1.running_var', 'fc.weight', 'fc.bias'} <= set(wrn.state_dict())
    assert not any(k.startswith('sub_block1') for k in wrn.state_dict())
    assert {'conv1.weight', 'layers.0.conv1.weight', 'layers.0.shortcut.0.weight', 'layers.16.conv3.weight',
            'conv2.weight', 'bn2.weight', 'linear.weight'} <= set(mb.state_dict())


def test_small_models_other_inputs():
    m = timm.create_model('small_cnn', in_chans=1)
    for size in (8, 28):
        assert m(torch.rand(2, 1, size, size)).shape == (2, 10)
    for arch in ('tiny_resnet_cifar', 'tiny_mobilenet_cifar', 'resnet18_cifar'):
        assert timm.create_model(arch, in_chans=1)(torch.rand(2, 1, 32, 32)).shape == (2, 10)
    assert timm.create_model('preactresnet18', num_classes=200)(torch.rand(1, 3, 64, 64)).shape == (1, 200)  # Tiny-ImageNet


def test_timm_api_and_options():
    m = _tiny(num_classes=5)
    f = m.forward_features(torch.rand(2, 3, 32, 32))
    assert f.shape == (2, 32, 8, 8) and m.forward_head(f, pre_logits=True).shape == (2, 32)
    m.reset_classifier(3); assert m(torch.rand(1, 3, 32, 32)).shape == (1, 3)
    assert timm.create_model('tiny_resnet_cifar', num_classes=0)(torch.rand(1, 3, 32, 32)).shape == (1, 64)
    assert timm.create_model('tiny_mobilenet_cifar', width_mult=0.5).num_features == 128
    assert next(timm.create_model('small_cnn', dtype=torch.float64).parameters()).dtype == torch.float64
    from igdmfast.models import resnet18_cifar  # timm's own extras are accepted and dropped
    assert resnet18_cifar(pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None, num_classes=3).num_classes == 3


def test_pretrained_and_unknown_options_refused():
    for arch in CIFAR_ARCHS:
        with pytest.raises(ValueError, match='load_teacher'): timm.create_model(arch, pretrained=True)
    with pytest.raises(TypeError, match='features_only'): timm.create_model('resnet18_cifar', features_only=True)
    with pytest.raises(ValueError, match='6n\\+4'): WideResNet(depth=30)


def test_fastai_timm_body():
    from fastai.vision.learner import create_timm_model
    model, cfg = create_timm_model('tiny_resnet_cifar', 4, pretrained=False)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 4) and cfg['architecture'] == 'tiny_resnet_cifar'


# ----------------------------------------------------------------------------------------------- cifar_stem

def test_cifar_stem_resnet18():
    m = cifar_stem(timm.create_model('resnet18', num_classes=10))
    assert m.forward_features(torch.rand(2, 3, 32, 32)).shape == (2, 512, 4, 4)
    assert n_params(m) == PUBLISHED['resnet18_cifar']
    ours = timm.create_model('resnet18_cifar')
    rename = lambda k: k.replace('downsample', 'shortcut').replace('fc.', 'linear.')
    assert {rename(k): tuple(v.shape) for k, v in m.state_dict().items()} == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert isinstance(m.maxpool, nn.Identity) and m(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_cifar_stem_other_layouts():
    m = cifar_stem(timm.create_model('resnet10t', num_classes=10, in_chans=1))
    assert (m.conv1[0].kernel_size, m.conv1[0].stride, m.conv1[0].in_channels) == ((3, 3), (1, 1), 1)
    assert m.forward_features(torch.rand(2, 1, 32, 32)).shape[-2:] == (4, 4)
    m = cifar_stem(timm.create_model('test_efficientnet', num_classes=10))   # `conv_stem`, no pooling
    assert (m.conv_stem.kernel_size, m.conv_stem.stride) == ((3, 3), (1, 1))
    stem = nn.Sequential(nn.Conv2d(3, 8, 7, 2, 3), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
    holder = nn.Module(); holder.stem = stem
    cifar_stem(holder)
    assert holder.stem(torch.rand(1, 3, 32, 32)).shape == (1, 8, 32, 32)
    with pytest.raises(ValueError, match='no nn.Conv2d'): cifar_stem(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))


# ----------------------------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize('name', ['m.pt', 'm.safetensors'])
def test_save_load_round_trip(tmp_path, name):
    m = _tiny(num_classes=7)
    p = save_weights(m, tmp_path/name, epoch=2, acc=np.float64(0.25))
    t = load_teacher(p)
    assert _same(t, m) and type(t) is type(m) and t._model_args['width'] == 8
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(t(x), m.eval()(x))
    if name.endswith('.pt'):
        ck = torch.load(p, weights_only=True)
        assert ck['format'] == 'igdmfast-model' and ck['version'] == 1 and ck['arch'] == 'tiny_resnet_cifar'
        assert ck['model_kwargs'] == {'num_classes': 7, 'in_chans': 3, 'width': 8} and ck['meta'] == {'epoch': 2, 'acc': 0.25}


def test_save_load_adapted_models(tmp_path):
    m = normalized(cifar_stem(timm.create_model('resnet10t', num_classes=3)), (0.4, 0.5, 0.6), (0.2, 0.2, 0.2))
    t = load_teacher(save_weights(nn.DataParallel(m), tmp_path/'m.pt'))
    assert isinstance(t[0], Normalize) and _same(t, m)
    r18 = cifar_stem(timm.create_model('resnet18', num_classes=3))
    torch.save(r18.state_dict(), tmp_path/'sd.pt')   # a plain state dict does not say that cifar_stem was applied
    with pytest.raises(CheckpointError, match='first conv is 3x3.*cifar_stem'): load_teacher(tmp_path/'sd.pt', arch='resnet18')
    assert _same(load_teacher(tmp_path/'sd.pt', cifar_stem(timm.create_model('resnet18', num_classes=3))), r18)


def test_load_plain_state_dicts(tmp_path):
    m = _tiny(num_classes=6)
    torch.save(nn.DataParallel(m).state_dict(), tmp_path/'dp.pt')
    assert next(iter(torch.load(tmp_path/'dp.pt'))).startswith('module.')
    assert _same(load_teacher(tmp_path/'dp.pt', arch='tiny_resnet_cifar', width=8), m)   # num_classes from the weights
    assert _same(load_teacher(tmp_path/'dp.pt', _tiny(num_classes=6)), m)
    for key in ('state_dict', 'model_state_dict'):
        torch.save({key: m.state_dict(), 'epoch': 9}, tmp_path/f'{key}.pt')
        assert _same(load_teacher(tmp_path/f'{key}.pt', 'tiny_resnet_cifar', width=8), m)
    pre = timm.create_model('preactresnet18', bn_before_fc=False, num_classes=4)
    torch.save(pre.state_dict(), tmp_path/'pre.pt')
    assert _same(load_teacher(tmp_path/'pre.pt', arch='preactresnet18'), pre)


def test_load_fastai_learn_save(tmp_path):
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from torch.utils.data import TensorDataset
    torch.manual_seed(0)
    ds = TensorDataset(torch.rand(16, 3, 32, 32), torch.randint(0, 4, (16,)))
    learn = Learner(DataLoaders.from_dsets(ds, ds, bs=8, device='cpu'), _tiny(num_classes=4),
                    loss_func=nn.CrossEntropyLoss(), path=tmp_path)
    learn.fit(1, 1e-3)
    p = learn.save('teacher')                                  # {'model': ..., 'opt': ...}
    assert set(torch.load(p, weights_only=False)) == {'model', 'opt'}
    t = load_teacher(p, arch='tiny_resnet_cifar', width=8)
    assert _same(t, learn.model)
    p2 = learn.save('weights', with_opt=False)
    assert _same(load_teacher(p2, _tiny(num_classes=4)), learn.model)


def test_robustbench_style_wrn34_10(tmp_path):
    # RobustBench `Chen2021LTD_WRN34_10` (CIFAR-100): WideResNet(depth=34, widen_factor=10, num_classes=100, sub_block1=True)
    torch.manual_seed(0)
    rb = timm.create_model('wrn34_10', num_classes=100, sub_block1=True)
    torch.save({'state_dict': {f'module.{k}': v for k, v in rb.state_dict().items()}}, tmp_path/'ltd.pt')
    t = load_teacher(tmp_path/'ltd.pt', arch='wrn34_10')
    assert t.num_classes == 100 and hasattr(t, 'sub_block1') and _same(t, rb)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(t(x), rb.eval()(x))
    with pytest.raises(CheckpointError, match='sub_block1=True') as e:
        load_teacher(tmp_path/'ltd.pt', timm.create_model('wrn34_10', num_classes=100))
    assert 'unexpected in the checkpoint: sub_block1.layer.0' in str(e.value)


def test_pickled_code_refused(tmp_path):
    torch.save(nn.Linear(2, 2), tmp_path/'module.pt')
    with pytest.raises(UnsafeCheckpointError) as e: load_teacher(tmp_path/'module.pt', arch='small_cnn')
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    assert 'pickled Python objects' in msg and 'refused for safety' in msg and 'TRUST' in msg
    assert "torch.save(torch.load(p, weights_only=False).state_dict(), 'weights.pt')" in msg
    assert 'torch.nn.modules.linear.Linear' in msg


def test_corrupted_files(tmp_path):
    p = save_weights(_tiny(), tmp_path/'m.pt')
    data = p.read_bytes()
    (tmp_path/'half.pt').write_bytes(data[:len(data)//2])
    (tmp_path/'noise.pt').write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path/'empty.pt').write_bytes(b'')
    (tmp_path/'noise.safetensors').write_bytes(np.random.default_rng(1).bytes(4096))
    for name in ('half.pt', 'noise.pt', 'empty.pt', 'noise.safetensors'):
        with pytest.raises(CheckpointError, match='corrupted or truncated') as e: load_teacher(tmp_path/name, arch='small_cnn')
        assert isinstance(e.value, ValueError) and e.value.__cause__ is None and e.value.__suppress_context__
        assert name in str(e.value)


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path/'nope.pt'))): load_teacher(tmp_path/'nope.pt')
    with pytest.raises(IsADirectoryError): load_teacher(tmp_path)
    m = _tiny()
    torch.save(m.state_dict(), tmp_path/'sd.pt')
    with pytest.raises(ValueError, match='pass arch=.*or model='): load_teacher(tmp_path/'sd.pt')
    with pytest.raises(ValueError, match='Close matches: tiny_resnet_cifar'): load_teacher(tmp_path/'sd.pt', arch='tiny_resnet_cifr')
    with pytest.raises(ValueError, match="Unknown architecture 'resnet18_cifarr'.*resnet18_cifar"):
        load_teacher(tmp_path/'sd.pt', arch='resnet18_cifarr')
    with pytest.raises(ValueError, match='Unknown architecture'): save_weights(m, tmp_path/'x.pt', arch='not_a_model_at_all')
    with pytest.raises(ValueError, match='not both'): load_teacher(tmp_path/'sd.pt', _tiny(), arch='tiny_resnet_cifar')
    with pytest.raises(TypeError, match='meta'): save_weights(m, tmp_path/'x.pt', net=m)
    with pytest.raises(CheckpointError) as e: load_teacher(tmp_path/'sd.pt', _tiny(num_classes=3))
    msg = str(e.value)
    assert 'shapes that differ: linear.weight: checkpoint (10, 32) vs model (3, 32)' in msg
    with pytest.raises(CheckpointError, match='missing in the checkpoint: layer1.1.conv1.weight') as e:
        load_teacher(tmp_path/'sd.pt', timm.create_model('resnet18_cifar'))
    p = save_weights(m, tmp_path/'ours.pt')
    with pytest.raises(CheckpointError, match="saved from a 'tiny_resnet_cifar'"): load_teacher(p, arch='small_cnn')
    torch.save({'epoch': 3}, tmp_path/'meta.pt')
    with pytest.raises(CheckpointError, match="not model weights"): load_teacher(tmp_path/'meta.pt', arch='small_cnn')


# ----------------------------------------------------------------------------------- DeepMind WRN, WRN-34-20, normalization

def _wrn_params(depth, k, classes):
    "Parameter count of a (TRADES or DeepMind) WRN-depth-k, in closed form: convs, 1x1 shortcuts, batch norms, linear."
    n, w = (depth - 4)//6, [16, 16*k, 32*k, 64*k]
    total = 3*16*9 + 2*w[3] + w[3]*classes + classes
    for ni, nf in zip(w[:-1], w[1:]):
        total += ni*nf*9 + nf*nf*9 + (ni*nf if ni != nf else 0) + 2*ni + 2*nf   # first block
        total += (n - 1)*(2*nf*nf*9 + 4*nf)                                   # the others
    return total


def test_dm_wrn_and_wrn34_20_sizes_and_keys():
    with torch.device('meta'):
        dm, dm100, w20 = (timm.create_model('dm_wrn28_10'), timm.create_model('dm_wrn28_10', num_classes=100),
                          timm.create_model('wrn34_20'))
    assert n_params(dm) == _wrn_params(28, 10, 10) == PUBLISHED['wrn28_10']
    assert n_params(dm100) == _wrn_params(28, 10, 100) and n_params(w20) == _wrn_params(34, 20, 10)
    keys = set(dm.state_dict())
    assert {'init_conv.weight', 'layer.0.block.0.batchnorm_0.running_mean', 'layer.0.block.0.conv_0.weight',
            'layer.0.block.0.batchnorm_1.weight', 'layer.0.block.0.conv_1.weight', 'layer.0.block.0.shortcut.weight',
            'layer.2.block.3.conv_1.weight', 'batchnorm.running_var', 'logits.weight', 'logits.bias'} <= keys
    assert 'layer.0.block.1.shortcut.weight' not in keys and not {'mean', 'std'} & keys
    assert max(int(k.split('.')[3]) for k in keys if k.startswith('layer.1.block.')) == 3   # (28-4)/6 = 4 blocks per group
    assert dm.pretrained_cfg['classifier'] == 'logits' and dm.pretrained_cfg['first_conv'] == 'init_conv'
    assert dm._model_args['mean'] == (0.4914, 0.4822, 0.4465) and dm100._model_args['std'] == (0.2673, 0.2564, 0.2762)


def test_dm_wrn_block_padding_and_activation():
    "A DM block at stride 2 pads right/bottom only (TensorFlow SAME) and uses SiLU: a float64 check written out by hand."
    from igdmfast.models import DMBlock
    torch.manual_seed(0)
    b = DMBlock(4, 6, 2).double().eval()
    for bn in (b.batchnorm_0, b.batchnorm_1):
        bn.running_mean.uniform_(-0.5, 0.5); bn.running_var.uniform_(0.5, 2); bn.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    def bn(m, t): return (t - m.running_mean[:, None, None])/torch.sqrt(m.running_var[:, None, None] + m.eps)*m.weight[:, None, None] + m.bias[:, None, None]
    def silu(t): return t/(1 + torch.exp(-t))
    o = silu(bn(b.batchnorm_0, x))
    padded = torch.zeros(2, 4, 9, 9, dtype=torch.float64); padded[:, :, :8, :8] = o
    h = torch.nn.functional.conv2d(padded, b.conv_0.weight, stride=2)
    h = torch.nn.functional.conv2d(silu(bn(b.batchnorm_1, h)), b.conv_1.weight, padding=1)
    want = h + torch.nn.functional.conv2d(o, b.shortcut.weight, stride=2)
    torch.testing.assert_close(b(x), want, rtol=1e-12, atol=1e-12)


def test_input_normalization_inside_the_model(tmp_path):
    torch.manual_seed(0)
    m = WideResNet(depth=10, widen_factor=1, num_classes=3, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5)).eval()
    plain = WideResNet(depth=10, widen_factor=1, num_classes=3).eval()
    plain.load_state_dict(m.state_dict())
    x = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.5]).view(1, 3, 1, 1)
    torch.testing.assert_close(m(x), plain((x - mean)/std))
    assert set(m.state_dict()) == set(plain.state_dict())
    w = timm.create_model('preactresnet18', num_classes=4, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5)).eval()
    back = load_teacher(save_weights(w, tmp_path/'w.pt'))
    assert back._model_args['mean'] == (0.5, 0.4, 0.3) and torch.equal(back(x), w(x))
    one = timm.create_model('preactresnet18', in_chans=1, mean=0.5, std=0.5)
    assert one.mean.shape == (1, 1, 1)
    with pytest.raises(ValueError, match='both mean and std'): WideResNet(depth=10, widen_factor=1, mean=0.5)
    with pytest.raises(ValueError, match='one value per input channel'): WideResNet(depth=10, widen_factor=1, mean=(0.5, 0.5), std=(1, 1))
    with pytest.raises(ValueError, match='std must be positive'): WideResNet(depth=10, widen_factor=1, mean=0.5, std=0)
    with pytest.raises(ValueError, match="Unknown activation 'gelu'"): timm.create_model('dm_wrn28_10', activation='gelu')
