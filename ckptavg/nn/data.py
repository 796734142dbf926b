"""Data sets through torchvision, loaders, and batch -> model-input adapters.

Names: cifar10, cifar100, fashion-mnist, mnist, svhn, imagefolder, or
`package.module:function` returning a Dataset or DataLoader. `data_dir` is torchvision's
`root` (for CIFAR-10, the folder holding `cifar-10-batches-py`); it defaults to
$CKPTAVG_DATA, else a user cache folder. Fashion-MNIST/MNIST are read from their IDX files
(`.gz` or not) found in `data_dir`, `data_dir/<Name>/raw`, or torchvision's layout.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib
import inspect
import os
import pickle
import random
import zlib
from dataclasses import dataclass

import torch

from ckptavg.errors import DataError, OptionError, users_code
from ckptavg.nn.models import importable_from_cwd
from ckptavg.options import SEED, Split, check_choice

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # SWA authors'


@dataclass(frozen=True)
class DataInfo:
    name: str
    num_classes: int | None  # None: the data set does not tell
    in_channels: int | None


INFO = {
    "cifar10": DataInfo("cifar10", 10, 3),
    "cifar100": DataInfo("cifar100", 100, 3),
    "fashion-mnist": DataInfo("fashion-mnist", 10, 1),
    "mnist": DataInfo("mnist", 10, 1),
    "svhn": DataInfo("svhn", 10, 3),
    "imagefolder": DataInfo("imagefolder", 0, 3),
}
DATASETS = tuple(INFO)


def default_data_dir() -> str:
    """$CKPTAVG_DATA when set and not empty; else $XDG_CACHE_HOME/ckptavg/data when
    XDG_CACHE_HOME is an absolute path (the XDG rule: a relative one is ignored); else
    ~/.cache/ckptavg/data."""
    if os.environ.get("CKPTAVG_DATA"):
        return os.path.expanduser(os.environ["CKPTAVG_DATA"])
    cache = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(cache):
        cache = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "ckptavg", "data")


# ---------------------------------------------------------------- MNIST-family (IDX files)

_IDX = {
    "fashion-mnist": ("FashionMNIST", (0.2860,), (0.3530,)),
    "mnist": ("MNIST", (0.1307,), (0.3081,)),
}
_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _download(cls, name: str, root: str, split: str) -> None:
    """Fetch a torchvision data set into `root` (torchvision checks the archive's md5). A
    failed download takes back the folders it created, empty ones only: nothing that was
    there before, nothing a user put there."""
    own = os.path.join(root, cls.__name__)  # torchvision's folders for it
    made = [d for d in (os.path.join(own, "raw"), os.path.join(own, "processed"), own)
            if not os.path.exists(d)] + _missing_folders(root)
    try:
        cls(root, train=split == "train", download=True)
    except Exception as e:  # network errors come in many types
        for folder in made:  # deepest first
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only if empty
        text = str(e).strip().splitlines()
        why = text[0][:200] if text else type(e).__name__
        raise DataError(f"{name}: download to {root} failed ({why}); check the network, or "
                        "put the files there yourself and drop --download") from None


def _missing_folders(path: str) -> list[str]:
    """The folders of `path` that do not exist yet, deepest first."""
    out = []
    path = os.path.abspath(path)
    while not os.path.exists(path):
        out.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return out


def read_idx(path: str) -> torch.Tensor:
    """An IDX file (optionally gzipped) as a uint8 tensor."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e or 'truncated'});"
                        " the file is corrupt or incomplete: download it again") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = data[4 + 4 * ndim:]
    n = 1
    for s in shape:
        n *= s
    if len(body) != n:
        raise DataError(f"{path}: truncated IDX file ({len(body)} of {n} bytes)")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


def _find_idx(root: str, folder: str, stem: str) -> str | None:
    for d in (root, os.path.join(root, folder, "raw"), os.path.join(root, folder)):
        for suffix in ("", ".gz"):
            p = os.path.join(d, stem + suffix)
            if os.path.isfile(p):
                return p
    return None


