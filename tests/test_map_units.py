"""runs.map_units: the same results serially, in a process pool and on a Dask LocalCluster as a plain
loop; workers return their units and the caller stores them; a failed unit loses no finished unit."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pruning_lib import runs
from pruning_lib.runs import ConfigError, Store, UnitError, map_units


def square(x, results_dir):
    """A unit: its result is cached in a Store under ``results_dir``; returns it."""
    store = Store(results_dir, "test/square", {"x": x})
    return store.json("value", lambda: {"y": x * x, "where": os.getpid()})["y"]


def square_or_fail(spec, results_dir):
    """``spec = (x, ran)``: unit 5 fails, after it finished a part of its own work (a Store unit) that
    must reach the caller too; every other unit leaves a mark in the folder ``ran`` (shared: the
    workers run on this machine) once it has finished, so a test knows which units finished."""
    x, ran = spec
    if x == 5:
        Store(results_dir, "test/part", {"x": x}).json("value", lambda: {"done": True})
        time.sleep(0.5)
        raise ValueError(f"boom on unit {x}")
    y = square(x, results_dir)
    Path(ran, str(x)).touch()
    return y


def needs_dependency(x, results_dir):
    """A unit that reads a finished unit (shipped to the worker by ``inputs``); computing it again on
    the worker would fail."""
    def never():
        raise AssertionError("the dependency was recomputed on the worker: it was not shipped")

    dep = Store(results_dir, "test/dep", {"x": x}).json("value", never)
    return Store(results_dir, "test/uses", {"x": x}).json("value", lambda: {"y": dep["y"] + 1})["y"]


def where(x, results_dir):
    return runs.in_worker()


def pid(x, results_dir):
    return os.getpid()


def _until_every_pool_process_ran_a_unit(tmp_path, n: int = 2) -> None:
    """Run small units on the kept ``process:n`` pool until each of its n processes has run one, so that
    every one has started (its interrupt handler installed) and is idle: a pool spawns a process at a
    time, and a fast first process can run all of a call's units while the second still imports torch."""
    import time

    seen, deadline = set(), time.time() + 120
    while len(seen) < n and time.time() < deadline:
        seen |= set(map_units(pid, list(range(4 * n)), results_dir=tmp_path, executor=f"process:{n}",
                              progress=False))
    assert len(seen) == n


