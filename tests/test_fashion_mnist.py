"""Fashion-MNIST from data/FashionMNIST/raw or Debian's dataset-fashion-mnist (generated stand-ins here)."""
import gzip
import struct

import numpy as np
import pytest

from pruning_lib import data
from pruning_lib.data import DatasetNotFoundError, load_dataset


def _write_idx(path, array, gz=True):
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _stand_in(root, n_train=40, n_test=12, gz=True, labels_short=0):
    """A generated stand-in in the FashionMNIST/raw layout (not real data)."""
    rng = np.random.default_rng(0)
    raw = root / "FashionMNIST" / "raw"
    for split, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz)
        _write_idx(raw / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, n - labels_short), gz)
    return raw


@pytest.mark.parametrize("gz", [True, False])
def test_loads_a_stand_in_from_the_data_folder(tmp_path, gz, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM", tmp_path / "nowhere")
    _stand_in(tmp_path, gz=gz)
    d = load_dataset("fashion_mnist", root=tmp_path, val_size=8)
    assert (len(d.train), len(d.val), len(d.test)) == (32, 8, 12)
    assert d.input_shape == (1, 28, 28) and d.num_classes == 10


def test_missing_dataset_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM", tmp_path / "nowhere")
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion_mnist", root=tmp_path)


def test_the_system_package_is_used_when_the_data_folder_has_none(tmp_path, monkeypatch):
    raw = _stand_in(tmp_path / "system")
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM", raw)
    d = load_dataset("fashion_mnist", root=tmp_path / "empty", val_size=4)
    assert len(d.test) == 12


def test_labels_must_pair_up_and_a_bad_file_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM", tmp_path / "nowhere")
    _stand_in(tmp_path, labels_short=1)
    with pytest.raises(DatasetNotFoundError, match="must pair up"):
        load_dataset("fashion_mnist", root=tmp_path)
    raw = _stand_in(tmp_path / "bad")
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 7))
    with pytest.raises(DatasetNotFoundError, match="t10k-images-idx3-ubyte.gz"):
        load_dataset("fashion_mnist", root=tmp_path / "bad")


@pytest.mark.skipif(not (data.FASHION_MNIST_SYSTEM / "t10k-labels-idx1-ubyte.gz").exists(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_the_real_files_read_as_torchvision_reads_them(tmp_path):
    import shutil

    from torchvision.datasets import FashionMNIST

    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in (f"{s}-{k}-ubyte" for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1")):
        with gzip.open(data.FASHION_MNIST_SYSTEM / f"{name}.gz") as src, open(raw / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    tv = FashionMNIST(str(tmp_path), train=False, download=False)
    ours = data.read_idx(data.FASHION_MNIST_SYSTEM / "t10k-images-idx3-ubyte.gz")
    assert ours.shape == (10000, 28, 28) and np.array_equal(ours, tv.data.numpy())
    labels = data.read_idx(data.FASHION_MNIST_SYSTEM / "t10k-labels-idx1-ubyte.gz")
    assert np.array_equal(labels, tv.targets.numpy())
