import os

import numpy as np
import pytest
import torch

from ckptavg.errors import DataError
from ckptavg.nn.data import get_dataset, make_loader, read_idx, split_batch
from tests.conftest import SHARED_DATA
from tests.fakedata import write_cifar10, write_cifar100, write_mnist

FASHION = os.path.join(SHARED_DATA, "fashion-mnist")


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_fashion_mnist_idx_layouts(tmp_path, compress, layout):
    arrays = write_mnist(str(tmp_path), compress=compress, layout=layout)
    ds = get_dataset("fashion-mnist", "test", str(tmp_path))
    images, labels = arrays["test"]
    assert len(ds) == len(labels)
    x, y = ds[3]
    assert x.shape == (1, 28, 28) and y.item() == labels[3]
    expected = (images[3, 5, 7] / 255 - 0.2860) / 0.3530
    assert x[0, 5, 7].item() == pytest.approx(expected, abs=1e-6)


def test_augmented_fashion_mnist_keeps_size_and_label(tmp_path):
    write_mnist(str(tmp_path))
    ds = get_dataset("fashion-mnist", "train", str(tmp_path), augment=True)
    x, y = ds[0]
    assert x.shape == (1, 28, 28) and y.item() == 0


def test_missing_mnist_files_one_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\[\.gz\].*--data-dir or --download"):
        get_dataset("fashion-mnist", "test", str(tmp_path))


def test_corrupt_idx(tmp_path):
    p = tmp_path / "x-idx3-ubyte"
    p.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 9, 1, 2]))
    with pytest.raises(DataError, match="truncated"):
        read_idx(str(p))


def test_cifar10_real_format(tmp_path):
    batches = write_cifar10(str(tmp_path))
    train = get_dataset("cifar10", "train", str(tmp_path))
    test = get_dataset("cifar10", "test", str(tmp_path))
    assert len(train) == 40 and len(test) == 10
    data, labels = batches["test_batch"]
    x, y = test[2]
    assert x.shape == (3, 32, 32) and y == labels[2] and x.dtype == torch.float32
    # pixel (row 0, col 1) of the red plane, normalised with the SWA authors' constants
    assert x[0, 0, 1].item() == pytest.approx((data[2, 1] / 255 - 0.4914) / 0.2023, abs=1e-5)
    aug = get_dataset("cifar10", "train", str(tmp_path), augment=True)
    assert aug[0][0].shape == (3, 32, 32)


def test_cifar100_real_format(tmp_path):
    written = write_cifar100(str(tmp_path))
    for split, n in (("train", 20), ("test", 10)):
        ds = get_dataset("cifar100", split, str(tmp_path))
        data, fine = written[split]
        assert len(ds) == n
        # every label is the fine one (0-99), never the superclass
        assert [int(ds[i][1]) for i in range(n)] == fine
        x, _ = ds[3]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        # pixel (row 1, col 2) of the blue plane, normalised with the SWA authors' constants
        # (their code uses CIFAR-10's for CIFAR-100 too)
        raw = data[3, 2 * 1024 + 1 * 32 + 2] / 255
        assert x[2, 1, 2].item() == pytest.approx((raw - 0.4465) / 0.2010, abs=1e-5)


def test_missing_cifar_names_files_and_folder(tmp_path):
    with pytest.raises(DataError) as e:
        get_dataset("cifar10", "train", str(tmp_path))
    msg = str(e.value)
    assert "cifar-10-batches-py" in msg and "data_batch_1" in msg and "--download" in msg


def test_cifar_pickle_with_code_is_refused(tmp_path):
    import pickle

    write_cifar10(str(tmp_path))
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": __import__("collections").OrderedDict()}, f)
    with pytest.raises(DataError, match="refused global collections.OrderedDict"):
        get_dataset("cifar10", "test", str(tmp_path))


def test_unknown_data_set_suggests():
    with pytest.raises(DataError, match="did you mean cifar10"):
        get_dataset("cifar-10")


def test_default_data_dir_from_env(tmp_path, monkeypatch):
    write_mnist(str(tmp_path))
    monkeypatch.setenv("CKPTAVG_DATA", str(tmp_path))
    assert len(get_dataset("fashion-mnist", "test")) == 32


def test_user_data_function_and_dict_batches():
    ds = get_dataset("tests.fakedata:dict_batches", "train")
    loader = make_loader(ds, batch_size=4)
    batch = next(iter(loader))
    x, y = split_batch(batch)
    assert x.shape == (4, 1, 28, 28) and y.tolist() == [0, 1, 2, 3]
    with pytest.raises(DataError, match="--input-key"):
        split_batch({"pixels": x})
    assert split_batch({"pixels": x}, "pixels")[0] is x
    assert split_batch(x)[1] is None


@pytest.mark.skipif(not os.path.isdir(FASHION), reason="../shared/data not present")
def test_real_fashion_mnist_from_shared():
    train = get_dataset("fashion-mnist", "train", FASHION)
    test = get_dataset("fashion-mnist", "test", FASHION)
    assert len(train) == 60000 and len(test) == 10000
    assert train[0][1].item() == 9  # the first training image is an ankle boot
    counts = np.bincount(test.y.numpy(), minlength=10)
    assert counts.tolist() == [1000] * 10
    assert torch.isfinite(train.x[:100]).all()


# ------------------------------------------------------------ one data pass, split by rank


