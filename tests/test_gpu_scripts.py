"""The GPU scripts on a machine without a GPU: benchmarks/gpu_throughput.py and scripts/gpu_check.py say so
and exit 0; the benchmark's tiny CPU run (--cpu) measures every row (its numbers mean nothing)."""
from __future__ import annotations

import json
from importlib import util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(path):
    spec = util.spec_from_file_location(Path(path).stem, ROOT / path)
    mod = util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: make gpu-check runs these")
def test_without_a_gpu_both_say_so_and_exit_0(capsys):
    assert _load("benchmarks/gpu_throughput.py").main([]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out
    assert _load("scripts/gpu_check.py").main([]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out


def test_throughput_cpu_run_measures_every_row(tmp_path, capsys):
    threads = torch.get_num_threads()
    out = tmp_path / "t.json"
    try:
        status = _load("benchmarks/gpu_throughput.py").main(
            ["--cpu", "--model", "resnet20", "--batch", "2", "--steps", "1", "--warmup", "1", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert status == 0
    result = json.loads(out.read_text())
    rows = {r["row"]: r for r in result["rows"]}
    assert set(rows) == {"plain ours", "fit dense", "fit l0_hc", "fit dep_l0", "fit bernoulli", "fit polarization"}
    assert all(r["images_per_s"] > 0 and r["ratio_to_plain"] > 0 for r in rows.values())
    assert "fit dense at" in capsys.readouterr().out