class IdxDataset(torch.utils.data.Dataset):
    """Images held as one normalised tensor; augmentation is a random crop (2-pixel
    padding of background) and, for Fashion-MNIST, a horizontal flip."""

    PAD = 2

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std, augment: bool,
                 flip: bool):
        x = images.unsqueeze(1).float().div_(255)
        x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
        bg = float(-mean[0] / std[0])  # the value of a black pixel after normalisation
        self.x = torch.nn.functional.pad(x, (self.PAD,) * 4, value=bg) if augment else x
        self.size = images.shape[-1]
        self.y = labels.long()
        self.augment, self.flip = augment, flip

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        x = self.x[i]
        if self.augment:
            dx, dy = torch.randint(0, 2 * self.PAD + 1, (2,)).tolist()
            x = x[:, dy:dy + self.size, dx:dx + self.size]
            if self.flip and torch.rand(()) < 0.5:
                x = x.flip(-1)
        return x, self.y[i]


def _idx_dataset(name: str, root: str, split: str, augment: bool, download: bool):
    folder, mean, std = _IDX[name]
    if download:
        import torchvision

        _download(getattr(torchvision.datasets, folder), name, root, split)
    stems = _IDX_FILES[split]
    paths = [_find_idx(root, folder, s) for s in stems]
    if None in paths:
        raise DataError(
            f"{name} {split} split not found: expected {stems[0]}[.gz] and {stems[1]}[.gz] in "
            f"{root} or {os.path.join(root, folder, 'raw')}; pass --data-dir or --download"
        )
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    return IdxDataset(images, labels, mean, std, augment, flip=name == "fashion-mnist")


# ---------------------------------------------------------------- torchvision data sets


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR's batch files are pickles: only numpy's array-rebuilding globals are allowed."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("copy_reg", "_reconstructor"),
               ("copyreg", "_reconstructor"), ("__builtin__", "object"), ("builtins", "object"),
               ("_codecs", "encode")}  # how protocol-2 pickles carry bytes

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        if module.startswith("numpy.core"):
            import numpy

            module = module.replace("numpy.core", "numpy._core" if hasattr(numpy, "_core")
                                    else "numpy.core")
        module = {"copy_reg": "copyreg", "__builtin__": "builtins"}.get(module, module)
        return super().find_class(module, name)


def _load_pickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: {e}; not a CIFAR batch file") from None
    except (EOFError, ValueError) as e:
        raise DataError(f"{path}: corrupt CIFAR batch file ({e})") from None


_CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels"),
}