def _batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("limit", [None, 5])
def test_pass_batches_of_the_ranks_interleave_into_the_one_process_pass(shuffle, limit):
    """Properties, not the sampler's own formula: one process sees every image once (in
    order unless shuffled; a seed fixes the order), in batches of 8 and a last of 2, each
    batch with its own seed; the batches of P ranks, interleaved, are the one-process pass,
    seed for seed."""
    from ckptavg.nn.data import PassBatches

    one = list(PassBatches(50, 8, shuffle, seed=3, limit=limit))
    images = [[j for _, j in b] for b in one]
    assert [len(b) for b in images] == ([8] * 6 + [2])[:limit]
    flat = [j for b in images for j in b]
    assert len(set(flat)) == len(flat)
    if limit is None:
        assert sorted(flat) == list(range(50))
    assert (flat != sorted(flat)) == shuffle
    again = [[j for _, j in b] for b in PassBatches(50, 8, shuffle, seed=3, limit=limit)]
    other = [[j for _, j in b] for b in PassBatches(50, 8, shuffle, seed=4, limit=limit)]
    assert again == images and (other != images) == shuffle
    seeds = [{s for s, _ in b} for b in one]
    assert all(len(s) == 1 for s in seeds) and len({min(s) for s in seeds}) == len(seeds)
    for ranks in (2, 3):
        parts = [list(PassBatches(50, 8, shuffle, 3, limit, r, ranks)) for r in range(ranks)]
        assert [len(p) for p in parts] == [len(PassBatches(50, 8, shuffle, 3, limit, r, ranks))
                                           for r in range(ranks)]
        assert sum(len(p) for p in parts) == len(one)
        for i, batch in enumerate(one):
            assert parts[i % ranks][i // ranks] == batch


def test_augmented_batches_do_not_depend_on_rank_or_worker_processes(tmp_path):
    """Batch i holds the same images with the same random crops and flips whether one
    process, one of two ranks or a worker process loads it; the caller's generators are
    left as they were."""
    from ckptavg.nn.data import pass_loader

    write_mnist(str(tmp_path), n_train=40)
    ds = get_dataset("fashion-mnist", "train", str(tmp_path), augment=True)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    one = _batches(pass_loader(ds, 6, shuffle=True, seed=5))
    assert torch.equal(torch.get_rng_state(), before)
    ranks = [_batches(pass_loader(ds, 6, shuffle=True, seed=5, rank=r, ranks=2)) for r in (0, 1)]
    assert len(one) == 7 and [len(r) for r in ranks] == [4, 3]
    for i, (x, y) in enumerate(one):
        rx, ry = ranks[i % 2][i // 2]
        assert torch.equal(x, rx) and torch.equal(y, ry)
    workers = _batches(pass_loader(ds, 6, shuffle=True, seed=5, workers=2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(one, workers))
    # the augmentation is at work: the same images in order, crops differing between seeds
    a = _batches(pass_loader(ds, 40, seed=5))[0][0]
    b = _batches(pass_loader(ds, 40, seed=6))[0][0]
    plain = torch.stack([get_dataset("fashion-mnist", "train", str(tmp_path))[j][0]
                         for j in range(40)])
    assert not torch.equal(a, b) and not torch.equal(a, plain)


def test_an_iterable_data_set_is_read_as_a_stream():
    """A user's IterableDataset has no length to split or shuffle: one pass in its own order
    (every rank would read all of it and keep its batches)."""
    from ckptavg.nn.data import own_share, pass_batches, pass_loader

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            for i in range(10):
                yield torch.full((1, 2, 2), float(i)), i

    loader = pass_loader(Stream(), 4, shuffle=True, seed=3)
    labels = [y.tolist() for _, y in loader]
    assert labels == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert pass_batches(loader) is None and own_share(loader, 0, 1) and not own_share(loader, 0, 2)


def test_evaluate_and_recalibrate_take_a_stream():
    """eval and the BatchNorm pass over an IterableDataset (no length): every sample once."""
    from ckptavg.nn.bn import recalibrate
    from ckptavg.nn.evaluation import predict
    from tests.fakedata import tiny_bn

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            g = torch.Generator().manual_seed(0)
            for i in range(10):
                yield torch.randn(1, 8, 8, generator=g), i % 10

    from ckptavg.nn.data import pass_loader

    net = tiny_bn()
    assert recalibrate(net, pass_loader(Stream(), 4)).samples == 10
    probs, labels = predict(net, pass_loader(Stream(), 4))
    assert probs.shape == (10, 10) and labels.tolist() == list(range(10))


@pytest.mark.parametrize("env, expected", [
    ({"CKPTAVG_DATA": "/d", "XDG_CACHE_HOME": "/x"}, "/d"),
    ({"CKPTAVG_DATA": "", "XDG_CACHE_HOME": "/x"}, "/x/ckptavg/data"),
    ({"XDG_CACHE_HOME": "relative/cache"}, "HOME/.cache/ckptavg/data"),
    ({"XDG_CACHE_HOME": ""}, "HOME/.cache/ckptavg/data"),
    ({}, "HOME/.cache/ckptavg/data"),
])
def test_the_data_folder_follows_the_documented_precedence(monkeypatch, env, expected):
    from ckptavg.nn.data import default_data_dir

    for k in ("CKPTAVG_DATA", "XDG_CACHE_HOME"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", "/home/u")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert default_data_dir() == expected.replace("HOME", "/home/u")
