"""Issue 17: nothing wrong reaches the book.

One test (or more) for every fault the issue reproduced: a cache that trusted any file it found, a .pt
file that could run code, failed and interrupted runs that were published, values that passed
validation, datasets read wrong, and cache files only their owner could read. Each failed on the
main branch before the fix. New names are reached through their modules inside the tests, so that
the same file runs (and fails case by case) against the old code.
"""
from __future__ import annotations

import gzip
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from pruning_lib import book, runs
from pruning_lib.book import BookError
from pruning_lib.runs import ConfigError, Store

ROOT = Path(__file__).resolve().parents[1]


def _frame(n=5):
    return pd.DataFrame({"step": list(range(n)), "test_accuracy": [0.1 * i for i in range(n)]})


def _counting(make):
    calls = []

    def compute():
        calls.append(1)
        return make()
    return compute, calls


def _manifest_entry_matches(store: Store, name: str) -> None:
    """Make the manifest describe ``name`` as it now is, as someone who forges a file would (so the
    test reaches the loader, not only the digest check). Nothing to do for a cache without manifests."""
    m = store.dir / "manifest.json"
    if m.exists():
        doc = json.loads(m.read_text())
        p = store.path(name)
        import hashlib
        doc["files"][name] = {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        m.write_text(json.dumps(doc))


class Evil:
    """A pickle that runs a shell command when it is loaded without ``weights_only``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# =====================================================================================================
# 1. The cache trusts any file it finds
# =====================================================================================================

def _train_ch1(tmp_path):
    from pruning_lib.chapters import dense_baselines as baselines
    from pruning_lib.data import load_dataset

    data = load_dataset("synthetic-mnist", n=200)
    return baselines.train_dense("lenet300_100", "synthetic-mnist", 0, epochs=1, results_dir=tmp_path,
                                 progress=False, data=data)


def test_ch1_history_missing_its_last_row_is_recomputed_not_reported(tmp_path, capsys):
    """Deleting the last row of a cached history.csv changed chapter 1's final error (16.50 % -> 89.10 %)."""
    _, h1 = _train_ch1(tmp_path)
    (hist,) = tmp_path.rglob("history.csv")
    lines = hist.read_text().splitlines(keepends=True)
    hist.write_text("".join(lines[:-1]))
    _, h2 = _train_ch1(tmp_path)
    assert len(h2) == len(h1)
    assert h2["test_accuracy"].iloc[-1] == pytest.approx(h1["test_accuracy"].iloc[-1])
    err = capsys.readouterr().err
    assert str(hist.parent) in err and "history.csv" in err and "moved aside" in err
    assert list((tmp_path / "_corrupt").rglob("history.csv"))  # moved aside, not deleted


def test_ch1_truncated_model_is_retrained(tmp_path):
    m1, _ = _train_ch1(tmp_path)
    (model,) = tmp_path.rglob("model.pt")
    model.write_bytes(model.read_bytes()[:100])
    m2, _ = _train_ch1(tmp_path)  # was: PytorchStreamReader failed reading zip archive
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a.cpu(), b.cpu()), k


@pytest.mark.parametrize("cut", ["mid-row", "last row"])
def test_a_cut_history_is_recomputed(tmp_path, cut):
    compute, calls = _counting(lambda: _frame(5))
    s = Store(tmp_path, "dense", {"seed": 0})
    s.frame("history", compute)
    p = s.path("history.csv")
    text = p.read_text()
    p.write_text(text[:-4] if cut == "mid-row" else "".join(text.splitlines(keepends=True)[:-1]))
    df = Store(tmp_path, "dense", {"seed": 0}).frame("history", compute)
    assert len(df) == 5 and len(calls) == 2


@pytest.mark.parametrize("kind, name", [("lnpt/teacher", "teacher"), ("polarization/dense", "model"),
                                        ("lottery/round", "final")])
def test_a_truncated_pt_file_is_recomputed(tmp_path, kind, name):
    compute, calls = _counting(lambda: {"state": {"w": torch.arange(6.0)}, "history": {"loss": [1.0, 0.5]}})
    Store(tmp_path, kind, {"seed": 0}).torch(name, compute)
    p = Store(tmp_path, kind, {"seed": 0}).path(f"{name}.pt")
    p.write_bytes(p.read_bytes()[:50])
    obj = Store(tmp_path, kind, {"seed": 0}).torch(name, compute)
    assert torch.equal(obj["state"]["w"], torch.arange(6.0)) and len(calls) == 2


