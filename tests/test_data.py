"""Tests of `igdmfast.data`: real .npz data (shared/data), a fastai Learner on digits, image folders, downloads, errors."""
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import igdmfast.sources as data_mod   # the downloads moved to igdmfast.sources (#27)
from igdmfast.core import seed_everything
from igdmfast.data import (DATASETS, TensorImageLoader, crop_flip, crop_flip_params, dataset_path, get_arrays, get_dls,
                           load_npz, random_crop_flip, save_npz, stratified_subset, synth_dls, tensor_dls)

# The project's shared real data: ../shared/data from the repo root (in CI and here), or $IGDMFAST_TEST_DATA.
DATA = Path(os.environ.get('IGDMFAST_TEST_DATA') or Path(__file__).resolve().parents[2]/'shared'/'data')
needs = lambda f: pytest.mark.skipif(not (DATA/f).is_file(), reason=f"{DATA/f} not available")
CIFAR10_NAMES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
MNIST_TRAIN_COUNTS = np.array([5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949])


def _in_unit(x): return x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1


# ----------------------------------------------------------------------------------------------- real data

@needs('mnist.npz')
def test_mnist_npz_subset():
    dls = get_dls(DATA/'mnist.npz', n_train=1000, n_valid=500, bs=100, device='cpu', seed=0)
    assert (dls.name, dls.c, dls.in_chans, dls.img_size, dls.n_inp) == ('mnist', 10, 1, (28, 28), 1)
    assert dls.vocab == [str(i) for i in range(10)]
    assert dls.train.augment is None  # MNIST-like data: no augmentation by default
    assert dls.train_ds.x.dtype == torch.uint8 and dls.train_ds.x.shape == (1000, 1, 28, 28)
    counts = np.bincount(dls.train_ds.y.numpy(), minlength=10)
    assert counts.sum() == 1000 and (np.abs(counts - 1000*MNIST_TRAIN_COUNTS/MNIST_TRAIN_COUNTS.sum()) < 1).all()
    assert len(dls.valid_ds) == 500 and len(dls.train) == 10
    xb, yb = dls.one_batch()
    assert xb.shape == (100, 1, 28, 28) and _in_unit(xb) and yb.dtype == torch.int64
    assert 0.10 < dls.train_ds.x.float().mean().item()/255 < 0.16  # MNIST mean is 0.1307
    # same seed: the same subset; another seed: another one
    again = get_dls(DATA/'mnist.npz', n_train=1000, n_valid=500, bs=100, device='cpu', seed=0)
    assert torch.equal(again.train_ds.x, dls.train_ds.x)
    other = get_dls(DATA/'mnist.npz', n_train=1000, n_valid=500, bs=100, device='cpu', seed=1)
    assert not torch.equal(other.train_ds.x, dls.train_ds.x)


@needs('mnist.npz')
def test_named_dataset_from_data_dir():
    dls = get_dls('mnist', data_dir=DATA, n_train=200, n_valid=100, bs=50, device='cpu', download=False)
    assert dls.name == 'mnist' and len(dls.train_ds) == 200 and len(dls.valid_ds) == 100
    r = get_arrays('mnist', data_dir=DATA, download=False)  # the first test labels of MNIST
    assert r['y_valid'][:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9] and r['x_valid'].shape == (10000, 28, 28)


@needs('cifar10_subset.npz')
def test_cifar10_subset_npz():
    dls = get_dls(DATA/'cifar10_subset.npz', n_train=500, n_valid=200, bs=50, device='cpu')
    assert (dls.c, dls.in_chans, dls.img_size, dls.vocab) == (10, 3, (32, 32), CIFAR10_NAMES)
    assert torch.bincount(dls.train_ds.y).tolist() == [50]*10 and torch.bincount(dls.valid_ds.y).tolist() == [20]*10
    assert dls.train.augment.keywords == dict(pad=4, flip=True) and dls.valid.augment is None
    xb, yb = dls.one_batch()
    assert xb.shape == (50, 3, 32, 32) and _in_unit(xb)
    mean = (dls.train_ds.x.float()/255).mean((0, 2, 3))
    assert torch.allclose(mean, torch.tensor([0.4914, 0.4822, 0.4465]), atol=0.04)
    # the valid set comes in dataset order, unaugmented and exactly the stored pixels
    xv = torch.cat([b[0] for b in dls.valid])
    assert torch.equal(xv, dls.valid_ds.x.float()/255)


