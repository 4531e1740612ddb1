import os

import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_data():
    """A generated stand-in (not real data) small enough for a fit in well under a second."""
    from pruning_lib.data import load_dataset

    return load_dataset("synthetic-mnist", n=300)


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 10))


# Files whose tests each take seconds (the papers' full-size models on stand-ins, whole processes started
# from the command line or by torchrun): collected first, so that `make unit`'s two workers do not end
# with one of them running a long test alone while the other has nothing left to take.
HEAVY_FIRST = ("test_paper_profiles.py", "test_units.py", "test_map_units.py", "test_reliability.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order