class ArrayDataset(torch.utils.data.Dataset):
    """uint8 images [N, C, H, W] with integer labels and tensor transforms."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform, classes=None):
        self.images, self.y, self.transform = images, labels, transform
        self.classes = classes

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.transform(self.images[i].float().div_(255)), int(self.y[i])


def _cifar(name: str, root: str, split: str, augment: bool, download: bool):
    """CIFAR-10/100 from torchvision's on-disk layout, read without torchvision's md5 check
    (files of a user's own pipeline load as they are) and with a numpy-only unpickler."""
    import numpy as np
    from torchvision import transforms as T

    folder, train_files, test_files, label_key = _CIFAR[name]
    if download:
        import torchvision

        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        _download(cls, name, root, split)
    files = train_files if split == "train" else test_files
    paths = [os.path.join(root, folder, f) for f in files]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(
            f"{name} {split} split not found: expected {os.path.join(root, folder)}/ with "
            f"{', '.join(files)}; pass --data-dir ROOT (the folder holding {folder}) or --download"
        )
    data, labels = [], []
    for p in paths:
        entry = _load_pickle(p)
        if "data" not in entry or label_key not in entry:
            raise DataError(f"{p}: no 'data'/'{label_key}' entries; not a {name} batch file")
        data.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(entry[label_key])
    images = torch.from_numpy(np.concatenate(data))
    tf = T.Compose(([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if augment else [])
                   + [T.Normalize(CIFAR_MEAN, CIFAR_STD)])
    return ArrayDataset(images, torch.tensor(labels, dtype=torch.long), tf)


def _svhn(root: str, split: str, augment: bool, download: bool):
    import torchvision
    from torchvision import transforms as T

    tf = T.Compose(([T.RandomCrop(32, padding=4)] if augment else [])
                   + [T.ToTensor(), T.Normalize((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))])
    try:
        return torchvision.datasets.SVHN(root, split=split, download=download, transform=tf)
    except ImportError:
        raise DataError("svhn needs scipy to read its .mat files: pip install scipy") from None
    except RuntimeError:
        raise DataError(f"svhn not found: expected {root}/{split}_32x32.mat; "
                        "pass --data-dir or --download") from None


def _imagefolder(root: str, split: str, augment: bool):
    import torchvision
    from torchvision import transforms as T

    folder = os.path.join(root, split) if os.path.isdir(os.path.join(root, split)) else root
    if not os.path.isdir(folder):
        raise DataError(f"imagefolder: {folder} is not a folder; pass --data-dir with "
                        f"{split}/CLASS/IMAGE files")
    norm = [T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    tf = T.Compose(([T.RandomResizedCrop(224), T.RandomHorizontalFlip()] if augment
                    else [T.Resize(256), T.CenterCrop(224)]) + norm)
    try:
        return torchvision.datasets.ImageFolder(folder, transform=tf)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"imagefolder: {folder}: {e}") from None


def _user_function(spec: str):
    """The function a `package.module:function` data spec names (the user named it: run)."""
    module_name, _, attr = spec.partition(":")
    importable_from_cwd()
    try:
        return getattr(importlib.import_module(module_name), attr)
    except ImportError as e:
        raise OptionError("data", f"cannot import {module_name} ({e}); modules are looked up "
                          "in the working folder and on the Python path", spec) from None
    except AttributeError:
        raise OptionError("data", f"{module_name} has no {attr!r}", spec) from None


def data_takes(name: str) -> frozenset[str]:
    """Which of `split` and `augment` the data set can be asked for: both for a known data
    set; for a user's `module:function`, the ones it takes as parameters (or **kwargs)."""
    return _takes(_user_function(name)) if ":" in name else frozenset({"split", "augment"})


def _takes(fn) -> frozenset[str]:
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return frozenset({"split", "augment"})
    return frozenset(p.name for p in params if p.name in ("split", "augment"))


def describe_data(name: str, split: str, augment: bool, subset: int | None = None) -> str:
    """What a pass read, as metadata records it (`bn.data`): only what was asked of the data
    and could be: `mymodule:loader` for a function that takes neither split nor augment."""
    takes = data_takes(name)
    return (name + (f":{split}" if "split" in takes else "")
            + (f":first{subset}" if subset else "")
            + (":augment" if augment and "augment" in takes else ""))


def eval_split(name: str, split: str | None) -> str:
    """The split an evaluation reports: `split` when given (the user's word for what a
    function that takes no split returns); else "test", when the data can be asked for it."""
    if split is not None:
        check_choice("split", split, Split)
        return split
    if "split" in data_takes(name):
        return "test"
    raise OptionError(("data", "split"), f"{name} takes no `split` parameter, so ckptavg "
                      "cannot ask it for the test images and will not call what it returns "
                      "test data; give the function a `split` parameter (it is called with "
                      "split='train' or 'test'), or say which images it returns with split "
                      "test or train", mentions=("split",))


def _user(spec: str, split: str, augment: bool):
    fn = _user_function(spec)
    takes = _takes(fn)
    kwargs = {k: v for k, v in (("split", split), ("augment", augment)) if k in takes}
    with users_code(f"the data function {spec}"):
        return fn(**kwargs)


def get_dataset(name: str, split: str = "train", data_dir: str | None = None,
                augment: bool = False, download: bool = False):
    """A Dataset (or a user's DataLoader) for `name` and `split` ('train' or 'test')."""
    root = os.path.expanduser(data_dir) if data_dir else default_data_dir()
    if split not in ("train", "test"):
        raise DataError(f"split {split!r}: use train or test")
    if ":" in name:
        return _user(name, split, augment)
    if name in _IDX:
        return _idx_dataset(name, root, split, augment, download)
    if name in ("cifar10", "cifar100"):
        return _cifar(name, root, split, augment, download)
    if name == "svhn":
        return _svhn(root, split, augment, download)
    if name == "imagefolder":
        return _imagefolder(root, split, augment)
    import difflib

    close = difflib.get_close_matches(name, DATASETS, n=2)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise DataError(f"unknown data set {name!r}; {hint}known: {', '.join(DATASETS)}, "
                    "or package.module:function")


def data_info(name: str, dataset=None) -> DataInfo:
    """Classes and channels, for building the model: known data sets from the table; others
    from the data set (`classes`, and the channels of its first sample), None where it does
    not tell (a factory then keeps its own default: never a guess)."""
    if name in INFO and name != "imagefolder":
        return INFO[name]
    classes = getattr(dataset, "classes", None)
    return DataInfo(name, len(classes) if classes else None, _channels(dataset))


def _channels(dataset) -> int | None:
    try:
        first = next(iter(dataset)) if isinstance(dataset, torch.utils.data.DataLoader) else dataset[0]
        x, _ = split_batch(first)
        x = torch.as_tensor(x)
        if isinstance(dataset, torch.utils.data.DataLoader):
            return int(x.shape[1]) if x.dim() >= 4 else 1
        return int(x.shape[0]) if x.dim() >= 3 else 1
    except Exception:  # a data set we cannot peek into: unknown (the factory's default)
        return None


def first_images(n_images: int, n: int | None, option: str = "subset",
                 where: str = "the data set") -> int:
    """How many images a pass takes: the first `n` (all without one). Asking for more images
    than `where` has is an OptionError naming `option` and the count there is: never a
    silent clamp, which would move every range cut from it (held-out images included)."""
    if n is None:
        return n_images
    if n > n_images:
        from ckptavg.errors import OptionError

        raise OptionError(option, f"asks for more images than {where} has ({n_images}); "
                          f"give at most {n_images}", n)
    return n


def holdout_split(n_images: int, subset: int | None, holdout: int,
                  option: str | tuple[str, ...] = "train_images") -> tuple[range, range]:
    """(training images, held-out images) as index ranges: of the first `subset` images (all
    without one), the last `holdout` are held out. `train --holdout` and the held-out
    selection of `soup` and `search` split the same way. `option`: what `subset` was given
    as, for the error when the data set has fewer images."""
    from ckptavg.errors import OptionError

    names = (option,) if isinstance(option, str) else option
    n = first_images(n_images, subset, names[0], "the training split")
    if holdout < 0:
        raise OptionError("holdout", "must be 0 or more", holdout)
    if holdout >= n:
        raise OptionError("holdout", f"must be less than the {n} training images it is held "
                          f"out of (the first {names[0]}, else the whole split), so that "
                          "some are left to train on", holdout, mentions=names[:1])
    return range(0, n - holdout), range(n - holdout, n)


def make_loader(dataset, batch_size: int = 128, shuffle: bool = False, workers: int = 0,
                seed: int | None = None, subset: int | None = None, device: str = "cpu",
                subset_option: str = "subset"):
    """A DataLoader (a user's DataLoader passes through untouched). `subset`: the first N
    images; more than the data set has is an OptionError naming `subset_option`."""
    if isinstance(dataset, torch.utils.data.DataLoader):
        return dataset
    if subset is not None:
        dataset = torch.utils.data.Subset(
            dataset, range(first_images(len(dataset), subset, subset_option)))
    g = torch.Generator()
    if seed is not None:
        g.manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                                       num_workers=workers, generator=g,
                                       pin_memory=device.startswith("cuda"),
                                       persistent_workers=workers > 0)


class PassBatches(torch.utils.data.Sampler):
    """The batches of one data pass (BatchNorm recalibration, evaluation), the same on every
    rank: the images in order, or shuffled by `seed` (torch.randperm), cut into batches of
    `batch_size` (the last one may be short), the first `limit` batches kept. Rank `rank` of
    `ranks` yields only batch i with i % ranks == rank, so each rank loads only its share.

    Each batch comes as [(batch seed, image index), ...]: `SeededImages` seeds the random
    transforms of batch i with `batch_seed(seed, i)`, so batch i is the same images with the
    same augmentations whichever rank, worker process or worker count loads it."""

    def __init__(self, n_images: int, batch_size: int, shuffle: bool = False, seed: int = SEED,
                 limit: int | None = None, rank: int = 0, ranks: int = 1):
        if batch_size < 1:
            raise DataError(f"batch size {batch_size}: must be 1 or more (--batch-size)")
        self.n_images, self.batch_size, self.shuffle = n_images, batch_size, shuffle
        self.seed, self.rank, self.ranks = seed, rank, ranks
        self.total = -(-n_images // batch_size)  # batches of the whole pass, all ranks
        if limit is not None:
            self.total = min(self.total, limit)

    def __len__(self) -> int:
        return len(range(self.rank, self.total, self.ranks))

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.n_images, generator=torch.Generator().manual_seed(self.seed))
        else:
            order = torch.arange(self.n_images)
        for i in range(self.rank, self.total, self.ranks):
            s = batch_seed(self.seed, i)
            yield [(s, j) for j in order[i * self.batch_size:(i + 1) * self.batch_size].tolist()]


def batch_seed(seed: int, i: int) -> int:
    """The seed of batch i's random transforms in a pass seeded with `seed`."""
    return (seed * 1_000_003 + i) % (1 << 63)


@contextlib.contextmanager
def seeded(seed: int, device=None):
    """Run the block with torch's generators (CPU, and `device` if it is a GPU) seeded with
    `seed`; the caller's generator states are restored after."""
    dev = torch.device(device) if device is not None else None
    gpus = [dev.index if dev.index is not None else torch.cuda.current_device()] \
        if dev is not None and dev.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus):
        torch.manual_seed(seed)
        yield