@needs('cifar10_subset.npz')
def test_cifar10_name_falls_back_to_subset_with_warning():
    with pytest.warns(UserWarning, match='subset'):
        dls = get_dls('cifar10', data_dir=DATA, n_train=100, n_valid=100, bs=50, device='cpu', download=False)
    assert dls.name == 'cifar10' and dls.vocab == CIFAR10_NAMES and dls.train.augment is not None


@needs('cifar10_lossless_train4000.npz')
def test_npz_without_test_split():
    with pytest.raises(ValueError, match='no test/validation split.*valid_pct'):
        get_dls(DATA/'cifar10_lossless_train4000.npz', device='cpu')
    dls = get_dls(DATA/'cifar10_lossless_train4000.npz', valid_pct=0.2, bs=100, device='cpu')
    assert (len(dls.train_ds), len(dls.valid_ds)) == (3200, 800)
    assert not set(map(bytes, dls.train_ds.x[:50].numpy())) & set(map(bytes, dls.valid_ds.x.numpy()))


@needs('fashion_mnist.npz')
def test_fashion_mnist_npz():
    dls = get_dls(DATA/'fashion_mnist.npz', n_train=300, n_valid=100, bs=60, device='cpu')
    assert dls.vocab[0] == 'T-shirt/top' and dls.c == 10 and dls.in_chans == 1
    assert torch.bincount(dls.train_ds.y).tolist() == [30]*10


# ----------------------------------------------------------------------------------------------- fastai Learner

def test_learner_fits_digits():
    from fastai.learner import Learner, load_learner
    from fastai.metrics import accuracy
    seed_everything(0)
    dls = get_dls(bs=64, device='cpu')
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, dls.c))
    learn = Learner(dls, net, loss_func=nn.CrossEntropyLoss(), metrics=accuracy)
    with learn.no_logging(): learn.fit(1, lr=1e-2)
    preds, targs = learn.get_preds()
    assert torch.equal(targs, dls.valid_ds.y)  # dataset order
    acc = (preds.argmax(1) == targs).float().mean().item()
    assert acc > 0.6, acc  # chance is 0.1
    assert learn.recorder.values[-1][-1] > 0.6


@pytest.mark.filterwarnings('ignore:load_learner')
def test_learner_export_keeps_metadata(tmp_path):
    from fastai.learner import Learner, load_learner
    dls = synth_dls(n_train=64, n_valid=32, n_classes=4, size=8, in_chans=1, bs=16, device='cpu', augment=True)
    learn = Learner(dls, nn.Sequential(nn.Flatten(), nn.Linear(64, 4)), loss_func=nn.CrossEntropyLoss(), path=tmp_path)
    with learn.no_logging(): learn.fit(1)
    learn.export('export.pkl')
    back = load_learner(tmp_path/'export.pkl')
    assert (back.dls.c, back.dls.vocab, back.dls.in_chans, back.dls.name) == (4, [f'class{i}' for i in range(4)], 1, 'synth')
    assert len(back.dls.train_ds) == 0 and back.dls.train.augment is not None


def test_reproducible_batches():
    def run(seed):
        seed_everything(seed)
        dls = synth_dls(n_train=128, n_valid=32, bs=32, device='cpu', augment=True)
        return [b for _ in range(2) for b in dls.train]
    a, b, c = run(5), run(5), run(6)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, c))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_same_batches_on_cuda_and_cpu():
    def run(device):
        seed_everything(1)
        dls = synth_dls(n_train=128, n_valid=32, bs=32, device=device, augment=True)
        return [(x.cpu(), y.cpu()) for x, y in dls.train]
    for (x1, y1), (x2, y2) in zip(run('cpu'), run('cuda')):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    p = crop_flip_params(64, 4, True, torch.Generator().manual_seed(0))
    assert torch.equal(crop_flip(x.cuda(), *p).cpu(), crop_flip(x, *p))


