import os
from typing import Optional

import pandas as pd
import pytest

from pruning_lib.runs import ConfigError, RunConfig, Store, digest, param
from dataclasses import dataclass


@dataclass(frozen=True)
class DemoConfig(RunConfig):
    seeds: tuple[int, ...] = param((0,), low=0)
    lr: float = param(1e-3, low=0, high=1)
    model: str = param("lenet300_100", choices=("lenet300_100", "lenet5_caffe"))
    epochs: Optional[int] = param(None, low=1)
    results_dir: str = param("results")
    PROFILES = {"smoke": {"seeds": (0,), "epochs": 1}, "cpu": {"seeds": (0, 1, 2), "epochs": 10}}


def test_profiles_and_overrides():
    c = DemoConfig.from_profile("cpu")
    assert c.seeds == (0, 1, 2) and c.epochs == 10
    c = DemoConfig.from_profile("smoke", lr=0.01, seeds=[3, 4])
    assert c.seeds == (3, 4) and c.lr == 0.01 and c.epochs == 1


def test_unknown_parameter_is_named():
    with pytest.raises(ConfigError, match="learning_rate"):
        DemoConfig.from_profile("cpu", learning_rate=0.1)


@pytest.mark.parametrize("kw, word", [({"lr": 50.0}, "lr"), ({"model": "vgg"}, "model"),
                                      ({"seeds": [-1]}, "seeds"), ({"epochs": "ten"}, "epochs"),
                                      ({"profile": "gpu"}, "profile")])
def test_invalid_values_are_named(kw, word):
    with pytest.raises(ConfigError, match=word):
        DemoConfig.from_profile(kw.pop("profile", "cpu"), **kw)


def test_from_namespace_rejects_injected_unknown_names():
    import math
    ns = {"profile": "smoke", "lr": None, "seeds": None, "bogus": 3, "math": math, "_": 1, "In": []}
    with pytest.raises(ConfigError, match="bogus"):
        DemoConfig.from_namespace(ns)
    del ns["bogus"]
    assert DemoConfig.from_namespace(ns).epochs == 1


def test_digest_is_canonical_and_ignores_presentation():
    a = DemoConfig.from_profile("cpu", results_dir="x")
    b = DemoConfig.from_profile("cpu", results_dir="y")
    assert a.digest() == b.digest()
    assert a.digest() != DemoConfig.from_profile("cpu", lr=0.5).digest()
    assert digest({"a": 1, "b": (1, 2)}) == digest({"b": [1, 2], "a": 1})


def test_store_computes_once_then_loads(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return pd.DataFrame({"x": [1, 2]})

    s = Store(tmp_path, "demo", {"seed": 0})
    assert s.frame("r", compute)["x"].tolist() == [1, 2]
    assert Store(tmp_path, "demo", {"seed": 0}).frame("r", compute)["x"].tolist() == [1, 2]
    assert len(calls) == 1
    assert (s.dir / "spec.json").exists()
    assert Store(tmp_path, "demo", {"seed": 1}).dir != s.dir


def test_interrupted_write_leaves_nothing_trusted(tmp_path):
    s = Store(tmp_path, "demo", {"seed": 0})

    def boom():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        s.frame("r", boom)
    assert not s.exists("r.csv")

    class Bad(pd.DataFrame):
        def to_csv(self, path, **kw):
            with open(path, "w") as f:
                f.write("half")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        s.frame("r", lambda: Bad({"x": [1]}))
    assert not s.exists("r.csv")
    assert not [p for p in os.listdir(s.dir) if p.endswith(".tmp")]