class SeededImages(torch.utils.data.Dataset):
    """A data set whose items are (seed, index): a batch's random transforms draw from torch's
    and Python's generators seeded with its batch seed; the caller's generators are left as
    they were."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        return self.__getitems__([item])[0]

    def __getitems__(self, items):
        if not items:
            return []
        state = random.getstate()
        try:
            with seeded(items[0][0]):
                random.seed(items[0][0])
                return [self.dataset[j] for _, j in items]
        finally:
            random.setstate(state)


def pass_loader(dataset, batch_size: int, *, shuffle: bool = False, seed: int = SEED,
                workers: int = 0, subset: int | None = None, limit: int | None = None,
                rank: int = 0, ranks: int = 1, device: str = "cpu",
                subset_option: str = "subset"):
    """A DataLoader for one pass over `dataset` that yields rank `rank`'s share of the
    batches (`PassBatches`), with per-batch seeded augmentations. A user's DataLoader passes
    through untouched, and an iterable data set is read as a stream in its own order: every
    rank then iterates all of it (`own_share` tells the difference)."""
    if isinstance(dataset, torch.utils.data.DataLoader):
        return dataset
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
        # A stream: in its own order (no shuffling, no subset), whole on every rank.
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                           pin_memory=device.startswith("cuda"))
    if subset is not None:
        dataset = torch.utils.data.Subset(
            dataset, range(first_images(len(dataset), subset, subset_option)))
    batches = PassBatches(len(dataset), batch_size, shuffle, seed, limit, rank, ranks)
    # its own generator: the loader's draw of the workers' base seed leaves the caller's alone
    return torch.utils.data.DataLoader(SeededImages(dataset), batch_sampler=batches,
                                       num_workers=workers,
                                       generator=torch.Generator().manual_seed(seed),
                                       pin_memory=device.startswith("cuda"))


def pass_batches(loader) -> int | None:
    """The number of batches of the whole pass (all ranks); None when unknown."""
    b = getattr(loader, "batch_sampler", None)
    return b.total if isinstance(b, PassBatches) else batches_here(loader)


def batches_here(loader) -> int | None:
    """The number of batches this process iterates; None for a stream without a length."""
    try:
        return len(loader)
    except TypeError:  # an IterableDataset without a length
        return None


def own_share(loader, rank: int, ranks: int) -> bool:
    """True when `loader` already yields only rank `rank`'s batches of `ranks`
    (a `pass_loader` made for it), so the caller must not skip any."""
    b = getattr(loader, "batch_sampler", None)
    return ranks == 1 or (isinstance(b, PassBatches) and (b.rank, b.ranks) == (rank, ranks))


INPUT_KEYS = ("image", "images", "input", "inputs", "x", "pixel_values")
LABEL_KEYS = ("label", "labels", "target", "targets", "y")


def split_batch(batch, input_key: str | None = None):
    """(inputs, labels or None) from a tensor, tuple/list or dict batch."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, dict):
        keys = [input_key] if input_key else [k for k in INPUT_KEYS if k in batch]
        if not keys or keys[0] not in batch:
            raise DataError(f"batch is a dict with keys {sorted(batch)}; name the input with "
                            "--input-key")
        label = next((batch[k] for k in LABEL_KEYS if k in batch), None)
        return batch[keys[0]], label
    raise DataError(f"batch of type {type(batch).__name__}: expected a tensor, tuple or dict")