def files(root: Path) -> dict[str, bytes]:
    """Every unit file under ``root`` (manifest included), by path relative to it."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


@pytest.fixture(scope="module")
def dask_client():
    """One LocalCluster for the module: 2 worker processes of one thread each, each with a GPU=1
    resource label (no GPU is used; units that ask for one run one per worker)."""
    distributed = pytest.importorskip("distributed")
    import logging

    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=logging.ERROR,
                                       resources={"GPU": 1},
                                       # one BLAS thread in each worker whatever the caller's environment
                                       # (make exports OMP_NUM_THREADS=2): the thread count changes the bits
                                       env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    client = distributed.Client(cluster)
    yield client
    runs.close_executors()  # the clients map_units made for the scheduler's address
    client.close()
    cluster.close()


XS = list(range(7))


def test_serial_is_a_plain_loop(tmp_path):
    loop = [square(x, str(tmp_path / "loop")) for x in XS]
    out = map_units(square, XS, results_dir=tmp_path / "mapped", executor="serial", progress=False)
    assert out == loop == [x * x for x in XS]
    assert files(tmp_path / "mapped").keys() == files(tmp_path / "loop").keys()
    assert map_units(where, [1], results_dir=tmp_path, executor="serial", progress=False) == [False]


def test_process_pool_matches_a_plain_loop(tmp_path):
    loop = [square(x, str(tmp_path / "loop")) for x in XS]
    out = map_units(square, XS, results_dir=tmp_path / "mapped", executor="process:2", progress=False)
    assert out == loop
    got, want = files(tmp_path / "mapped"), files(tmp_path / "loop")
    assert got.keys() == want.keys()
    # the units were computed in other processes (their pid is in the result) and written here
    pids = {runs.Store(tmp_path / "mapped", "test/square", {"x": x}).json("value")["where"] for x in XS}
    assert os.getpid() not in pids
    for x in XS:
        assert runs.check_unit(Store(tmp_path / "mapped", "test/square", {"x": x}).dir)[1] is None


def test_process_pool_with_one_unit_to_compute_runs_it_here(tmp_path):
    # one unit left to compute (the others are done) gets no pool: it runs in this process
    for x in (1, 2):
        square(x, str(tmp_path))
    done = lambda x: Store(tmp_path, "test/square", {"x": x}).exists("value.json")
    out = map_units(square, [1, 2, 3], results_dir=tmp_path, executor="process:2", done=done, progress=False)
    assert out == [1, 4, 9]
    assert Store(tmp_path, "test/square", {"x": 3}).json("value")["where"] == os.getpid()
    # two left: the pool runs them
    assert map_units(where, [1, 2], results_dir=tmp_path, executor="process:2", progress=False) == [True, True]
    assert map_units(where, [1], results_dir=tmp_path, executor="process:2", progress=False) == [False]


def test_process_pool_carries_a_closure(tmp_path):
    pytest.importorskip("cloudpickle")  # installed with Dask: it carries what pickle cannot
    offset = 10
    out = map_units(lambda x, root: x + offset, [1, 2], results_dir=tmp_path, executor="process:1",
                    progress=False)
    assert out == [11, 12]


def test_dask_local_cluster_matches_a_plain_loop(tmp_path, dask_client):
    loop = [square(x, str(tmp_path / "loop")) for x in XS]
    out = map_units(square, XS, results_dir=tmp_path / "mapped", executor=dask_client, progress=False)
    assert out == loop
    assert files(tmp_path / "mapped").keys() == files(tmp_path / "loop").keys()
    assert set(map_units(where, [1, 2], results_dir=tmp_path, executor=dask_client, progress=False)) == {True}
    # the scheduler's address as a string works the same (a client of a running scheduler)
    again = map_units(square, XS, results_dir=tmp_path / "by_address",
                      executor=dask_client.scheduler.address, progress=False)
    assert again == loop


def test_a_unit_failing_on_a_dask_worker_loses_no_finished_unit(tmp_path, dask_client):
    ran = tmp_path / "ran"
    ran.mkdir()
    specs = [(x, str(ran)) for x in (0, 1, 5, 2, 3, 4, 6, 7)]
    with pytest.raises(UnitError) as info:
        map_units(square_or_fail, specs, results_dir=tmp_path / "results", executor=dask_client,
                  progress=False, key=lambda s: str(s[0]))
    err = info.value
    assert err.key == "5" and err.spec == specs[2]
    message = str(err)
    assert "unit 5" in message and "ValueError: boom on unit 5" in message
    # the worker's traceback
    assert "square_or_fail" in err.remote_traceback and "raise ValueError" in message
    assert "(pid " in err.where
    finished = sorted(int(p.name) for p in ran.iterdir())
    assert finished, "no unit finished before the error"
    for x in finished:  # every unit that finished is in the caller's Store
        assert Store(tmp_path / "results", "test/square", {"x": x}).exists("value.json"), x
    assert f"{len(finished) + 1} finished unit(s) of this run were stored" in message
    # so is the part the failed unit finished before it failed
    assert Store(tmp_path / "results", "test/part", {"x": 5}).json("value") == {"done": True}
    assert not Store(tmp_path / "results", "test/square", {"x": 5}).exists("value.json")


def test_a_failing_unit_in_the_pool_and_serially(tmp_path):
    ran = str(tmp_path)
    with pytest.raises(UnitError, match="boom on unit 5") as info:
        map_units(square_or_fail, [(0, ran), (5, ran)], results_dir=tmp_path / "pool",
                  executor="process:2", progress=False)
    assert Store(tmp_path / "pool", "test/square", {"x": 0}).exists("value.json")
    assert Store(tmp_path / "pool", "test/part", {"x": 5}).exists("value.json")
    assert "square_or_fail" in info.value.remote_traceback
    with pytest.raises(ValueError, match="boom on unit 5") as info:  # serially: the unit's own exception
        map_units(square_or_fail, [(0, ran), (5, ran), (1, ran)], results_dir=tmp_path / "serial",
                  executor="serial", progress=False)
    assert any("this process" in note and "rerun to resume" in note for note in info.value.__notes__)
    assert Store(tmp_path / "serial", "test/square", {"x": 0}).exists("value.json")
    assert not Store(tmp_path / "serial", "test/square", {"x": 1}).exists("value.json")


def test_inputs_are_shipped_and_done_units_stay_here(tmp_path, dask_client):
    for x in (1, 2):
        Store(tmp_path, "test/dep", {"x": x}).json("value", lambda x=x: {"y": 10 * x})
    inputs = lambda x: [Store(tmp_path, "test/dep", {"x": x})]  # noqa: E731
    out = map_units(needs_dependency, [1, 2], results_dir=tmp_path, executor=dask_client, inputs=inputs,
                    progress=False)
    assert out == [11, 21]
    # done units run here: they only load (a worker would not find the dependency... or recompute)
    calls = []
    done = lambda x: Store(tmp_path, "test/uses", {"x": x}).exists("value.json")  # noqa: E731
    out = map_units(lambda x, root: calls.append(x) or needs_dependency(x, root), [1, 2],
                    results_dir=tmp_path, executor=dask_client, done=done, progress=False)
    assert out == [11, 21] and calls == [1, 2]


def test_duplicated_and_retried_units_are_harmless(tmp_path, dask_client):
    out = map_units(square, [3, 3, 4], results_dir=tmp_path, executor=dask_client, progress=False)
    assert out == [9, 9, 16]
    before = files(tmp_path)
    # a unit a worker returns again (a retry, a duplicate) changes no file of the finished unit
    unit = runs._pack_unit(Store(tmp_path, "test/square", {"x": 3}).dir)
    assert runs.install_unit(tmp_path, unit)[1] == 0
    assert files(tmp_path) == before
    # and a fresh results folder gets exactly the worker's files
    folder, written = runs.install_unit(tmp_path / "fresh", unit)
    assert written == len(unit["files"]) and runs.check_unit(folder)[1] is None


def test_resources_are_asked_of_dask_workers(tmp_path, dask_client):
    assert map_units(square, [1, 2, 3], results_dir=tmp_path, executor=dask_client, resources={"GPU": 1},
                     progress=False) == [1, 4, 9]
    with pytest.raises(ConfigError, match="resources"):  # no worker has 2: said at once, not a hang
        map_units(square, [1], results_dir=tmp_path, executor=dask_client, resources="GPU=2",
                  progress=False)


def test_executor_from_the_environment(monkeypatch):
    monkeypatch.delenv(runs.EXECUTOR_ENV, raising=False)
    assert runs.parse_executor(None, workers=1) == runs.Executor("serial")
    assert runs.parse_executor(None, workers=3) == runs.Executor("process", 3)
    monkeypatch.setenv(runs.EXECUTOR_ENV, "tcp://host:8786")
    assert runs.parse_executor(None, workers=3) == runs.Executor("dask", 3, "tcp://host:8786")
    assert runs.parse_executor("dask-local:2") == runs.Executor("dask", 2)
    assert runs.parse_executor("process:4", workers=2) == runs.Executor("process", 4)
    assert runs.parse_executor("serial", workers=8) == runs.Executor("serial")
    monkeypatch.setenv(runs.EXECUTOR_ENV, "clusterr")
    with pytest.raises(ConfigError, match=r"\$PRUNING_EXECUTOR 'clusterr'"):
        runs.parse_executor(None)
    for bad in ("process:0", "process:x", "serial:2"):
        with pytest.raises(ConfigError):
            runs.parse_executor(bad)
    assert runs.parse_resources("GPU=1, MEMORY=8e9") == {"GPU": 1.0, "MEMORY": 8e9}
    for bad in ("GPU", "GPU=0", "GPU=x", "=1"):
        with pytest.raises(ConfigError):
            runs.parse_resources(bad)


def test_the_book_runner_passes_the_executor_to_the_kernels(tmp_path, monkeypatch):
    import json

    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    from pruning_lib import book

    monkeypatch.delenv(runs.EXECUTOR_ENV, raising=False)
    monkeypatch.delenv(runs.RESOURCES_ENV, raising=False)
    params = new_code_cell('profile = "cpu"')
    params.metadata["tags"] = ["parameters"]
    body = new_code_cell("import os\n"
                         "print(os.environ.get('PRUNING_EXECUTOR'), os.environ.get('PRUNING_RESOURCES'))")
    nb = new_notebook(cells=[params, body], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                     "language": "python"}})
    (tmp_path / "notebooks").mkdir()
    nbformat.write(nb, tmp_path / "notebooks" / "01_tiny.ipynb")
    jobs = book.plan(tmp_path, "cpu", None, [], include_verdicts=False)
    assert book.execute(jobs, tmp_path, executor="tcp://scheduler:8786", resources="GPU=1")["failed"] == []
    out = (tmp_path / "book" / "chapters" / "01_tiny.ipynb").read_text()
    assert "tcp://scheduler:8786 GPU=1" in out
    record = json.loads((tmp_path / "results" / "runs" / "cpu" / "01_tiny.json").read_text())
    assert record["executor"] == "tcp://scheduler:8786"
    assert runs.EXECUTOR_ENV not in os.environ  # this process's environment is left as it was
    # a mistake is named before anything runs
    with pytest.raises(book.BookError, match="not an executor"):
        book.check_executor("tcp:/oops")
    assert book.main(["run", "--root", str(tmp_path), "--executor", "nowhere", "--dry-run"]) == 2


def test_chapter_units_on_dask_gpu_workers_from_the_command_line(tmp_path, dask_client, capsys):
    """``units CHAPTER --missing --executor ADDRESS --resources GPU=1``: each unit asks a worker for one
    GPU (here a label: the fixture's workers have GPU=1 and no GPU), the workers return the unit's files
    and this process stores them; the trained weights are those of a unit trained here."""
    import torch

    from pruning_lib import book

    argv = ["units", "01", "--profile", "smoke", "-p", "models", "[lenet300_100]", "-p", "epochs", "0.05"]
    torch.set_num_threads(1)  # as the Dask workers (one thread each)
    assert book.main(argv + ["-p", "results_dir", str(tmp_path / "here"), "--missing"]) == 0
    address = dask_client.scheduler.address
    there = argv + ["-p", "results_dir", str(tmp_path / "there"), "--missing"]
    assert book.main(there + ["--executor", address, "--resources", "GPU=1"]) == 0
    assert "each asking for GPU=1" in capsys.readouterr().out
    [a] = list((tmp_path / "here" / "dense").glob("*/model.pt"))
    [b] = list((tmp_path / "there" / "dense").glob("*/model.pt"))
    assert a.parent.name == b.parent.name and runs.check_unit(b.parent)[1] is None
    wa, wb = runs.safe_torch_load(a), runs.safe_torch_load(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert book.main(there + ["--resources", "GPU=1"]) == 2  # resources need an executor


def test_an_idle_pool_process_leaves_quietly_when_interrupted(tmp_path):
    # a kernel's shutdown sends SIGINT to its process group: an idle pool process exits with status 0
    # instead of printing a KeyboardInterrupt traceback; the next call makes a new pool
    import signal
    import time

    assert map_units(where, [1, 2], results_dir=tmp_path, executor="process:2", progress=False) == [True, True]
    _until_every_pool_process_ran_a_unit(tmp_path)
    procs = list(runs._POOLS[2]._processes.values())
    assert procs
    for p in procs:
        os.kill(p.pid, signal.SIGINT)
    deadline = time.time() + 30
    while any(p.exitcode is None for p in procs) and time.time() < deadline:
        time.sleep(0.1)
    assert [p.exitcode for p in procs] == [0] * len(procs)
    assert map_units(where, [1, 2], results_dir=tmp_path, executor="process:2", progress=False) == [True, True]
    runs.close_executors()


def test_a_pool_process_still_starting_is_not_stopped_by_an_interrupt(tmp_path):
    # the interrupt reaches the pool's processes while they still import torch (before their SIGINT
    # handler exists): they started with SIGINT ignored, so none prints a KeyboardInterrupt traceback or
    # dies; they run their units and then, idle, leave quietly at the next interrupt
    import signal
    import time

    runs.close_executors()
    pool = runs._Pool(runs.Executor("process", 2), 2)
    futures = [pool.submit(where, x, [], f"k{x}", {}) for x in (1, 2)]
    procs = list(pool.pool._processes.values())
    assert len(procs) == 2 and signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    for p in procs:
        os.kill(p.pid, signal.SIGINT)
    outs = [f.result(timeout=120) for f in futures]
    assert [o["error"] for o in outs] == [None, None] and [o["result"] for o in outs] == [True, True]
    assert all(p.exitcode is None for p in procs)  # alive
    assert runs._POOLS[2] is pool.pool  # the pool map_units keeps: the helper runs on these two processes
    _until_every_pool_process_ran_a_unit(tmp_path)
    assert list(runs._POOLS[2]._processes.values()) == procs
    for p in procs:
        os.kill(p.pid, signal.SIGINT)
    deadline = time.time() + 30
    while any(p.exitcode is None for p in procs) and time.time() < deadline:
        time.sleep(0.1)
    assert [p.exitcode for p in procs] == [0, 0]
    runs.close_executors()
