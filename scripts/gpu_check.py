"""One check of what a GPU does with the project, in under 8 minutes on one GPU (`make gpu-check`).

Steps, each in its own process with its own time limit (the most wanted first: a step gets at most what is
left of the budget, and is skipped, saying so, when too little is left):
  1. the GPUs and the software (torch, CUDA);
  2. benchmarks/gpu_throughput.py, ResNet-50 at 224 x 224 (bf16, channels-last): our loop, dense and with
     each gate family, against a plain torchvision loop, images/s and peak memory;
  3. one chapter-3 unit, ResNet-50 with Dep-L0 gates on an ImageNet stand-in (224 x 224), launched by
     `python -m pruning_lib.book units 03 --profile paper ... --nproc N` under torchrun on all visible GPUs
     (bf16, channels-last), then listed as done: the cache `make book` reads;
  4. every chapter's `paper` profile for a few steps on generated stand-ins at full image size
     (tests/test_paper_profiles.py, whose loaders then run on the GPU);
  5. benchmarks/gpu_throughput.py, ResNet-20 at 32 x 32;
  6. a short text report of what ran, how fast, and what failed: printed and written to
     _build/gpu_check/report.txt (with the benchmarks' JSON and the unit's results beside it).
On a machine without a CUDA GPU it says so and exits 0. Exit status 1 when a step failed.

    python scripts/gpu_check.py [--out _build/gpu_check] [--budget 470]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(name, cmd, timeout, log, env=None, cwd=ROOT):
    """Run ``cmd``; returns (ok, seconds, output tail)."""
    start = time.perf_counter()
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1", **(env or {}))
    try:
        p = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
        out, ok = p.stdout + p.stderr, p.returncode == 0
        why = "" if ok else f"exit status {p.returncode}"
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        out += (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        ok, why = False, f"timed out after {timeout} s"
    seconds = time.perf_counter() - start
    with open(log, "a") as f:
        f.write(f"\n===== {name} ({seconds:.1f} s, {'ok' if ok else why}) =====\n$ {' '.join(map(str, cmd))}\n{out}\n")
    return ok, seconds, why, out


def write_imagenet_standin(root: Path, classes=2, per_class=12, n_val=2) -> None:
    """ImageNet's ImageFolder layout with random 256 x 256 JPEGs (tests/test_data_layouts.py's writer)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_data_layouts import write_image_folder

    wnids = [f"n0144{i:04d}" for i in range(classes)]
    write_image_folder(root / "imagenet" / "train", wnids, per_class=per_class, size=256)
    write_image_folder(root / "imagenet" / "val", wnids, per_class=n_val, size=256)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "_build" / "gpu_check"))
    ap.add_argument("--budget", type=float, default=470.0, help="seconds for all steps (the GPU's 8 minutes)")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU on this machine: nothing to check (exit 0)")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    log.write_text("")
    py = sys.executable
    n = torch.cuda.device_count()
    gpus = [f"{torch.cuda.get_device_name(i)} ({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB)"
            for i in range(n)]
    t_start = time.perf_counter()
    rows: list[tuple[str, str, float, str]] = []
    lines = [f"gpu-check {time.strftime('%Y-%m-%d %H:%M:%S %Z')}: {n} GPU(s): {', '.join(gpus)}; torch "
             f"{torch.__version__}, CUDA {torch.version.cuda}, {os.cpu_count()} CPU cores"]

    def left() -> float:
        return args.budget - (time.perf_counter() - t_start)

    def step(name, cmd, limit, env=None, note=lambda out: ""):
        limit = int(min(limit, left()))
        if limit < 20:
            rows.append((name, "SKIPPED (out of time)", 0.0, ""))
            return False, ""
        ok, seconds, why, text = run(name, cmd, limit, log, env)
        rows.append((name, "ok" if ok else f"FAILED ({why})", seconds, note(text) if ok else text.strip()[-300:]))
        return ok, text

    def bench(model, extra, limit):
        js = out / f"throughput_{model}.json"
        step(f"throughput {model} (bf16, channels-last)",
             [py, "benchmarks/gpu_throughput.py", "--model", model, "--json", str(js), *extra], limit)
        if js.exists():
            from importlib import util

            spec = util.spec_from_file_location("gpu_throughput", ROOT / "benchmarks" / "gpu_throughput.py")
            mod = util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            lines.append(mod.report(json.loads(js.read_text())))

    # the most wanted first: each step gets at most what is left of the budget, later ones may be skipped
    bench("resnet50", ["--batch", "256", "--steps", "15", "--repeats", "2"], 170)

    # one chapter-3 unit under torchrun on all visible GPUs, then listed as done
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        data, results = Path(tmp) / "data", Path(tmp) / "results"
        write_imagenet_standin(data)
        units = [py, "-m", "pruning_lib.book", "units", "03", "--profile", "paper",
                 "-p", "data_root", str(data), "-p", "results_dir", str(results),
                 "-p", "experiments", '["resnet50/imagenet"]', "-p", "methods", '["dep_l0_forward"]',
                 "-p", "lambda_scales", "[1.0]", "-p", "dense_baseline", "False", "-p", "epochs", "0.5",
                 "-p", "batch_size", str(max(8, 2 * n))]

        def provenance(text):
            found = list(results.rglob("provenance.json"))
            if not found:
                return "no provenance.json written"
            p = json.loads(found[0].read_text())
            return (f"{p['world_size']} process(es) on {p['device_name']}, {p['precision']}, channels-last "
                    f"{p['channels_last']}, {p.get('unit_seconds', float('nan')):.1f} s for the unit "
                    f"(90 + 10 epochs clipped to 0.5 + 10 on 12 images)")

        ok, _ = step(f"torchrun unit: ResNet-50 Dep-L0 on an ImageNet stand-in, {n} GPU(s)",
                     units + ["--missing", "--nproc", str(n), "--bf16", "--channels-last"], 150,
                     note=provenance)
        if ok:
            step("the unit is in the cache (units --list)", units + ["--list"], 60,
                 note=lambda text: next((l for l in text.splitlines() if "units," in l), ""))
            if rows[-1][1] == "ok" and " 1 done" not in rows[-1][3]:
                rows[-1] = rows[-1][:1] + ("FAILED (not listed as done)",) + rows[-1][2:]
        shutil.copytree(results, out / "unit_results", dirs_exist_ok=True) if results.exists() else None

    # every chapter's paper profile, a few steps on stand-ins at full image size, on the GPU
    def passed(text):
        last = [l for l in text.strip().splitlines() if " passed" in l or " failed" in l]
        return last[-1].strip("= ") if last else ""

    step("paper profiles on stand-ins (tests/test_paper_profiles.py, on the GPU)",
         [py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_paper_profiles.py"], 150,
         note=passed)
    bench("resnet20", ["--batch", "512", "--steps", "30", "--repeats", "2"], 60)

    lines.append("")
    lines.append(f"{'step':72s} {'status':24s} {'seconds':>8s}")
    for name, status, seconds, note in rows:
        lines.append(f"{name[:72]:72s} {status[:24]:24s} {seconds:8.1f}")
        if note:
            lines.append("    " + note.replace("\n", "\n    "))
    failed = [r for r in rows if not r[1].startswith("ok")]
    lines.append(f"total {time.perf_counter() - t_start:.0f} s; "
                 + (f"{len(failed)} step(s) failed or skipped: see {log}" if failed else "every step ok"))
    text = "\n".join(lines)
    print(text)
    (out / "report.txt").write_text(text + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