def test_distributed_dl_gets_converted_batches():
    pytest.importorskip('accelerate')  # fastai.distributed needs it
    from fastai.distributed import DistributedDL
    class LocalDDL(DistributedDL):  # one rank of two, no process group
        def _broadcast(self, t, rank): return list(t)
    x, y = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8), torch.arange(10)
    ddl = LocalDDL(TensorImageLoader((x, y), bs=2, augment=True), rank=0, world_size=2)
    b = list(ddl)
    assert [len(xb) for xb, _ in b] == [2, 2, 1] and all(xb.dtype == torch.float32 for xb, _ in b)
    assert torch.cat([yb for _, yb in b]).tolist() == [0, 1, 2, 3, 4]


# ----------------------------------------------------------------------------------------------- augmentation

def test_random_crop_flip_matches_torchvision_semantics():
    # torchvision's RandomCrop(32, padding=4) + flip, replayed per image with the same offsets
    x = torch.rand(32, 3, 32, 32)
    dy, dx, fl = crop_flip_params(32, 4, True, torch.Generator().manual_seed(3))
    import torchvision.transforms.v2.functional as TF
    ref = []
    for xi, a, b, f in zip(x, dy.tolist(), dx.tolist(), fl.tolist()):
        c = TF.crop(TF.pad(xi, [4]), a, b, 32, 32)
        ref.append(TF.horizontal_flip(c) if f else c)
    assert torch.equal(random_crop_flip(x, generator=torch.Generator().manual_seed(3)), torch.stack(ref))


# ----------------------------------------------------------------------------------------------- image folders

def _write(root, arrays, labels, names):
    for i, (a, l) in enumerate(zip(arrays, labels)):
        (root/names[l]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(root/names[l]/f'{i:05d}.png')


def test_image_folder_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8); y = np.arange(50) % 5
    names = ['ant', 'bee', 'cow', 'dog', 'elk']
    _write(tmp_path/'train', x[:40], y[:40], names); _write(tmp_path/'test', x[40:], y[40:], names)
    dls = get_dls(tmp_path, bs=8, device='cpu')
    o = np.argsort(y[:40], kind='stable')
    assert dls.vocab == names and dls.name == tmp_path.name and dls.img_size == (32, 32)
    assert torch.equal(dls.train_ds.x, torch.from_numpy(x[:40][o]).permute(0, 3, 1, 2))
    assert torch.equal(dls.train_ds.y, torch.from_numpy(y[:40][o]))
    assert dls.train.augment is not None  # RGB, 32 px: CIFAR-like
    # round trip through the .npz layout
    r = get_arrays(tmp_path)
    p = save_npz(tmp_path/'rt.npz', r['x_train'], r['y_train'], r['x_valid'], r['y_valid'], r['class_names'])
    d2 = get_dls(p, bs=8, device='cpu')
    assert torch.equal(d2.train_ds.x, dls.train_ds.x) and d2.vocab == names
    # grayscale folders give one channel; size= resizes
    g = tmp_path/'gray'
    _write(g/'train', x[:20, :, :, 0], y[:20], names); _write(g/'valid', x[20:30, :, :, 0], y[20:30], names)
    dg = get_dls(g, bs=4, size=(16, 12), device='cpu')
    assert (dg.in_chans, dg.img_size) == (1, (16, 12)) and dg.train.augment is None


def test_download_is_converted_once_and_cached(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8); y = np.arange(30) % 10
    fake = tmp_path/'mnist_png'
    _write(fake/'training', x[:20], y[:20], [str(i) for i in range(10)])
    _write(fake/'testing', x[20:], y[20:], [str(i) for i in range(10)])
    calls = []
    monkeypatch.setattr(data_mod, 'untar_data', lambda url: calls.append(url) or fake)
    dls = get_dls('mnist', data_dir=tmp_path/'cache', bs=10, device='cpu')
    assert (tmp_path/'cache'/'mnist.npz').is_file() and len(calls) == 1
    assert dls.in_chans == 1 and dls.train.augment is None and len(dls.valid_ds) == 10
    get_dls('mnist', data_dir=tmp_path/'cache', bs=10, device='cpu')
    assert len(calls) == 1  # the second call reads the cache
    assert load_npz(tmp_path/'cache'/'mnist.npz')['x_train'].dtype == np.uint8


