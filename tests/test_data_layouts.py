"""The `paper` profile's datasets, read from data/ in the layouts README.md documents.

Each test writes a tiny generated stand-in in the documented layout (random pixels, a handful of
images: not the real datasets, which cannot ship with the repository) and loads it with
`load_dataset`, as a chapter's `paper` profile would, with nothing downloaded.
"""
from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from pruning_lib.data import DatasetNotFoundError, batches, load_dataset


def _idx(path, array: np.ndarray, compress: bool):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def write_mnist(root, n_train=60, n_test=20, compress=False):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        _idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), compress)
        _idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10, compress)


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_from_the_torchvision_layout(tmp_path, compress):
    write_mnist(tmp_path, compress=compress)
    d = load_dataset("mnist", root=tmp_path, val_size=10)
    assert (len(d.train), len(d.val), len(d.test)) == (50, 10, 20)
    assert d.input_shape == (1, 28, 28) and d.num_classes == 10
    x, y = next(iter(batches(d.train, 8)))
    assert x.shape == (8, 1, 28, 28) and y.dtype == torch.int64


def _cifar_batch(n, classes, key, rng):
    return {"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
            key: (np.arange(n) % classes).tolist()}


def write_cifar10(root, per_batch=8, n_test=10):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump(_cifar_batch(n_test if name == "test_batch" else per_batch, 10, "labels", rng), f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def write_image_folder(folder, classes, per_class, size, nested_images=False):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        d = folder / c / ("images" if nested_images else "")
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{c}_{i}.JPEG")


def test_cifar10_from_the_python_version(tmp_path, monkeypatch):
    write_cifar10(tmp_path)
    # torchvision checks the official files' checksums; the generated stand-in has other bytes
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args, **kw: True)
    d = load_dataset("cifar10", root=tmp_path, val_size=8)
    assert (len(d.train), len(d.val), len(d.test)) == (32, 8, 10)
    x, y = next(iter(batches(d.train, 4)))
    assert x.shape == (4, 3, 32, 32) and d.num_classes == 10


def test_a_corrupted_cifar_folder_gets_a_clear_error(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"not a pickle")
    with pytest.raises(DatasetNotFoundError, match="(?s)cifar-10-batches-py.*layout"):
        load_dataset("cifar10", root=tmp_path)


def test_tiny_imagenet_from_its_folders(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n01443537", "n01629819"]
    write_image_folder(root / "train", wnids, per_class=4, size=64, nested_images=True)
    write_image_folder(root / "val", wnids, per_class=2, size=64)
    d = load_dataset("tiny-imagenet", root=tmp_path, val_size=2)
    assert (len(d.train), len(d.val), len(d.test)) == (6, 2, 4)
    x, _ = next(iter(batches(d.test, 4)))
    assert x.shape == (4, 3, 64, 64)


def test_imagenet_from_the_image_folder_layout(tmp_path):
    root = tmp_path / "imagenet"
    wnids = ["n01440764", "n01443537"]
    write_image_folder(root / "train", wnids, per_class=3, size=256)
    write_image_folder(root / "val", wnids, per_class=1, size=256)
    d = load_dataset("imagenet", root=tmp_path, val_size=2)
    assert (len(d.train), len(d.val), len(d.test)) == (4, 2, 2)
    x, _ = next(iter(batches(d.train, 2)))
    assert x.shape == (2, 3, 224, 224)


def test_pruning_data_stands_in_for_the_default_data_folder(tmp_path, monkeypatch):
    write_mnist(tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path)  # no data/ here
    monkeypatch.setenv("PRUNING_DATA", str(tmp_path / "elsewhere"))
    for root in (None, "data"):  # the chapters pass data_root="data"
        assert len(load_dataset("mnist", root=root, val_size=10).test) == 20
    with pytest.raises(DatasetNotFoundError, match="other"):  # an explicit other folder is kept
        load_dataset("mnist", root=tmp_path / "other")