def test_a_truncated_result_json_is_recomputed(tmp_path):
    compute, calls = _counting(lambda: {"test_error": 0.165, "flops": 12})
    Store(tmp_path, "03_dep_l0", {"seed": 0}).json("result", compute)
    p = Store(tmp_path, "03_dep_l0", {"seed": 0}).path("result.json")
    p.write_text(p.read_text()[:10])
    assert Store(tmp_path, "03_dep_l0", {"seed": 0}).json("result", compute)["test_error"] == 0.165
    assert len(calls) == 2


def test_an_unreadable_file_with_nothing_to_recompute_it_is_named(tmp_path):
    s = Store(tmp_path, "polarization/gated", {"seed": 0})
    s.save_torch("keep", {"g": torch.ones(3)})
    p = s.path("keep.pt")
    p.write_bytes(p.read_bytes()[:60])
    with pytest.raises(Exception, match=str(p.parent)):  # was: PytorchStreamReader failed ... (no path)
        Store(tmp_path, "polarization/gated", {"seed": 0}).torch("keep")


def test_a_truncated_training_checkpoint_restarts_training(tmp_path, tiny_data, mlp, capsys):
    from pruning_lib.train import fit

    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(b"PK\x03\x04 cut short")
    h = fit(mlp, tiny_data, epochs=1, batch_size=60, progress=False, checkpoint=ckpt)
    assert len(h) >= 2
    assert str(ckpt) in capsys.readouterr().err
    assert list(tmp_path.glob("checkpoint.pt.unreadable-*"))  # moved aside, not deleted


def test_a_unit_whose_spec_was_deleted_is_not_reused_silently(tmp_path):
    compute, calls = _counting(lambda: _frame(3))
    s = Store(tmp_path, "dense", {"seed": 0})
    s.frame("history", compute)
    s.path("spec.json").unlink()
    s2 = Store(tmp_path, "dense", {"seed": 0})
    s2.frame("history", compute)
    assert len(calls) == 2  # recomputed ...
    assert json.loads(s2.path("spec.json").read_text()) == {"seed": 0}  # ... and the spec written again


def test_the_manifest_holds_the_spec_and_every_file(tmp_path):
    s = Store(tmp_path, "dense", {"seed": 0, "lr": 1e-3})
    s.save_frame("history", _frame())
    s.save_torch("model", {"w": torch.zeros(2)})
    m = json.loads(s.path("manifest.json").read_text())
    assert m["spec"] == {"seed": 0, "lr": 1e-3} and runs.digest(m["spec"]) == s.dir.name
    assert set(m["files"]) == {"spec.json", "history.csv", "model.pt"}
    assert all(len(e["sha256"]) == 64 and e["size"] > 0 for e in m["files"].values())
    assert runs.check_unit(s.dir) == (m, None)


def test_a_resumable_checkpoint_is_not_part_of_a_finished_unit(tmp_path):
    _train_ch1(tmp_path)
    (m,) = tmp_path.rglob("manifest.json")
    assert set(json.loads(m.read_text())["files"]) == {"spec.json", "model.pt", "history.csv"}


def test_a_unit_written_half_way_is_not_finished(tmp_path):
    """Chapter 3 writes its frames, then result.json: a unit stopped between them is not finished."""
    s = Store(tmp_path, "03_dep_l0", {"seed": 0})
    s.save_frame("history", _frame())
    assert Store(tmp_path, "03_dep_l0", {"seed": 0}).exists("history.csv")
    assert not Store(tmp_path, "03_dep_l0", {"seed": 0}).exists("result.json")


def test_an_empty_frame_round_trips(tmp_path):
    """Chapter 3's dense units save an empty gates frame; reading it back is not corruption."""
    s = Store(tmp_path, "03_dep_l0", {"seed": 0})
    s.save_frame("gates", pd.DataFrame())
    assert Store(tmp_path, "03_dep_l0", {"seed": 0}).frame("gates").empty


