import pytest
import torch

from pruning_lib.data import DatasetNotFoundError, TensorSplit, batches, load_dataset


def test_mnist5k_is_real_and_split_is_fixed_by_seed():
    d = load_dataset("mnist5k")
    assert d.input_shape == (1, 28, 28) and d.num_classes == 10
    assert [len(d.train), len(d.val), len(d.test)] == [3500, 500, 1000]
    assert torch.bincount(d.test.y).tolist() == [100] * 10  # stratified
    again = load_dataset("mnist5k")
    assert torch.equal(again.train.y, d.train.y) and torch.equal(again.test.x, d.test.x)
    other = load_dataset("mnist5k", seed=1)
    assert not torch.equal(other.train.y, d.train.y)


def test_digits_loads():
    d = load_dataset("digits")
    assert d.input_shape == (1, 8, 8) and len(d.train) + len(d.val) + len(d.test) == 1797


def test_synthetic_stand_ins_are_named_so():
    for name in ["synthetic-mnist", "synthetic-cifar"]:
        d = load_dataset(name, n=100)
        assert "synthetic" in d.name and "synthetic" in d.info["source"]


@pytest.mark.parametrize("name, expected", [("mnist", "MNIST"), ("cifar10", "cifar-10-batches-py"),
                                            ("cifar100", "cifar-100-python"),
                                            ("tiny-imagenet", "tiny-imagenet-200"), ("imagenet", "imagenet")])
def test_missing_dataset_error_names_path_and_layout(tmp_path, name, expected):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset(name, root=tmp_path)
    msg = str(err.value)
    assert expected in msg and str(tmp_path) in msg and "layout" in msg


def test_unknown_dataset_lists_registered():
    with pytest.raises(ValueError, match="mnist5k"):
        load_dataset("mnist6k")


def test_slicing_batches_cover_split_once_and_shards_partition_batches():
    s = TensorSplit(torch.arange(10).float().view(10, 1), torch.arange(10))
    g = torch.Generator().manual_seed(0)
    ys = torch.cat([y for _, y in batches(s, 4, shuffle=True, generator=g)])
    assert sorted(ys.tolist()) == list(range(10))
    full = [y for _, y in batches(s, 4, shuffle=True, generator=torch.Generator().manual_seed(1))]
    r0 = [y for _, y in batches(s, 4, shuffle=True, generator=torch.Generator().manual_seed(1), shard=(0, 2))]
    r1 = [y for _, y in batches(s, 4, shuffle=True, generator=torch.Generator().manual_seed(1), shard=(1, 2))]
    for f, a, b in zip(full, r0, r1):
        assert torch.equal(torch.cat([a, b]), f)