def test_failed_download_says_where_to_put_the_file(tmp_path, monkeypatch):
    def offline(*a, **k): raise ConnectionError('network is unreachable')
    monkeypatch.setattr(data_mod, 'untar_data', offline)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path/'cifar100.npz')) + '.*unreachable.*Put a cifar100.npz'):
        get_dls('cifar100', data_dir=tmp_path)
    import torchvision.datasets
    monkeypatch.setattr(torchvision.datasets, 'SVHN', offline)
    with pytest.raises(FileNotFoundError, match='svhn.npz.*IGDMFAST_DATA'):
        get_dls('svhn', data_dir=tmp_path)
    monkeypatch.setenv('IGDMFAST_DATA', str(tmp_path/'env'))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path/'env'/'tiny_imagenet.npz'))):
        dataset_path('tiny-imagenet', download=False)


# ----------------------------------------------------------------------------------------------- bad inputs

X = np.random.default_rng(0).random((8, 3, 4, 4)).astype(np.float32)
Y = np.arange(8) % 2

@pytest.mark.parametrize('kw,exc,msg', [
    (dict(x_train=X*255), ValueError, 'divide by 255'),
    (dict(x_valid=(X - 0.5)/0.25), ValueError, 'looks normalized.*normalization goes in the model'),
    (dict(x_train=np.where(X > 0.5, np.nan, X)), ValueError, 'NaN or inf'),
    (dict(x_train=np.where(X > 0.5, -np.inf, X)), ValueError, 'NaN or inf'),
    (dict(x_train=X[:, 0, 0]), ValueError, r'2 dims.*\(N, H, W\)'),
    (dict(x_train=X[None]), ValueError, r'5 dims'),
    (dict(y_train=Y[:7]), ValueError, '8 images but y_train has 7 labels'),
    (dict(y_train=Y.astype(np.float64)), TypeError, 'integer class indices'),
    (dict(y_valid=np.array(list('abababab'))), TypeError, 'integer class indices'),
    (dict(y_valid=Y - 1), ValueError, 'negative labels'),
    (dict(y_train=np.eye(2)[Y].astype(np.int64)), ValueError, 'one-hot'),
    (dict(x_train=X[:0], y_train=Y[:0]), ValueError, 'x_train is empty'),
    (dict(x_train=(X*255).astype(np.int32)), TypeError, 'uint8'),
    (dict(bs=20), ValueError, r'bs=20 is larger than the training set \(8 images\).*bs=8'),
    (dict(bs=0), ValueError, 'positive integer'),
    (dict(class_names=['only']), ValueError, 'only 1 class_names'),
])
def test_bad_inputs(kw, exc, msg):
    args = dict(x_train=X, y_train=Y, x_valid=X, y_valid=Y, bs=4, device='cpu')
    with pytest.raises(exc, match=msg): tensor_dls(**{**args, **kw})


def test_bad_sources(tmp_path):
    with pytest.raises(ValueError, match='Unknown data source .imagenet.*' + ', '.join(DATASETS)): get_dls('imagenet')
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path/'missing.npz'))): get_dls(tmp_path/'missing.npz')
    with pytest.raises(FileNotFoundError, match='missing_dir'): get_dls(str(tmp_path/'missing_dir'))
    (tmp_path/'notes.txt').write_text('hi')
    with pytest.raises(ValueError, match='not an .npz'): get_dls(tmp_path/'notes.txt')
    with pytest.raises(ValueError, match='bs=64'): get_dls(n_train=100, bs=128, device='cpu')
    with pytest.raises(ValueError, match='1..1437'): get_dls(n_train=5000, device='cpu')
    with pytest.raises(TypeError, match='source'): get_dls(3)
    np.savez(tmp_path/'bad.npz', images=X)
    with pytest.raises(ValueError, match='x_train and y_train'): get_dls(tmp_path/'bad.npz')


def test_stratified_subset_keeps_proportions():
    y = np.repeat(np.arange(3), [600, 300, 100])
    idx = stratified_subset(y, 100, seed=0)
    assert np.bincount(y[idx]).tolist() == [60, 30, 10] and len(set(idx)) == 100


def test_loader_len_and_drop_last():
    x, y = torch.rand(10, 1, 2, 2), torch.arange(10)
    assert [len(b[0]) for b in TensorImageLoader((x, y), bs=4)] == [4, 4, 2]
    assert [len(b[0]) for b in TensorImageLoader((x, y), bs=4, drop_last=True, shuffle=True)] == [4, 4]