def test_frames_and_masks_in_pt_files_round_trip(tmp_path):
    from pruning_lib.masks import Mask

    obj = {"history": pd.DataFrame({"a": [1, 2], "b": [0.5, float("nan")], "c": ["x", "y"]}),
           "mask": Mask({"w": torch.tensor([True, False])}), "n": np.float64(0.25),
           "arr": np.arange(3), "state": {"w": torch.ones(2)}}
    Store(tmp_path, "lottery/round", {"r": 1}).save_torch("round", obj)
    back = Store(tmp_path, "lottery/round", {"r": 1}).torch("round")
    pd.testing.assert_frame_equal(back["history"], obj["history"])
    assert isinstance(back["mask"], Mask) and torch.equal(back["mask"]["w"], obj["mask"]["w"])
    assert back["n"] == 0.25 and back["arr"].tolist() == [0, 1, 2]
    torch.load(Store(tmp_path, "lottery/round", {"r": 1}).path("round.pt"), weights_only=True)


def _writer(root, worker):
    s = Store(root, "shared", {"unit": 0})
    for i in range(15):
        s.save_frame(f"w{worker}_{i}", _frame(3))


def test_two_runs_writing_one_unit_leave_a_manifest_that_matches(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    (unit,) = [d for d in (tmp_path / "shared").iterdir() if d.is_dir()]
    m, problem = runs.check_unit(unit)
    assert problem is None and len(m["files"]) == 31  # 30 frames and spec.json


# =====================================================================================================
# 2. A file in results/ can run code
# =====================================================================================================

def test_a_crafted_teacher_pt_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    compute, calls = _counting(lambda: {"state": {"w": torch.ones(2)}, "history": {"loss": [1.0]}})
    s = Store(tmp_path / "results", "lnpt/teacher", {"teacher": "lenet5_caffe"})
    s.torch("teacher", compute)
    torch.save({"state": Evil(marker)}, s.path("teacher.pt"))
    _manifest_entry_matches(s, "teacher.pt")
    out = Store(tmp_path / "results", "lnpt/teacher", {"teacher": "lenet5_caffe"}).torch("teacher", compute)
    assert not marker.exists()
    assert torch.equal(out["state"]["w"], torch.ones(2))  # recomputed instead


def test_a_crafted_checkpoint_does_not_run(tmp_path, tiny_data, mlp):
    from pruning_lib.train import fit

    marker = tmp_path / "pwned"
    torch.save({"model": Evil(marker)}, tmp_path / "checkpoint.pt")
    fit(mlp, tiny_data, epochs=1, batch_size=60, progress=False, checkpoint=tmp_path / "checkpoint.pt")
    assert not marker.exists()


def test_every_torch_load_in_the_library_is_weights_only():
    import ast

    for path in sorted((ROOT / "pruning_lib").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load" and getattr(node.func.value, "id", None) == "torch"):
                kw = {k.arg: k.value for k in node.keywords}
                restricted = "pickle_module" in kw  # adopt's reader of older files: an allowlist
                assert restricted or (isinstance(kw.get("weights_only"), ast.Constant)
                                      and kw["weights_only"].value is True), f"{path.name}:{node.lineno}"


# =====================================================================================================
# 3. Failed and interrupted runs are published
# =====================================================================================================

def _notebook(path: Path, parameters: str, *bodies: str) -> Path:
    cells = [new_markdown_cell(f"# {path.stem}")]
    cell = new_code_cell(parameters)
    cell.metadata["tags"] = ["parameters"]
    cells.append(cell)
    cells += [new_code_cell(b) for b in bodies]
    path.parent.mkdir(parents=True, exist_ok=True)
    kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(new_notebook(cells=cells, metadata={"kernelspec": kernelspec}), path)
    return path


PREVIOUS = "the previous run's page"


def _previous_copy(repo: Path, name: str) -> Path:
    out = repo / "book" / "chapters" / f"{name}.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)
    cell = new_code_cell("x = 1", execution_count=1)
    nbformat.write(new_notebook(cells=[new_markdown_cell(f"# {PREVIOUS}"), cell]), out)
    return out


def test_a_failed_chapter_does_not_replace_the_books_copy(tmp_path):
    _notebook(tmp_path / "notebooks" / "01_tiny.ipynb", 'profile = "cpu"\nresults_dir = "results"',
              "raise ValueError('parameter seeds: -1 is outside [0, None]')")
    out = _previous_copy(tmp_path, "01_tiny")
    jobs = book.plan(tmp_path, "cpu", None, include_verdicts=False)
    result = book.execute(jobs, tmp_path)
    assert result["failed"] == ["01_tiny"]
    assert PREVIOUS in out.read_text()  # the book still has the last good page
    kept = tmp_path / "_build" / "failed" / "01_tiny.ipynb"
    assert "ValueError" in kept.read_text()
    record = json.loads((tmp_path / "results" / "runs" / "cpu" / "01_tiny.json").read_text())
    assert record["status"] == "failed" and "ValueError" in record["error"]


def test_a_chapter_killed_mid_run_is_not_published(tmp_path):
    started = tmp_path / "started"
    _notebook(tmp_path / "notebooks" / "01_tiny.ipynb", 'profile = "cpu"\nresults_dir = "results"',
              f"open({str(started)!r}, 'w').write('1')", "import time\ntime.sleep(120)",
              "print('end')")
    out = tmp_path / "book" / "chapters" / "01_tiny.ipynb"
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pruning_lib.book", "run", "--no-verdicts"],
                            cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not started.exists() and time.time() < deadline:
            time.sleep(0.2)
        assert started.exists(), "the chapter never started"
        time.sleep(1.0)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # kill -9 the run (this test's own process group)
        proc.wait()
    assert not out.exists()  # was: a half-executed notebook, which the strict build accepted
    record = json.loads((tmp_path / "results" / "runs" / "cpu" / "01_tiny.json").read_text())
    assert record["status"] == "running"  # never "ok": the verdicts page does not count it


def test_a_successful_run_is_published_and_recorded_with_its_parameters(tmp_path):
    _notebook(tmp_path / "notebooks" / "01_tiny.ipynb",
              'profile = "cpu"\nseeds = None\nresults_dir = "results"', "print(seeds)")
    out = _previous_copy(tmp_path, "01_tiny")
    jobs = book.plan(tmp_path, "cpu", None, [("seeds", [3, 4])], include_verdicts=False)
    before = time.time()
    assert book.execute(jobs, tmp_path)["failed"] == []
    assert PREVIOUS not in out.read_text() and "[3, 4]" in out.read_text()
    assert not list((tmp_path / "_build" / "executing").glob("*.ipynb"))
    record = json.loads((tmp_path / "results" / "runs" / "cpu" / "01_tiny.json").read_text())
    assert record["status"] == "ok" and record["parameters"] == {"profile": "cpu", "seeds": [3, 4]}
    assert record["profile"] == "cpu" and record["budget"] == 1.0 and record["seconds"] > 0
    start = time.mktime(time.strptime(record["start"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert before - 2 <= start <= time.time() + 2
    assert "git_commit" in record
    assert book.read_run_records(tmp_path / "results", "cpu")["01_tiny"]["status"] == "ok"


def _executed(path: Path, *outputs, executed=True) -> Path:
    cell = new_code_cell("x = 1", execution_count=1 if executed else None, outputs=list(outputs))
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(new_notebook(cells=[new_markdown_cell("# t"), cell]), path)
    return path


@pytest.mark.parametrize("what, outputs, executed", [
    ("error", [new_output("error", ename="ConfigError", evalue="seeds", traceback=[])], True),
    ("not executed", [], False),
    ("warning", [new_output("stream", name="stderr",
                            text="/x/claims.py:88: FutureWarning: The behavior of concatenation\n")],
     True),
    # what the verdicts page printed (chapter 99, cell 6)
    ("pandas warning", [new_output("stream", name="stderr", text=(
        "/tmp/ipykernel_8476/478394115.py:2: Pandas4Warning: Constructing a Categorical with a dtype and "
        "values containing non-null entries not in that dtype's categories is deprecated\n"))], True),
])
def test_check_publishable_names_the_notebook(tmp_path, what, outputs, executed):
    nb = _executed(tmp_path / "01_x.ipynb", *outputs, executed=executed)
    with pytest.raises(BookError, match="01_x.ipynb"):
        book.check_publishable(nb)
    ok = _executed(tmp_path / "02_ok.ipynb", new_output("stream", name="stdout", text="4\n"))
    book.check_publishable(ok)


def test_the_strict_build_refuses_a_notebook_with_an_error(tmp_path, monkeypatch):
    for name in ("01_tiny", "99_verdicts"):
        _notebook(tmp_path / "notebooks" / f"{name}.ipynb", 'profile = "cpu"')
    toc = {"format": "jb-book", "root": "book/intro",
           "chapters": [{"file": "book/chapters/01_tiny"}, {"file": "book/chapters/99_verdicts"}]}
    (tmp_path / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False))
    (tmp_path / "book").mkdir(exist_ok=True)
    (tmp_path / "book" / "intro.md").write_text("# Intro\n")
    _executed(tmp_path / "book" / "chapters" / "99_verdicts.ipynb")
    _executed(tmp_path / "book" / "chapters" / "01_tiny.ipynb",
              new_output("error", ename="ConfigError", evalue="bad", traceback=[]))
    monkeypatch.setattr(book.subprocess, "call", lambda *a, **k: 0)  # jupyter-book itself is not needed
    with pytest.raises(BookError, match="01_tiny.ipynb"):
        book.build(tmp_path)


# =====================================================================================================
# 4. Some values pass validation
# =====================================================================================================

def _chapter_configs():
    from pruning_lib.chapters import polarization
    from pruning_lib.chapters import lnpt
    from pruning_lib.chapters import bernoulli_gates
    from pruning_lib.chapters import lottery_tickets as lottery
    from pruning_lib.chapters import dense_baselines as baselines, dep_l0

    return {m.__name__.split(".")[-1]: m.Config
            for m in (baselines, lottery, dep_l0, bernoulli_gates, polarization, lnpt)}


def test_nan_is_refused_by_every_range_check():
    from pruning_lib.chapters import dep_l0

    with pytest.raises(ConfigError, match="lambda_scales"):
        dep_l0.Config.from_profile("smoke", lambda_scales=[float("nan")])
    for name, cls in _chapter_configs().items():
        if "lr" in cls.parameter_names():
            with pytest.raises(ConfigError, match="lr"):
                cls.from_profile("smoke", lr=float("nan"))
            with pytest.raises(ConfigError, match="lr"):
                cls.from_profile("smoke", lr=float("inf"))


def test_a_nan_budget_is_a_config_error_not_a_crash():
    for cls in _chapter_configs().values():
        with pytest.raises(ConfigError, match="budget"):
            cls.from_namespace({"profile": "smoke", "budget": float("nan")})


@pytest.mark.parametrize("chapter", ["dense_baselines", "lottery_tickets", "dep_l0", "bernoulli_gates", "polarization",
                                     "lnpt"])
def test_seeds_are_checked_the_same_in_every_chapter(chapter):
    cls = _chapter_configs()[chapter]
    with pytest.raises(ConfigError, match="seeds"):
        cls.from_profile("smoke", seeds=[-1])
    with pytest.raises(ConfigError, match="seeds"):
        cls.from_profile("smoke", seeds=[])
    assert cls.from_profile("smoke", seeds=[0]).seeds == (0,)


def test_the_common_ranges_are_the_same_in_every_chapter():
    configs = _chapter_configs().values()
    for name, (lo, hi) in runs.COMMON_RANGES.items():
        for cls in configs:
            if name not in cls.parameter_names():
                continue
            below = lo - (1 if isinstance(lo, int) else 0.001)
            with pytest.raises(ConfigError, match=name):
                cls.from_profile("smoke", **{name: below if "seeds" not in name else [below]})
            if hi is not None:
                above = hi + (1 if isinstance(hi, int) else 0.001)
                with pytest.raises(ConfigError, match=name):
                    cls.from_profile("smoke", **{name: above if "seeds" not in name else [above]})


def test_config_accepts_json_types_only():
    from pruning_lib.chapters import dense_baselines as baselines
    import datetime

    with pytest.raises(ConfigError, match="seeds"):
        baselines.Config.from_profile("smoke", seeds={0, 1})
    with pytest.raises(ConfigError, match="seeds"):
        baselines.Config.from_profile("smoke", seeds=[datetime.date(2024, 1, 1)])


@pytest.mark.parametrize("text, value", [
    ("[1e-4, 1e-3]", [1e-4, 1e-3]), ("[010]", [10]), ("[2024-01-01]", ["2024-01-01"]),
    ("[yes, on]", ["yes", "on"]), ("[true, null, 1.5, -2]", [True, None, 1.5, -2]), ("(1e-2)", [1e-2]),
])
def test_dash_p_lists_are_yaml_1_2(text, value):
    assert book.parse_value(text) == value


def _plan(chapter, *params, chapters=None):
    return book.plan(ROOT, "smoke", chapters if chapters is not None else chapter, list(params),
                     include_verdicts=False, out_dir="/nonexistent/never-written")


@pytest.mark.parametrize("chapter, name, text, word", [
    ("03", "lambda_scales", "nan", "finite"),
    ("03", "lambda_scales", "[.nan, 1]", "finite"),
    ("01", "seeds", "[]", "empty"),
    ("03", "seeds", "-1", "seeds"),
    ("01", "seeds", "2024-01-01", "seeds"),
    ("01", "seeds", "[2024-01-01]", "seeds"),
    ("01", "seeds", "[!!set {1, 2}]", "JSON"),
    ("01", "lr", "inf", "finite"),
])
def test_the_runner_refuses_bad_values_in_one_line_before_running(chapter, name, text, word):
    with pytest.raises(BookError, match=word) as exc:
        _plan(chapter, (name, book.parse_value(text)))
    assert "\n" not in str(exc.value)


def test_the_runner_accepts_float_lists_written_with_exponents():
    (job,) = _plan("06", ("trajectory_lrs", book.parse_value("[1e-4, 1e-3]")))
    assert job.parameters["trajectory_lrs"] == [1e-4, 1e-3]


def test_a_chapters_list_naming_nothing_is_an_error(tmp_path):
    _notebook(tmp_path / "notebooks" / "01_tiny.ipynb", 'profile = "cpu"')
    for spec in (",", " , ,"):
        with pytest.raises(BookError, match="names no chapter"):
            book.plan(tmp_path, "cpu", spec)


# =====================================================================================================
# 5. Datasets
# =====================================================================================================

def _idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    data = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data += array.astype(np.uint8).tobytes()
    if compress:
        path, data = path.with_name(path.name + ".gz"), gzip.compress(data)
    path.write_bytes(data)
    return path


def _mnist(root: Path, n_train=60, n_train_labels=60, n_test=20, compress=False) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    _idx(raw / "train-images-idx3-ubyte", rng.integers(0, 256, (n_train, 28, 28)), compress)
    _idx(raw / "train-labels-idx1-ubyte", np.arange(n_train_labels) % 10, compress)
    _idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, 28, 28)), compress)
    _idx(raw / "t10k-labels-idx1-ubyte", np.arange(n_test) % 10, compress)
    return raw


def test_a_truncated_mnist_gz_is_named_and_leaves_nothing_behind(tmp_path):
    from pruning_lib.data import DatasetNotFoundError, load_dataset

    raw = _mnist(tmp_path, compress=True)
    gz = raw / "train-images-idx3-ubyte.gz"
    good = gz.read_bytes()
    gz.write_bytes(good[: len(good) // 2])
    with pytest.raises(DatasetNotFoundError, match=str(gz)):
        load_dataset("mnist", root=tmp_path, val_size=10)
    assert not (raw / "train-images-idx3-ubyte").exists()  # no 0-byte extracted file
    gz.write_bytes(good)  # the user replaces the .gz: it loads
    assert len(load_dataset("mnist", root=tmp_path, val_size=10).train) == 50


def test_an_empty_extracted_file_left_by_an_older_run_is_extracted_again(tmp_path):
    from pruning_lib.data import load_dataset

    raw = _mnist(tmp_path, compress=True)
    (raw / "train-images-idx3-ubyte").write_bytes(b"")
    assert len(load_dataset("mnist", root=tmp_path, val_size=10).train) == 50


def test_images_and_labels_must_pair_up(tmp_path):
    from pruning_lib.data import DatasetNotFoundError, load_dataset

    _mnist(tmp_path, n_train=60, n_train_labels=59)
    with pytest.raises(DatasetNotFoundError, match="60 images .* 59 labels"):
        load_dataset("mnist", root=tmp_path, val_size=10)


# =====================================================================================================
# 6. Cache files follow the user's umask
# =====================================================================================================

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_cache_files_follow_the_umask(tmp_path, umask, mode):
    from pruning_lib.claims import ledger  # noqa: F401  (claims tables are written the same way)

    old = os.umask(umask)
    try:
        s = Store(tmp_path, "dense", {"seed": 0})
        s.save_frame("history", _frame())
        s.save_torch("model", {"w": torch.ones(1)})
        runs.atomic_write_frame(_frame(), tmp_path / "claims" / "cpu" / "01.csv")
    finally:
        os.umask(old)
    files = [s.path("history.csv"), s.path("model.pt"), s.path("spec.json"), s.path("manifest.json"),
             tmp_path / "claims" / "cpu" / "01.csv"]
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == mode, p


# =====================================================================================================
# Adopting the older cache (results/<kind>/<hash>/ with spec.json and no manifest)
# =====================================================================================================

def _legacy_unit(root: Path, kind: str, spec: dict, files: dict[str, object]) -> Path:
    """A unit as the older Store wrote it: spec.json beside the results, no manifest."""
    d = root / kind / runs.digest(spec)
    d.mkdir(parents=True)
    (d / "spec.json").write_text(json.dumps(spec, indent=1, sort_keys=True))
    for name, obj in files.items():
        if name.endswith(".csv") and isinstance(obj, pd.DataFrame):
            obj.to_csv(d / name, index=False)
        elif name.endswith(".pt"):
            torch.save(obj, d / name)
        else:
            (d / name).write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return d


def test_without_adoption_an_older_unit_is_recomputed_not_trusted(tmp_path):
    _legacy_unit(tmp_path, "dense", {"seed": 0}, {"history.csv": _frame(2)})
    compute, calls = _counting(lambda: _frame(5))
    assert len(Store(tmp_path, "dense", {"seed": 0}).frame("history", compute)) == 5 and calls


def test_adopt_verifies_older_units_and_moves_the_bad_ones_aside(tmp_path):
    from pruning_lib.masks import Mask

    marker = tmp_path / "pwned"
    res = tmp_path / "results"
    good = _legacy_unit(res, "dense", {"seed": 0},
                        {"history.csv": _frame(3), "model.pt": {"w": torch.ones(2)}})
    pickled = _legacy_unit(res, "lottery/round", {"r": 1}, {
        "round.pt": {"mask": Mask({"w": torch.tensor([True, False])}), "history": _frame(2)},
        "final.pt": {"acc": 0.5}})
    half = _legacy_unit(res, "03_dep_l0", {"seed": 1}, {"history.csv": _frame(2)})  # no result.json yet
    bad_spec = _legacy_unit(res, "dense", {"seed": 1}, {"history.csv": _frame(3)})
    (bad_spec / "spec.json").write_text(json.dumps({"seed": 2}))
    no_spec = _legacy_unit(res, "dense", {"seed": 3}, {"history.csv": _frame(3)})
    (no_spec / "spec.json").unlink()
    cut_json = _legacy_unit(res, "03_dep_l0", {"seed": 4}, {"result.json": '{"test_error": 0.1'})
    cut_csv = _legacy_unit(res, "dense", {"seed": 5}, {"history.csv": 'step,acc\n0,"0.1\n'})
    cut_pt = _legacy_unit(res, "lnpt/teacher", {"seed": 6}, {"teacher.pt": {"w": torch.ones(3)}})
    (cut_pt / "teacher.pt").write_bytes((cut_pt / "teacher.pt").read_bytes()[:40])
    evil = _legacy_unit(res, "lnpt/teacher", {"seed": 7}, {"teacher.pt": {"state": Evil(marker)}})
    running = res / "dense" / ("0" * 16)
    running.mkdir()
    torch.save({"step": 3}, running / "checkpoint.pt")

    proc = subprocess.run([sys.executable, "-m", "pruning_lib.runs", "adopt", str(res)], capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr  # some units were moved aside
    out = proc.stdout
    assert not marker.exists()
    for d in (bad_spec, no_spec, cut_json, cut_csv, cut_pt, evil):
        assert not d.exists() and str(d) in out
    assert len(list((res / "_corrupt").rglob("spec.json"))) == 5  # moved aside, never deleted
    assert "5 moved" not in out and "6 moved" in out and "3 adopted" in out and "1 unfinished" in out
    assert (running / "checkpoint.pt").exists()  # a run in progress is left to resume

    compute, calls = _counting(lambda: _frame(9))
    assert len(Store(res, "dense", {"seed": 0}).frame("history", compute)) == 3 and not calls
    assert torch.equal(Store(res, "dense", {"seed": 0}).torch("model")["w"], torch.ones(2))
    rnd = Store(res, "lottery/round", {"r": 1}).torch("round")
    assert isinstance(rnd["mask"], Mask) and rnd["history"].equals(_frame(2))
    torch.load(pickled / "round.pt", weights_only=True)  # rewritten in the safe form
    assert Store(res, "03_dep_l0", {"seed": 1}).exists("history.csv")
    assert not Store(res, "03_dep_l0", {"seed": 1}).exists("result.json")  # still to be finished
    assert runs.check_unit(good)[1] is None and runs.check_unit(half)[1] is None

    again = subprocess.run([sys.executable, "-m", "pruning_lib.runs", "adopt", str(res)], capture_output=True,
                           text=True, cwd=tmp_path)
    assert again.returncode == 0 and "3 verified" in again.stdout  # idempotent


def test_chapters_run_side_by_side_and_the_verdicts_last(tmp_path, monkeypatch):
    """``parallel=2`` runs two chapters at once (each in its own kernel), a failed one still goes to
    ``_build/failed`` alone, and the verdicts notebook starts only when every chapter has finished. The
    kernels side by side share the process's OpenMP threads (4 here: 2 each); the environment is restored."""
    here = Path.cwd()
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    stamp = tmp_path / "stamps"
    stamp.mkdir()
    body = ("import os, time, pathlib\n"
            f"pathlib.Path({str(stamp)!r}, NAME + '.threads').write_text(os.environ['OMP_NUM_THREADS'])\n"
            f"pathlib.Path({str(stamp)!r}, NAME + '.start').write_text(str(time.time()))\n"
            "time.sleep(1.5)\n"
            f"pathlib.Path({str(stamp)!r}, NAME + '.end').write_text(str(time.time()))")
    for name in ("01_a", "02_b"):
        _notebook(tmp_path / "notebooks" / f"{name}.ipynb", 'profile = "cpu"\nresults_dir = "results"',
                  f"NAME = {name!r}", body)
    _notebook(tmp_path / "notebooks" / "03_c.ipynb", 'profile = "cpu"\nresults_dir = "results"',
              "raise ValueError('boom')")
    _notebook(tmp_path / "notebooks" / "99_verdicts.ipynb", 'profile = "cpu"\nresults_dir = "results"',
              "NAME = '99_verdicts'", body)
    jobs = book.plan(tmp_path, "cpu", None)
    assert [j.name for j in jobs][-1] == "99_verdicts"
    result = book.execute(jobs, tmp_path, parallel=2)
    assert result["failed"] == ["03_c"] and list(result["seconds"]) == [j.name for j in jobs]
    t = {p.name: float(p.read_text()) for p in stamp.iterdir()}
    assert t["01_a.threads"] == t["02_b.threads"] == 2 and os.environ["OMP_NUM_THREADS"] == "4"
    assert book.kernel_threads(1) is None and book.kernel_threads(8) == "1"
    assert t["01_a.start"] < t["02_b.end"] and t["02_b.start"] < t["01_a.end"]  # side by side
    assert t["99_verdicts.start"] >= max(t["01_a.end"], t["02_b.end"])
    assert (tmp_path / "_build" / "failed" / "03_c.ipynb").exists()
    # "auto": side by side only when every chapter's units are cached; these list none, so one at a time
    assert book.parallel_jobs(jobs, tmp_path, "auto") == 1 and book.parallel_jobs(jobs, tmp_path, "3") == 3
    monkeypatch.setattr(book, "cached_chapters", lambda js, root=".": [j.name for j in js])
    monkeypatch.setattr(book.os, "cpu_count", lambda: 2)
    assert book.parallel_jobs(jobs, tmp_path, "auto") == 2
    # the run leaves the process where it was (papermill's own cwd= would not, with two threads)
    assert Path.cwd() == here
