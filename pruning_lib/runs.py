"""Typed run configurations, canonical hashes, and a results store that reuses finished work.

Every chapter describes its settings as a frozen dataclass derived from :class:`RunConfig`. Each field is
declared with :func:`param`, which records its allowed values; a class-level ``PROFILES`` dict gives the
values of the ``smoke``, ``cpu`` and ``paper`` profiles. A notebook builds its config with
:meth:`RunConfig.from_namespace`, which rejects unknown parameters and invalid values with an error that
names them.

Results (as in open_lth) live in a folder named by a hash of the canonical JSON of what produced them, so
a rerun with the same settings finds and loads them, and a run stopped half-way resumes from the units it
had finished. Every write is atomic (write to a temporary file in the same folder, then ``os.replace``),
and each unit's ``manifest.json`` (its spec, and the size and SHA-256 digest of every file, written last)
is its commit mark: a unit is reused only when its files match it, so a file cut short or edited is
recomputed, never trusted (see :class:`Store`). ``.pt`` files are read with ``weights_only=True``.
``python -m pruning_lib.runs adopt results/`` verifies a cache written before manifests, once.

:func:`map_units` runs a sweep's units serially, in a local process pool or on Dask workers (a
LocalCluster made on the spot, or a running scheduler's address); workers return what they computed and
the calling process writes it to the Store. ``$PRUNING_EXECUTOR`` chooses the executor for every chapter
(``python -m pruning_lib.book run --executor``, ``make book DASK=tcp://host:8786``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import tempfile
import time
import typing
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import pandas as pd
import torch

from .timing import torch_threads

PROFILES = ("smoke", "cpu", "paper")


class ConfigError(ValueError):
    """An unknown parameter, or a parameter value outside what the chapter accepts."""


# One range per parameter name, the same in every chapter that has it: it stands in for the chapter's
# own ``low``/``high`` (so ``seeds -1`` is refused everywhere, not only where a chapter said so).
COMMON_RANGES: dict[str, tuple[float | None, float | None]] = {
    "seeds": (0, 2**32 - 1), "conv_seeds": (0, 2**32 - 1), "resnet_seeds": (0, 2**32 - 1),
    "lr": (0.0, 10.0), "gate_lr": (0.0, 10.0),
    "epochs": (0.01, 10000.0), "conv_epochs": (0.01, 10000.0), "teacher_epochs": (0.01, 10000.0),
    "trajectory_epochs": (0.01, 10000.0), "finetune_epochs": (0.0, 10000.0),
    "batch_size": (1, 4096), "workers": (1, 64), "threads": (1, 256), "num_threads": (1, 256),
}


def check_json_value(name: str, value: Any) -> None:
    """Refuse what JSON cannot say (sets, dates, bytes, objects) and numbers that are not finite: the
    values a parameter may take, at the runner and in a chapter's Config alike."""
    if value is None or isinstance(value, (bool, str, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"parameter {name!r}: {value!r} is not a finite number")
        return
    if isinstance(value, (list, tuple)):
        for v in value:
            check_json_value(name, v)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"parameter {name!r}: mapping key {k!r} is not a string")
            check_json_value(name, v)
        return
    raise ConfigError(f"parameter {name!r}: {value!r} ({type(value).__name__}) is not a JSON value "
                      f"(give numbers, strings, true/false, null, lists or mappings)")


def param(default: Any, *, choices: typing.Iterable | None = None, low: float | None = None,
          high: float | None = None, help: str = "") -> Any:
    """A config field with validation metadata. ``choices`` also applies to each item of a tuple."""
    meta = {"choices": tuple(choices) if choices is not None else None, "low": low, "high": high,
            "help": help}
    return field(default=default, metadata=meta)


def _coerce(name: str, value: Any, annotation) -> Any:
    """Coerce notebook values (Papermill passes lists, ints for floats) to the declared type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(name, value, a)
            except ConfigError:
                continue
        raise ConfigError(f"parameter {name!r}: {value!r} is not a {annotation}")
    check_json_value(name, value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            if isinstance(value, dict):
                raise ConfigError(f"parameter {name!r}: expected a list, got {value!r}")
            value = (value,)
        if not value:
            raise ConfigError(f"parameter {name!r}: the list is empty; give at least one value")
        item_t = args[0] if args else Any
        return tuple(_coerce(name, v, item_t) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"parameter {name!r}: expected a dict, got {value!r}")
        return dict(value)
    if annotation is Any:
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"parameter {name!r}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not (isinstance(value, int) or
                                           (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"parameter {name!r}: expected an integer, got {value!r}")
        return int(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"parameter {name!r}: expected True or False, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"parameter {name!r}: expected a string, got {value!r}")
        return value
    return value


def _scale(value, factor: float):
    """A training length times the budget factor: ints stay ints (rounded, at least 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value  # left for validation to refuse
    if isinstance(value, int):
        return max(1, int(round(value * factor)))
    return float(value) * factor


def _flatten(v):
    return v if isinstance(v, tuple) else (v,)


@dataclass(frozen=True)
class RunConfig:
    """Base class of chapter configs: ``profile`` plus the chapter's own fields.

    Subclasses set ``PROFILES = {"smoke": {...}, "cpu": {...}, "paper": {...}}`` (overrides of the field
    defaults) and may extend :meth:`check` with cross-field rules.
    """

    profile: str = param("cpu", choices=PROFILES, help="smoke (CI), cpu (default) or paper (GPU)")
    budget: float = param(1.0, low=0.01, high=100.0,
                          help="factor on every training length of the profile (epochs, iterations)")

    PROFILES: ClassVar[dict[str, dict[str, Any]]] = {}
    # Fields that change how a run is shown, not what it computes: left out of the hash. ``budget`` is
    # left out because it acts through the training lengths it scales (see BUDGETED), which are hashed:
    # a run at budget 2 has twice the epochs in its hash, and budget 1 changes nothing.
    NOT_HASHED: ClassVar[tuple[str, ...]] = ("profile", "results_dir", "progress", "budget")
    # The training lengths that ``budget`` multiplies (ints are rounded, at least 1); None stays None
    # (a chapter whose lengths come from elsewhere scales them itself, see ``scaled``).
    BUDGETED: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _coerce(f.name, getattr(self, f.name), hints[f.name])
            object.__setattr__(self, f.name, value)
            meta = f.metadata
            if value is None:
                continue
            choices = meta.get("choices")
            lo, hi = COMMON_RANGES.get(f.name, (meta.get("low"), meta.get("high")))
            for item in _flatten(value):
                if choices is not None and item not in choices:
                    raise ConfigError(f"parameter {f.name!r}: {item!r} is not one of {list(choices)}")
                if isinstance(item, (int, float)) and not isinstance(item, bool):
                    if not math.isfinite(item):  # NaN passes `x < lo or x > hi`
                        raise ConfigError(f"parameter {f.name!r}: {item!r} is not a finite number")
                    if lo is not None and item < lo or hi is not None and item > hi:
                        raise ConfigError(f"parameter {f.name!r}: {item!r} is outside [{lo}, {hi}]")
        self.check()

    def check(self) -> None:
        """Cross-field validation; raise :class:`ConfigError` naming the parameter."""

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def parameter_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_profile(cls, profile: str = "cpu", **overrides) -> "RunConfig":
        """The profile's settings with ``overrides`` applied (``None`` means "the profile's value")."""
        if profile not in PROFILES:
            raise ConfigError(f"parameter 'profile': {profile!r} is not one of {list(PROFILES)}")
        names = set(cls.parameter_names())
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"unknown parameter(s) {unknown} for {cls.__name__}; "
                              f"valid parameters: {sorted(names)}")
        values = {**cls.PROFILES.get(profile, {}), "profile": profile}
        values.update({k: v for k, v in overrides.items() if v is not None})
        budget = values.get("budget", 1.0)
        if (budget != 1.0 and isinstance(budget, (int, float)) and not isinstance(budget, bool)
                and math.isfinite(budget)):  # NaN is refused by the range check, not scaled
            defaults = {f.name: f.default for f in dataclasses.fields(cls)}
            for name in cls.BUDGETED:
                value = values.get(name, defaults[name])
                if value is not None:
                    values[name] = _scale(value, budget)
        return cls(**values)

    def scaled(self, length):
        """``length`` (a training length that is not a field, e.g. a setup's default iterations) times
        ``budget``, rounded like the BUDGETED fields."""
        return length if length is None or self.budget == 1.0 else _scale(length, self.budget)

    @classmethod
    def from_namespace(cls, namespace: dict[str, Any], extra: typing.Iterable[str] = ()) -> "RunConfig":
        """Build from a notebook's globals after Papermill injected its parameters.

        Every public global that is not a module, a callable or an IPython name counts as a parameter;
        any that is not a field of this config (or listed in ``extra``) is an unknown parameter, which
        Papermill itself would only warn about.
        """
        import types

        ipython_names = {"In", "Out", "get_ipython", "exit", "quit", "open"}
        candidates = {k: v for k, v in namespace.items()
                      if not k.startswith("_") and k not in ipython_names
                      and not isinstance(v, (types.ModuleType, type)) and not callable(v)}
        names = set(cls.parameter_names())
        unknown = sorted(set(candidates) - names - set(extra))
        if unknown:
            raise ConfigError(f"unknown parameter(s) {unknown}; valid parameters: {sorted(names)}")
        values = {k: v for k, v in candidates.items() if k in names}
        return cls.from_profile(values.pop("profile", "cpu"), **values)

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    # --- identity -------------------------------------------------------------------------------
    def to_dict(self, hashed_only: bool = False) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if hashed_only:
            d = {k: v for k, v in d.items() if k not in self.NOT_HASHED}
        return d

    def digest(self) -> str:
        return digest({"config": type(self).__name__, **self.to_dict(hashed_only=True)})


def canonical(obj: Any) -> str:
    """Canonical JSON: sorted keys, tuples as lists, no whitespace; stable across runs and machines."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def digest(obj: Any, length: int = 16) -> str:
    return hashlib.sha256(canonical(obj).encode()).hexdigest()[:length]


# --- atomic writes --------------------------------------------------------------------------------

def _umask() -> int:
    """The process's umask, read from /proc where Linux has it (setting it to read it is not
    thread-safe), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic(path: Path, write: Callable[[str], None]) -> Path:
    """Write ``path`` with ``write(tmp)`` into a temporary file beside it, then rename it into place.

    ``mkstemp`` creates ``-rw-------``; the file gets the mode an ordinary ``open`` would give it (0666
    less the umask), so a team sharing a results folder can read it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    return _atomic(Path(path), lambda tmp: torch.save(obj, tmp))


def atomic_write_text(text: str, path: str | Path) -> Path:
    return _atomic(Path(path), lambda tmp: Path(tmp).write_text(text))


def atomic_write_frame(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a DataFrame as CSV (tidy, readable by anything) atomically."""
    return _atomic(Path(path), lambda tmp: df.to_csv(tmp, index=False))


# --- safe loading of .pt files ----------------------------------------------------------------------
#
# Every .pt file is read with ``torch.load(weights_only=True)``: tensors, numbers, strings and plain
# containers only, so a crafted file cannot run code. What the chapters save besides (pandas frames,
# ``Mask``, NumPy values) is written as tagged plain containers by :func:`to_safe` and rebuilt by
# :func:`from_safe`.

_TAG = "__pruning_lib_type__"
_LEAVES = (type(None), bool, int, float, str, torch.Tensor, torch.Size, torch.dtype, torch.device)


def to_safe(obj: Any) -> Any:
    """``obj`` with every value ``weights_only`` loading refuses turned into a tagged plain container;
    the same object when nothing needs it (a state_dict keeps its ``_metadata``). Raises TypeError for
    what has no safe form."""
    import numpy as np

    from .masks import Mask

    if isinstance(obj, np.generic):  # before the leaves: np.float64 is a float
        return obj.item()
    if isinstance(obj, _LEAVES):
        return obj
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "biuf":
            return {_TAG: "ndarray", "tensor": torch.from_numpy(np.ascontiguousarray(obj).copy())}
        return {_TAG: "ndarray", "list": to_safe(obj.tolist()), "dtype": str(obj.dtype)}
    if isinstance(obj, pd.DataFrame):
        default = isinstance(obj.index, pd.RangeIndex) and obj.index.start == 0 and obj.index.step == 1
        return {_TAG: "DataFrame", "columns": to_safe(list(obj.columns)),
                "dtypes": [str(t) for t in obj.dtypes],
                "data": [to_safe(obj.iloc[:, i].tolist()) for i in range(obj.shape[1])],
                "index": None if default else to_safe(obj.index.tolist())}
    if isinstance(obj, pd.Series):
        return {_TAG: "Series", "name": to_safe(obj.name), "dtype": str(obj.dtype),
                "data": to_safe(obj.tolist()), "index": to_safe(obj.index.tolist())}
    if isinstance(obj, Mask):
        return {_TAG: "Mask", "items": to_safe(dict(obj))}
    if type(obj) in _CONTAINERS:
        return _map_container(obj, to_safe)
    raise TypeError(f"cannot save a {type(obj).__module__}.{type(obj).__qualname__} in a results file "
                    f"(tensors, numbers, strings, containers, NumPy arrays, pandas frames and masks only)")


def from_safe(obj: Any) -> Any:
    """Undo :func:`to_safe`."""
    if type(obj) in (dict, OrderedDict):
        tag = obj.get(_TAG)
        if tag == "DataFrame":
            columns = from_safe(obj["columns"])
            data = {i: _series(from_safe(values), dt)
                    for i, (values, dt) in enumerate(zip(obj["data"], obj["dtypes"]))}
            df = pd.DataFrame(data)
            df.columns = pd.Index(columns) if columns else df.columns
            if obj["index"] is not None:
                df.index = pd.Index(from_safe(obj["index"]))
            return df
        if tag == "Series":
            return _series(from_safe(obj["data"]), obj["dtype"], index=from_safe(obj["index"]),
                           name=obj["name"])
        if tag == "ndarray":
            import numpy as np

            if "tensor" in obj:
                return obj["tensor"].numpy()
            return np.array(from_safe(obj["list"]), dtype=obj["dtype"])
        if tag == "Mask":
            from .masks import Mask

            return Mask(from_safe(obj["items"]))
    if type(obj) in _CONTAINERS:
        return _map_container(obj, from_safe)
    return obj


_CONTAINERS = (dict, OrderedDict, list, tuple, set, frozenset)


def _map_container(obj, fn):
    """``obj`` (a plain container) with ``fn`` applied to each value: the same object when nothing
    changed, else a new one of the same type (a state_dict's ``_metadata`` kept)."""
    if type(obj) in (dict, OrderedDict):
        items = {k: fn(v) for k, v in obj.items()}
        if all(items[k] is v for k, v in obj.items()):
            return obj
        out = type(obj)(items)
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata
        return out
    items = [fn(v) for v in obj]
    return obj if all(a is b for a, b in zip(items, obj)) else type(obj)(items)


def read_csv(path: str | Path) -> pd.DataFrame:
    """A cached CSV; an empty file (a frame with no columns, which ``to_csv`` writes as one newline) is
    an empty frame, not an error."""
    if not Path(path).read_text().strip():
        return pd.DataFrame()
    return pd.read_csv(path)


def _series(values: list, dtype: str, **kw) -> pd.Series:
    try:
        return pd.Series(values, dtype=dtype, **kw)
    except (TypeError, ValueError):  # a dtype this pandas does not know by that name
        return pd.Series(values, **kw)


def safe_torch_save(obj: Any, path: str | Path) -> Path:
    """Save ``obj`` atomically in a form :func:`safe_torch_load` reads back."""
    safe = to_safe(obj)
    return _atomic(Path(path), lambda tmp: torch.save(safe, tmp))


def safe_torch_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """Load a .pt file with ``weights_only=True`` (no code runs) and rebuild what :func:`to_safe` wrote."""
    return from_safe(torch.load(path, map_location=map_location, weights_only=True))


def load_checkpoint(path: str | Path, map_location: Any = None) -> Any:
    """A resumable training checkpoint (``weights_only=True``), or None when there is none. One that
    cannot be read (cut short, or not a checkpoint) is reported in one line and moved aside, and
    training starts from the beginning."""
    p = Path(path)
    if not p.exists():
        return None
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:
        dest = p.with_name(f"{p.name}.unreadable-{_stamp()}")
        os.replace(p, dest)
        print(f"results cache: {p} cannot be read ({_why(exc)}); moved aside to {dest.name}, "
              f"training from the start", file=sys.stderr, flush=True)
        return None


# --- the results store ----------------------------------------------------------------------------

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
# Files a unit writes itself (``store.path(name)``) while it runs, e.g. the resumable checkpoint of
# ``fit``: never part of a finished unit, never in its manifest.
TRANSIENT = ("checkpoint.pt", "checkpoint_finetune.pt")  # the second: a fine-tune phase's (chapter 3)
# Where units whose files do not match their manifest are moved (never deleted): <root>/_corrupt/...
ASIDE = "_corrupt"
_UNIT_NAME = "[0-9a-f]" * 16


class CacheError(RuntimeError):
    """A cached file that cannot be used (it is named in the message and has been moved aside)."""


def _stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"


def _why(exc: BaseException) -> str:
    """One line about ``exc`` (for torch's weights_only refusal, its line that says what it refused)."""
    lines = [l.strip() for l in str(exc).strip().splitlines() if l.strip()]
    line = next((l for l in lines if "WeightsUnpickler error:" in l), lines[0] if lines else "")
    return f"{type(exc).__name__}: {line[:200]}" if line else type(exc).__name__


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _entry(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def check_unit(folder: str | Path) -> tuple[dict | None, str | None]:
    """``(manifest, None)`` when ``folder``'s manifest is whole, its spec hashes to the folder's name,
    and every file it lists is there with its size and SHA-256 digest; else ``(None, what is wrong)``."""
    folder = Path(folder)
    try:
        m = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return None, f"no {MANIFEST}"
    except (OSError, ValueError) as exc:
        return None, f"{MANIFEST} cannot be read ({_why(exc)})"
    if (not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT or "spec" not in m
            or not isinstance(m.get("files"), dict)):
        return None, f"{MANIFEST} is not a results manifest of format {MANIFEST_FORMAT}"
    if digest(m["spec"]) != folder.name:
        return None, f"the spec in {MANIFEST} hashes to {digest(m['spec'])}, not to the folder's name"
    for name, e in m["files"].items():
        p = folder / name
        if Path(name).name != name or name == MANIFEST or not isinstance(e, dict):
            return None, f"{MANIFEST} lists {name!r}, which is not a file of the unit"
        if not p.is_file():
            return None, f"{name} is missing"
        size = p.stat().st_size
        if size != e.get("size"):
            return None, f"{name} has {size} bytes, its manifest says {e.get('size')}"
        if _sha256(p) != e.get("sha256"):
            return None, f"{name} does not match its SHA-256 digest in the manifest"
    return m, None


def set_aside(folder: str | Path, root: str | Path, why: str, report: bool = True) -> Path | None:
    """Move a unit ``folder`` to ``<root>/_corrupt/<its path under root>-<time>`` (never deleted) and, with
    ``report``, say so in one line on stderr. Returns where it went (None when it was already gone)."""
    folder, root = Path(folder), Path(root)
    try:
        rel = folder.resolve().relative_to(root.resolve())
    except ValueError:
        rel = Path(folder.name)
    dest = root / ASIDE / rel.parent / f"{rel.name}-{_stamp()}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(folder, dest)
    except FileNotFoundError:
        return None
    if report:
        print(f"results cache: {folder}: {why}; moved aside to {dest}, recomputing", file=sys.stderr,
              flush=True)
    return dest


_LEGACY_NOTED: set[str] = set()


def _note_legacy(folder: Path, root: Path) -> None:
    """Say once per results folder that units without a manifest (an older cache) are recomputed."""
    key = str(root.resolve())
    if key in _LEGACY_NOTED:
        return
    if any(p.is_file() and not p.name.startswith(".") and p.name not in TRANSIENT
           for p in folder.iterdir()):
        _LEGACY_NOTED.add(key)
        print(f"results cache: {folder} has no {MANIFEST} (written by an older version, or never "
              f"finished): recomputed, like every such unit in {root}; `python -m pruning_lib.runs adopt "
              f"{root}` verifies and keeps them", file=sys.stderr, flush=True)


class _Lock:
    """An exclusive lock on one unit (a file beside its folder), held while a file and the manifest are
    written, so that two runs writing the same unit never leave a manifest that misdescribes it."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - not POSIX
            pass
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # closing releases the lock


class Store:
    """A folder of results for one unit of work, named by the hash of what produced it.

    ``Store(root, kind, spec)`` -> ``root/kind/<digest(spec)>/``. Every file saved through the store is
    written atomically and then recorded, with its size and SHA-256 digest, in the unit's
    ``manifest.json`` (rewritten atomically, last): the manifest is the commit mark. It also holds the
    spec (``spec.json`` beside it is a readable copy, itself checked). A file counts as finished
    (:meth:`exists`, and what the loaders read) only when the manifest lists it and every file of the
    unit matches the manifest; a unit that does not match is reported in one line, moved aside to
    ``root/_corrupt/`` and recomputed. A folder without a manifest (an older cache, see ``adopt``) is not
    finished. ``.pt`` files are read with ``weights_only=True``.
    """

    def __init__(self, root: str | Path, kind: str, spec: dict[str, Any]):
        self.root = Path(root)
        self.kind = kind
        self.spec = json.loads(canonical(spec))
        self.key = digest(self.spec)
        self.dir = self.root / kind / self.key
        self._files: dict[str, dict] | None = None

    def path(self, name: str) -> Path:
        return self.dir / name

    def exists(self, name: str) -> bool:
        """Whether ``name`` is a finished, verified file of this unit (a transient file such as
        ``checkpoint.pt``: whether it is there)."""
        if name in TRANSIENT:
            return self.path(name).exists()
        return name in self._committed()

    # --- the manifest ---------------------------------------------------------------------------
    def _committed(self) -> dict[str, dict]:
        if self._files is None:
            self._files = self._verify()
        return self._files

    def _verify(self) -> dict[str, dict]:
        if not (self.dir / MANIFEST).exists():
            if self.dir.is_dir():
                _note_legacy(self.dir, self.root)
            return {}
        m, problem = check_unit(self.dir)
        if problem is None:
            return dict(m["files"])
        with self._lock():
            m, problem = check_unit(self.dir)  # another run may have rewritten it meanwhile
            if problem is None:
                return dict(m["files"])
            set_aside(self.dir, self.root, problem)
        return {}

    def _set_aside(self, why: str) -> None:
        with self._lock():
            set_aside(self.dir, self.root, why)
        self._files = {}

    def _lock(self) -> _Lock:
        return _Lock(self.dir.parent / f".{self.key}.lock")

    def _recorded(self) -> dict[str, dict]:
        """The manifest's entries whose files are still there with their size (under the lock)."""
        try:
            m = json.loads((self.dir / MANIFEST).read_text())
            files = dict(m["files"]) if m.get("format") == MANIFEST_FORMAT else {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}
        return {n: e for n, e in files.items() if isinstance(e, dict) and (self.dir / n).is_file()
                and (self.dir / n).stat().st_size == e.get("size")}

    def _commit(self, name: str, write: Callable[[str], None]) -> Path:
        """Write file ``name`` atomically, then the manifest listing it (atomically, last)."""
        p = self.path(name)
        with self._lock():
            files = self._recorded()
            if "spec.json" not in files:
                _atomic(self.path("spec.json"),
                        lambda tmp: Path(tmp).write_text(json.dumps(self.spec, indent=1, sort_keys=True)))
                files["spec.json"] = _entry(self.path("spec.json"))
            _atomic(p, write)
            files[name] = _entry(p)
            manifest = {"format": MANIFEST_FORMAT, "kind": self.kind, "key": self.key, "spec": self.spec,
                        "files": dict(sorted(files.items()))}
            atomic_write_text(json.dumps(manifest, indent=1, sort_keys=True), self.dir / MANIFEST)
        self._files = files
        return p

    def _load(self, name: str, read: Callable[[Path], Any], compute: Callable[[], Any] | None):
        """``(True, value)`` from the verified file, else ``(False, None)`` when ``compute`` can make it.
        A listed file that cannot be read sets the unit aside."""
        p = self.path(name)
        if name in self._committed():
            try:
                return True, read(p)
            except Exception as exc:
                why = f"{name} cannot be read ({_why(exc)})"
                self._set_aside(why)
                if compute is None:
                    raise CacheError(f"{p}: {why}; the unit was moved aside to {self.root / ASIDE}: "
                                     f"rerun to recompute it") from exc
        if compute is None:
            raise FileNotFoundError(p)
        return False, None

    # --- the files ------------------------------------------------------------------------------
    def frame(self, name: str, compute: Callable[[], pd.DataFrame] | None = None) -> pd.DataFrame:
        """Load ``name.csv`` if it is finished, else ``compute()`` it, save it and return it."""
        done, df = self._load(f"{name}.csv", read_csv, compute)
        if done:
            return df
        df = compute()
        self.save_frame(name, df)
        return df

    def save_frame(self, name: str, df: pd.DataFrame) -> Path:
        return self._commit(f"{name}.csv", lambda tmp: df.to_csv(tmp, index=False))

    def torch(self, name: str, compute: Callable[[], Any] | None = None) -> Any:
        """Load ``name.pt`` (``weights_only``) if it is finished, else compute, save and return it."""
        done, obj = self._load(f"{name}.pt", safe_torch_load, compute)
        if done:
            return obj
        obj = compute()
        self.save_torch(name, obj)
        return obj

    def save_torch(self, name: str, obj: Any) -> Path:
        safe = to_safe(obj)
        return self._commit(f"{name}.pt", lambda tmp: torch.save(safe, tmp))

    def json(self, name: str, compute: Callable[[], Any] | None = None) -> Any:
        done, obj = self._load(f"{name}.json", lambda p: json.loads(p.read_text()), compute)
        if done:
            return obj
        obj = compute()
        text = json.dumps(obj, indent=1, default=float)
        self._commit(f"{name}.json", lambda tmp: Path(tmp).write_text(text))
        return obj


# --- adopting a cache written before manifests ----------------------------------------------------

_LEGACY_GLOBALS = {
    ("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"), ("torch", "device"), ("builtins", "set"), ("builtins", "frozenset"),
    ("builtins", "slice"), ("_codecs", "encode"), ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"),
    ("pandas.core.frame", "DataFrame"), ("pandas.core.series", "Series"), ("pandas", "DataFrame"),
    ("pandas", "Series"), ("pandas", "Index"), ("pandas", "RangeIndex"),
    ("pandas._libs.internals", "_unpickle_block"), ("pandas.core.internals.managers", "BlockManager"),
    ("pandas.core.internals.managers", "SingleBlockManager"), ("pandas.core.indexes.base", "_new_Index"),
    ("pandas.core.indexes.base", "Index"), ("pandas.core.indexes.range", "RangeIndex"),
    ("pandas", "StringDtype"), ("pandas.arrays", "StringArray"),
    ("pandas._libs.arrays", "__pyx_unpickle_NDArrayBacked"),
    ("pruning_lib.masks", "Mask"),
}


def _legacy_pickle_module():
    """A pickle module whose unpickler builds only the types this project ever saved (tensors, NumPy
    arrays, pandas frames, ``Mask``) and refuses any other global: how ``adopt`` reads .pt files written
    before they were saved in ``weights_only`` form (a ``Mask``, a dict subclass, cannot be read with
    ``weights_only=True`` at all). Nothing else uses it."""
    import pickle
    import types

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            import _compat_pickle

            module = _compat_pickle.IMPORT_MAPPING.get(module, module)  # protocol 2 names (__builtin__)
            allowed = ((module, name) in _LEGACY_GLOBALS
                       or (module == "numpy.dtypes" and name.endswith("DType"))
                       or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)))
            if not allowed:
                raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a results file")
            return super().find_class(module, name)

    mod = types.ModuleType("pruning_lib_restricted_pickle")
    mod.Unpickler = Unpickler
    mod.load = lambda f, **kw: Unpickler(f, **kw).load()
    mod.__version__ = "restricted"
    return mod


def _load_legacy_pt(path: Path) -> Any:
    """A .pt file of an older cache: with ``weights_only=True`` when it allows, else with the restricted
    unpickler of :func:`_legacy_pickle_module` (``adopt`` then rewrites it in the safe form)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True), False
    except Exception:
        pass
    return torch.load(path, map_location="cpu", weights_only=False,  # restricted: see above
                      pickle_module=_legacy_pickle_module()), True


def unit_folders(root: str | Path) -> list[Path]:
    """Every unit folder (``<kind>/<16 hex digits>/``) under ``root``, outside ``_corrupt/``."""
    root = Path(root)
    found = []
    for p in sorted(root.rglob(_UNIT_NAME)):
        rel = p.relative_to(root).parts
        if p.is_dir() and rel[0] != ASIDE and not any(part.startswith(".") for part in rel):
            found.append(p)
    return found


def adopt_unit(folder: str | Path, root: str | Path) -> tuple[str, str]:
    """Verify one unit folder and make it part of the verified cache. Returns ``(status, detail)``:

    * ``verified``: it has a manifest, and every file matches it;
    * ``adopted``: an older unit (no manifest) whose ``spec.json`` hashes to the folder's name, every
      ``.json`` parses, every ``.csv`` parses with pandas and every ``.pt`` loads (``weights_only``, or
      with the restricted unpickler, then rewritten in the safe form); its manifest is written;
    * ``unfinished``: nothing but a resumable checkpoint, left as it is;
    * ``moved``: it failed a check and was moved aside to ``<root>/_corrupt/``.
    """
    folder, root = Path(folder), Path(root)
    if (folder / MANIFEST).exists():
        m, problem = check_unit(folder)
        if problem is None:
            return "verified", f"{len(m['files'])} file(s)"
        return "moved", f"{problem} -> {set_aside(folder, root, problem, report=False)}"
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    kept = [p for p in files if p.name not in TRANSIENT]
    if not kept:
        return "unfinished", "no results yet" + (" (a resumable checkpoint)" if files else "")
    problem = None
    rewrite: dict[str, Any] = {}
    spec_file = folder / "spec.json"
    try:
        spec = json.loads(spec_file.read_text())
        if digest(spec) != folder.name:
            problem = f"spec.json hashes to {digest(spec)}, not to the folder's name"
    except FileNotFoundError:
        problem = "no spec.json"
    except (OSError, ValueError) as exc:
        problem = f"spec.json cannot be read ({_why(exc)})"
    for p in files if problem is None else ():
        try:
            if p.suffix == ".json":
                json.loads(p.read_text())
            elif p.suffix == ".csv":
                read_csv(p)
            elif p.suffix == ".pt":
                obj, legacy = _load_legacy_pt(p)
                if legacy and p.name not in TRANSIENT:
                    rewrite[p.name] = to_safe(obj)
                elif legacy:
                    problem = f"{p.name} is a checkpoint that weights_only loading cannot read"
        except Exception as exc:
            problem = f"{p.name} cannot be read ({_why(exc)})"
        if problem is not None:
            break
    if problem is not None:
        return "moved", f"{problem} -> {set_aside(folder, root, problem, report=False)}"
    for name, safe in rewrite.items():
        _atomic(folder / name, lambda tmp, safe=safe: torch.save(safe, tmp))
        from_safe(torch.load(folder / name, map_location="cpu", weights_only=True))  # it now loads safely
    entries = {p.name: _entry(p) for p in kept}
    manifest = {"format": MANIFEST_FORMAT, "kind": folder.parent.relative_to(root).as_posix(),
                "key": folder.name, "spec": spec, "files": entries, "adopted": True}
    atomic_write_text(json.dumps(manifest, indent=1, sort_keys=True), folder / MANIFEST)
    note = f", {len(rewrite)} .pt file(s) rewritten in weights_only form" if rewrite else ""
    return "adopted", f"{len(entries)} file(s){note}"


def adopt(root: str | Path, out=None) -> dict[str, int]:
    """``python -m pruning_lib.runs adopt results/``: verify every unit under ``root`` and write the
    manifest of each older one that passes (:func:`adopt_unit`); those that fail are moved aside and
    listed. Run it once, while nothing else writes to ``root``. Returns the count of each status."""
    out = out or sys.stdout
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no results folder {root}")
    counts = {"verified": 0, "adopted": 0, "unfinished": 0, "moved": 0}
    for folder in unit_folders(root):
        status, detail = adopt_unit(folder, root)
        counts[status] += 1
        if status != "verified":
            print(f"{status:10s} {folder}: {detail}", file=out)
    print(", ".join(f"{v} {k}" for k, v in counts.items()) + f" (under {root})", file=out)
    return counts


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m pruning_lib.runs",
                                 description="Maintain the results cache.")
    sub = ap.add_subparsers(dest="command", required=True)
    a = sub.add_parser("adopt", help="verify an older cache (no manifests) once and write its manifests; "
                                     "units that fail are moved aside to <root>/_corrupt/")
    a.add_argument("root", nargs="?", default="results")
    v = sub.add_parser("verify", help="check every unit against its manifest; move aside those that fail")
    v.add_argument("root", nargs="?", default="results")
    args = ap.parse_args(argv)
    try:
        if args.command == "adopt":
            counts = adopt(args.root)
        else:
            counts = {"verified": 0, "moved": 0, "no manifest": 0}
            for folder in unit_folders(args.root):
                if not (folder / MANIFEST).exists():
                    counts["no manifest"] += 1
                    continue
                status, detail = adopt_unit(folder, args.root)
                counts[status] += 1
                if status == "moved":
                    print(f"moved      {folder}: {detail}")
            print(", ".join(f"{v} {k}" for k, v in counts.items()) + f" (under {args.root})")
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1 if counts.get("moved") else 0


def cached_frame(root: str | Path, kind: str, spec: dict[str, Any],
                 compute: Callable[[], pd.DataFrame]) -> pd.DataFrame:
    """The one-liner form: ``Store(root, kind, spec).frame("result", compute)``."""
    return Store(root, kind, spec).frame("result", compute)


def _kernel_terminal():
    """In a Jupyter kernel, a text stream to the terminal that started it (the terminal running
    ``python -m pruning_lib.book run``); ``None`` outside a kernel.

    ipykernel sends ``sys.stderr``, and since 6.0 the file descriptor 2 itself, to the notebook, where
    every refresh of a bar would become an output of the page; it keeps a copy of the original
    descriptor (``_original_stdstream_copy``), which still leads to the terminal.
    """
    import sys

    err = sys.stderr
    if err is None or type(err).__module__.split(".")[0] != "ipykernel":
        return None
    fd = getattr(err, "_original_stdstream_copy", None)
    if fd is None:  # a kernel that does not capture descriptors: fd 2 is still the terminal
        fd = sys.__stderr__.fileno() if sys.__stderr__ is not None else None
    if fd is None:
        return open(os.devnull, "w")
    stream = _TERMINALS.get(fd)
    if stream is None:
        stream = _TERMINALS[fd] = os.fdopen(os.dup(fd), "w", buffering=1)
    return stream


_TERMINALS: dict[int, Any] = {}


def _finished_line(bar) -> str:
    """The one line a finished bar leaves on the page: what, how many, how long (no bar drawn)."""
    from tqdm import tqdm

    what = f"{bar.desc.rstrip(': ')}: " if bar.desc else ""
    count = f"{bar.n} of {bar.total}" if bar.total is not None else f"{bar.n}"
    unit = "" if bar.unit == "it" else f" {bar.unit}"
    return f"{what}{count}{unit} done in {tqdm.format_interval(bar.format_dict['elapsed'])}"


def progress_bar(iterable=None, *, progress: bool = True, **kwargs):
    """A plain-text ``tqdm`` bar, shown when ``progress`` is true.

    In a notebook kernel (a chapter run by Papermill) the bar is drawn on the terminal that runs the
    book, not in the notebook, whose page would show every refresh as an output of its own; when it
    closes, a bar that is left (``leave``, tqdm's default) prints one line on the page, e.g.
    ``dense baselines: 4 of 4 done in 00:12``. Elsewhere it is an ordinary tqdm bar.

    ``disable`` is passed only to switch a bar off: passing ``disable=False`` would override the
    ``TQDM_DISABLE=1`` environment variable that CI and ``make test`` use to keep bars out of outputs.
    """
    from tqdm import tqdm

    if not progress:
        kwargs["disable"] = True
    terminal = None if "file" in kwargs else _kernel_terminal()
    if terminal is None:
        return tqdm(iterable, **kwargs)
    bar = _PageBar(iterable, file=terminal, **kwargs)
    return bar


def _page_bar_class():
    from tqdm import tqdm

    class PageBar(tqdm):
        """A tqdm bar drawn on the kernel's terminal that leaves one plain line on the page."""

        def close(self):
            import sys

            report = not self.disable and self.leave and not getattr(self, "_page_reported", False)
            line = _finished_line(self) if report else None
            super().close()
            if line:
                self._page_reported = True
                print(line, file=sys.stdout, flush=True)

    return PageBar


def _PageBar(*args, **kwargs):
    global _PAGE_BAR
    if _PAGE_BAR is None:
        _PAGE_BAR = _page_bar_class()
    return _PAGE_BAR(*args, **kwargs)


_PAGE_BAR = None


# --- running units: here, in local processes, or on Dask workers ------------------------------------
#
# A chapter's sweep is a list of units, each idempotent by the hash of its spec (a Store folder). The
# chapter gives ``map_units`` a function ``fn(spec, results_dir)`` that computes one unit, writing its
# files through ``Store(results_dir, ...)``, and returns a small result. Serially, ``fn`` runs here on the
# real results folder. Elsewhere (a local process pool, Dask workers on this or other machines) it runs on
# a scratch results folder of its own, seeded with the finished units it reads (``inputs``); the worker
# returns the result and the finished units it wrote, and the process that called ``map_units`` writes
# them into its Store. A worker machine needs the code and the data, no shared disk.

EXECUTOR_ENV = "PRUNING_EXECUTOR"  # serial | process[:N] | dask-local[:N] | a Dask scheduler's address
RESOURCES_ENV = "PRUNING_RESOURCES"  # Dask worker resources each unit asks for, e.g. "GPU=1"
EXECUTOR_HELP = ("serial, process[:N] (a local process pool), dask-local[:N] (a Dask LocalCluster made on "
                 "the spot) or the address of a running Dask scheduler (tcp://host:8786)")


@dataclass(frozen=True)
class Executor:
    """Where :func:`map_units` runs units: ``kind`` is ``serial``, ``process`` or ``dask``; ``workers``
    the number of processes (a pool, or a LocalCluster made here); ``address`` a running Dask scheduler
    (None: a LocalCluster)."""

    kind: str
    workers: int = 1
    address: str | None = None

    def __str__(self):
        if self.kind == "dask":
            return self.address or f"dask-local:{self.workers}"
        return self.kind if self.kind == "serial" else f"{self.kind}:{self.workers}"


def parse_executor(text: str | None = None, workers: int = 1) -> Executor:
    """The executor ``text`` names; ``None`` reads ``$PRUNING_EXECUTOR``, and when that is unset or empty
    the default is what the chapters always did: a process pool of ``workers`` processes when ``workers``
    > 1, else serial. ``process`` and ``dask-local`` without ``:N`` take ``workers`` processes (the
    machine's cores when ``workers`` is 1). Raises :class:`ConfigError` naming what it cannot read."""
    source = "executor"
    if text is None:
        text, source = os.environ.get(EXECUTOR_ENV, ""), f"${EXECUTOR_ENV}"
    text = str(text).strip()
    if not text:
        return Executor("process", workers) if workers > 1 else Executor("serial")
    if "://" in text:
        address = text.removeprefix("dask://")
        if "://" not in address:
            address = "tcp://" + address
        return Executor("dask", workers, address)
    name, _, count = text.partition(":")
    name = {"local": "process", "processes": "process", "pool": "process", "dask": "dask-local",
            "local-dask": "dask-local"}.get(name, name)
    if name not in ("serial", "process", "dask-local"):
        raise ConfigError(f"{source} {text!r}: not an executor; give {EXECUTOR_HELP}")
    if name == "serial":
        if count:
            raise ConfigError(f"{source} {text!r}: serial takes no count")
        return Executor("serial")
    if count:
        if not count.isdigit() or not 1 <= int(count) <= 1024:
            raise ConfigError(f"{source} {text!r}: the count after ':' must be a whole number from 1")
        n = int(count)
    else:
        n = workers if workers > 1 else (os.cpu_count() or 1)
    return Executor("dask" if name == "dask-local" else "process", n)


def parse_resources(text: str | dict | None) -> dict[str, float]:
    """Dask worker resources a unit asks for: ``"GPU=1"`` or ``"GPU=1,MEMORY=8e9"`` or a dict; ``None``
    reads ``$PRUNING_RESOURCES`` (unset: none)."""
    if isinstance(text, dict):
        return {str(k): float(v) for k, v in text.items()}
    source = "resources" if text is not None else f"${RESOURCES_ENV}"
    text = os.environ.get(RESOURCES_ENV, "") if text is None else text
    out = {}
    for item in filter(None, (t.strip() for t in str(text).split(","))):
        name, eq, value = item.partition("=")
        try:
            amount = float(value)
        except ValueError:
            amount = float("nan")
        if not eq or not name.strip() or not math.isfinite(amount) or amount <= 0:
            raise ConfigError(f"{source} {text!r}: give NAME=AMOUNT pairs separated by commas (GPU=1)")
        out[name.strip()] = amount
    return out


def check_executor(text: str | None = None, resources: str | None = None) -> Executor:
    """:func:`parse_executor` and :func:`parse_resources` (None: the environment variables), and for Dask
    that ``distributed`` is installed; raises ConfigError naming what is wrong."""
    ex = parse_executor(text)
    parse_resources(resources)
    if ex.kind == "dask":
        try:
            import distributed  # noqa: F401
        except ImportError:
            raise ConfigError(f"executor {str(ex)!r} needs Dask: pip install -e \".[dask]\"") from None
    return ex


class UnitError(RuntimeError):
    """A unit failed. ``key`` and ``spec`` name it, ``where`` says where it ran, ``remote_traceback`` is
    the traceback where it ran; the finished units (this one's finished parts included) were stored."""

    def __init__(self, message: str, key: str, spec: Any, where: str, remote_traceback: str):
        super().__init__(message)
        self.key, self.spec, self.where, self.remote_traceback = key, spec, where, remote_traceback


_UNIT_LOCK = None


def in_worker() -> bool:
    """True inside ``fn`` when :func:`map_units` runs it on a worker (a pool process or a Dask worker),
    False when it runs serially in the calling process (e.g. to set one thread per worker process)."""
    return bool(_WORKER_FLAG[0])


_WORKER_FLAG = [False]


def _pack_unit(folder: Path) -> dict[str, Any] | None:
    """A finished unit folder as plain data (its manifest's kind, key, spec and every file's bytes), or
    None when it has no whole manifest."""
    m, problem = check_unit(folder)
    if problem is not None:
        return None
    files = {name: (folder / name).read_bytes() for name in m["files"]}
    return {"kind": m["kind"], "key": m["key"], "spec": m["spec"], "entries": m["files"], "files": files}


def _unpack_unit(root: Path, unit: dict[str, Any]) -> None:
    """Write a packed unit under ``root`` exactly as it was (a worker's scratch folder)."""
    folder = root / unit["kind"] / unit["key"]
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in unit["files"].items():
        (folder / name).write_bytes(data)
    manifest = {"format": MANIFEST_FORMAT, "kind": unit["kind"], "key": unit["key"], "spec": unit["spec"],
                "files": unit["entries"]}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def install_unit(root: str | Path, unit: dict[str, Any]) -> tuple[Path, int]:
    """Write a unit a worker returned into the Store under ``root``: every file the unit there does not
    have yet (checked against the size and SHA-256 digest the worker's manifest gives), then the manifest
    listing them, under the unit's lock. A file the unit already has is kept, so a duplicated or retried
    unit changes nothing. Returns ``(folder, files written)``."""
    store = Store(root, unit["kind"], unit["spec"])
    if store.key != unit["key"]:
        raise CacheError(f"a worker returned unit {unit['kind']}/{unit['key']} whose spec hashes to "
                         f"{store.key}")
    written = 0
    with store._lock():
        have: dict[str, dict] = {}
        if (store.dir / MANIFEST).exists():
            m, problem = check_unit(store.dir)
            if problem is None:
                have = dict(m["files"])
            else:
                set_aside(store.dir, store.root, problem)
        for name, data in unit["files"].items():
            if name in have:
                continue
            entry = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            if entry != unit["entries"].get(name):
                raise CacheError(f"{unit['kind']}/{unit['key']}/{name} came back from the worker "
                                 f"changed (its digest does not match the worker's manifest)")
            _atomic(store.path(name), lambda tmp, data=data: Path(tmp).write_bytes(data))
            have[name] = entry
            written += 1
        if written:
            manifest = {"format": MANIFEST_FORMAT, "kind": store.kind, "key": store.key, "spec": store.spec,
                        "files": dict(sorted(have.items()))}
            atomic_write_text(json.dumps(manifest, indent=1, sort_keys=True), store.dir / MANIFEST)
    return store.dir, written


def _run_on_worker(fn: Callable[[Any, str], Any], spec: Any, inputs: list[dict[str, Any]]) -> dict:
    """A unit on a worker: ``fn(spec, scratch)`` in a scratch results folder seeded with ``inputs``.
    Returns the result (or the error, with its traceback) and every finished unit the scratch folder
    gained, also when ``fn`` failed part-way. One unit at a time per process: a unit's code may set
    process-wide state (torch threads, a results root). The unit starts with one torch thread (the workers
    share the machine's cores; a unit may set its own count) and the count is restored after it."""
    import platform
    import threading
    import traceback

    global _UNIT_LOCK
    if _UNIT_LOCK is None:
        _UNIT_LOCK = threading.Lock()
    with _UNIT_LOCK, tempfile.TemporaryDirectory(prefix="pruning-unit-") as scratch:
        root = Path(scratch)
        for unit in inputs:
            _unpack_unit(root, unit)
        seeded = {(u["kind"], u["key"]): u["entries"] for u in inputs}
        result, error = None, None
        _WORKER_FLAG[0] = True
        t0 = time.perf_counter()
        try:
            with torch_threads(1):
                result = fn(spec, scratch)
        except Exception as exc:
            error = {"type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()}
        finally:
            _WORKER_FLAG[0] = False
        seconds = time.perf_counter() - t0
        units = []
        for folder in unit_folders(root):
            packed = _pack_unit(folder)
            if packed is not None and seeded.get((packed["kind"], packed["key"])) != packed["entries"]:
                units.append(packed)
    return {"result": result, "error": error, "units": units, "seconds": seconds,
            "where": f"{platform.node()} (pid {os.getpid()})"}


def _call_bytes(payload: bytes) -> dict:
    """Process-pool entry for a function and spec sent with cloudpickle (closures, lambdas)."""
    import cloudpickle

    fn, spec, inputs = cloudpickle.loads(payload)
    return _run_on_worker(fn, spec, inputs)


_DASK_CLIENTS: dict[str, Any] = {}


def _dask_client(ex: Executor, resources: dict[str, float]):
    """The Dask client for ``ex``, made once per process: a LocalCluster of ``ex.workers`` processes with
    one thread each (with ``resources`` on each worker), or a client of a running scheduler."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise ConfigError(f"executor {str(ex)!r} needs Dask: pip install -e \".[dask]\"") from None
    import logging

    name = f"{ex}|{sorted(resources.items())}" if ex.address is None else ex.address
    client = _DASK_CLIENTS.get(name)
    if client is not None and client.status == "running":
        return client
    _register_close()
    if ex.address is None:
        cluster = LocalCluster(n_workers=ex.workers, threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=logging.ERROR,
                               resources=resources or None)
        client = Client(cluster)
    else:
        client = Client(ex.address, timeout="30s")
    _DASK_CLIENTS[name] = client
    return client


_CLOSE_REGISTERED = [False]


def _register_close() -> None:
    if not _CLOSE_REGISTERED[0]:
        import atexit

        atexit.register(close_executors)
        _CLOSE_REGISTERED[0] = True


def close_executors() -> None:
    """Shut down the process pools and close the Dask clients (and LocalClusters) :func:`map_units` made
    in this process and kept for its next call."""
    for n, pool in list(_POOLS.items()):
        pool.shutdown(wait=True, cancel_futures=True)
        _POOLS.pop(n, None)
    for name, client in list(_DASK_CLIENTS.items()):
        cluster = getattr(client, "cluster", None)
        try:
            client.close()
            if cluster is not None:
                cluster.close()
        except Exception:  # pragma: no cover - shutting down
            pass
        _DASK_CLIENTS.pop(name, None)


_POOLS: dict[int, Any] = {}


def _pool_worker_init() -> None:
    """In a pool process: an interrupt (SIGINT) stops a running unit as usual, but a process waiting for
    its next unit leaves quietly. A notebook kernel's shutdown interrupts its whole process group, and the
    idle processes of a pool kept for the next call would otherwise each print a KeyboardInterrupt
    traceback from the pool's queue into the book run's log."""
    import signal

    def on_interrupt(signum, frame):
        if _WORKER_FLAG[0]:
            raise KeyboardInterrupt
        os._exit(0)

    signal.signal(signal.SIGINT, on_interrupt)


@contextlib.contextmanager
def _spawned_children_ignore_sigint():
    """While a pool may spawn its processes: SIGINT ignored in this process, so the children start with it
    ignored (an ignored signal stays ignored across exec, and Python then installs no KeyboardInterrupt
    handler) until :func:`_pool_worker_init` installs theirs. Without it a kernel's shutdown that reaches a
    process still importing torch printed a KeyboardInterrupt traceback. The window is the submit call
    (milliseconds); outside the main thread, where signals cannot be set, nothing changes."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield  # not settable here, or a handler installed outside Python that could not be put back
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class _Pool:
    """A local process pool (spawned: safe from a notebook kernel), one unit per process at a time. The
    pool is kept for the next call in this process (a chapter's sweep in phases starts its processes
    once); :func:`close_executors` shuts it down, and a pool that broke is never reused."""

    def __init__(self, ex: Executor, n_units: int):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        self.n = ex.workers
        pool = _POOLS.get(self.n)
        if pool is None or getattr(pool, "_broken", False) or getattr(pool, "_shutdown_thread", False):
            _register_close()
            pool = _POOLS[self.n] = ProcessPoolExecutor(self.n, mp_context=mp.get_context("spawn"),
                                                        initializer=_pool_worker_init)
        self.pool = pool

    def slots(self) -> int:
        return self.n

    def submit(self, fn, spec, inputs, key, resources):
        import pickle

        try:
            pickle.dumps((fn, spec))
        except Exception:  # a lambda or closure: send it with cloudpickle (installed with Dask)
            import cloudpickle

            payload = (_call_bytes, cloudpickle.dumps((fn, spec, inputs)))
        else:
            payload = (_run_on_worker, fn, spec, inputs)
        with _spawned_children_ignore_sigint():  # submit spawns the pool's processes as it needs them
            return self.pool.submit(*payload)

    def wait(self, futures):
        from concurrent.futures import FIRST_COMPLETED, wait

        return wait(futures, return_when=FIRST_COMPLETED)[0]

    def cancel(self, futures):
        for f in futures:
            f.cancel()

    def close(self, cancel: bool = False):
        if cancel or getattr(self.pool, "_broken", False):  # interrupted, or a worker died: start afresh
            _POOLS.pop(self.n, None)
            self.pool.shutdown(wait=True, cancel_futures=True)


class _Dask:
    """A Dask client: each unit a task (asking for ``resources``) that carries its inputs."""

    def __init__(self, ex: Executor, client, resources: dict[str, float]):
        self.client = client if client is not None else _dask_client(ex, resources)
        self.token = os.urandom(4).hex()
        try:
            self.client.wait_for_workers(1, timeout=120)
        except Exception:
            raise ConfigError(f"the Dask cluster at {self.client.scheduler.address} has no worker after "
                              f"2 minutes: start one with `dask worker ADDRESS --nthreads 1`") from None
        workers = self._workers()
        if resources and not any(all(w.get("resources", {}).get(r, 0) >= a for r, a in resources.items())
                                 for w in workers):
            raise ConfigError(f"no worker of the Dask cluster at {self.client.scheduler.address} has the "
                              f"resources each unit asks for ({resources}): start workers with "
                              f"`dask worker ADDRESS --nthreads 1 --resources "
                              f"{','.join(f'{k}={v:g}' for k, v in resources.items())}`")

    def _workers(self):
        return list(self.client.scheduler_info().get("workers", {}).values())

    def slots(self) -> int:
        return max(1, sum(int(w.get("nthreads", 1)) for w in self._workers()))

    def submit(self, fn, spec, inputs, key, resources):
        import warnings

        # The inputs travel inside the task, not scattered ahead: scattered data ties a task to the
        # worker holding it, and units pile up there while other workers idle. Only a few units are in
        # flight at once, so the scheduler never holds many; its warning about large tasks would print
        # into the notebook, which then may not be published.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sending large graph")
            return self.client.submit(_run_on_worker, fn, spec, inputs, key=f"unit-{key}-{self.token}",
                                      resources=resources or None, pure=False)

    def wait(self, futures):
        from distributed import wait

        return wait(list(futures), return_when="FIRST_COMPLETED").done

    def cancel(self, futures):
        if futures:
            self.client.cancel(list(futures))

    def close(self, cancel: bool = False):
        pass  # the client is kept for the next call (close_executors closes it)


def unit_key(spec: Any) -> str:
    """A unit's identity when the caller gives none: the hash of its spec (dataclasses by their fields)."""
    def plain(obj):
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return {"__type__": type(obj).__name__, **{f.name: plain(getattr(obj, f.name))
                                                       for f in dataclasses.fields(obj)}}
        if isinstance(obj, (list, tuple)):
            return [plain(v) for v in obj]
        if isinstance(obj, dict):
            return {str(k): plain(v) for k, v in obj.items()}
        return obj
    return digest(plain(spec))


def map_units(fn: Callable[[Any, str], Any], specs: typing.Iterable[Any], *,
              results_dir: str | Path = "results", executor: "str | Executor | Any | None" = None,
              workers: int = 1,
              done: Callable[[Any], bool] | None = None,
              inputs: Callable[[Any], typing.Iterable["Store"]] | None = None,
              key: Callable[[Any], str] | None = None, resources: str | dict | None = None,
              desc: str = "units", progress: bool = True, bar=None) -> list[Any]:
    """``[fn(spec, results_dir) for spec in specs]``, run serially, in local processes or on Dask workers.

    ``fn(spec, results_dir)`` computes one unit (writing its files through ``Store(results_dir, ...)``,
    so a unit already finished is loaded, not recomputed) and returns a small picklable result; ``fn``
    and each spec must pickle (module-level functions; cloudpickle carries closures where Dask is used).

    ``executor``: see :func:`parse_executor` (``None``: ``$PRUNING_EXECUTOR``, else a pool of
    ``workers`` processes when ``workers`` > 1, else serial), an :class:`Executor`, or a
    ``distributed.Client``. Serially ``fn`` runs here on ``results_dir``. Otherwise it runs on a worker,
    on a scratch results folder seeded with the finished units ``inputs(spec)`` names (the Stores it
    reads: a dense network, the rounds a chain resumes from); the worker returns its result and the
    units it finished, which are written here (:func:`install_unit`), so workers need no shared disk.
    Units for which ``done(spec)`` is true run here (they only load), and so does the one unit left to
    compute when a process pool would get only one. Specs with the same ``key`` (default
    :func:`unit_key`) run once. ``resources`` (``{"GPU": 1}``, ``"GPU=1"``; ``None`` reads
    ``$PRUNING_RESOURCES``): what each unit asks of a Dask worker (worker resources).

    Results come back in the order of ``specs``; the bar advances as units finish (``bar``: an open
    progress bar to advance instead of a new one, left open, for a sweep in several calls). When a unit
    fails, no more are started, those running finish, every finished unit (the failed unit's finished
    parts too) is stored, and :class:`UnitError` is raised naming the unit, where it ran, and its
    traceback. A unit run in this process (serially, or one that only loads) raises its own exception,
    with a note naming the unit.
    """
    from collections import Counter

    specs = list(specs)
    keys = [(key or unit_key)(s) for s in specs]
    copies = Counter(keys)
    client = None
    if isinstance(executor, Executor):
        ex = executor
    elif executor is not None and not isinstance(executor, str):  # a distributed.Client
        client, ex = executor, Executor("dask", workers, getattr(executor.scheduler, "address", "client"))
    else:
        ex = parse_executor(executor, workers)
    res = parse_resources(resources) if ex.kind == "dask" else {}
    results: list[Any] = [None] * len(specs)
    first: dict[str, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    own = bar is None
    bar = progress_bar(total=len(specs), desc=desc, progress=progress) if own else bar
    try:
        todo = [i for i in range(len(specs)) if first[keys[i]] == i]
        remote = [] if ex.kind == "serial" else [i for i in todo if done is None or not done(specs[i])]
        if ex.kind == "process" and len(remote) < 2:  # a pool for one unit only costs a spawn: run it here
            remote = []
        for i in sorted(set(todo) - set(remote)):
            try:
                results[i] = fn(specs[i], str(results_dir))
            except Exception as exc:  # here the caller sees its own exception (a missing dataset stays
                # a DatasetNotFoundError), with a note naming the unit
                exc.add_note(f"in unit {keys[i]} ({_describe(specs[i])}), run in this process; the units "
                             f"finished before it are stored in {results_dir}/ (rerun to resume)")
                raise
            bar.update(copies[keys[i]])
        if remote:
            _run_remote(fn, specs, keys, remote, results, ex, client, res, inputs, results_dir, bar, copies)
    finally:
        if own:
            bar.close()
    for i, k in enumerate(keys):
        results[i] = results[first[k]]
    return results


def _unit_error(specs, keys, failures, stored, results_dir) -> UnitError:
    """One error for the failed units (the first named, with its traceback)."""
    i, where, kind, message, tb = failures[0]
    more = f" ({len(failures) - 1} other unit(s) failed too)" if len(failures) > 1 else ""
    kept = ("the units finished before it are" if stored is None
            else f"{stored} finished unit(s) of this run were")
    return UnitError(f"unit {keys[i]} ({_describe(specs[i])}) failed on {where}: {kind}: {message}{more}; "
                     f"{kept} stored in {results_dir}/ (rerun to resume)\n"
                     f"--- traceback on {where} ---\n{tb}", keys[i], specs[i], where, tb)


def _describe(spec: Any, limit: int = 200) -> str:
    """A unit's spec in one short line: a config (a dataclass) by its class name, the rest by repr."""
    def short(x):
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return f"{type(x).__name__}(...)"
        if isinstance(x, (list, tuple)):
            return "(" + ", ".join(short(v) for v in x) + ("," if len(x) == 1 else "") + ")"
        return repr(x)
    text = short(spec)
    return text if len(text) <= limit else text[:limit] + "..."


def _run_remote(fn, specs, keys, todo, results, ex, client, resources, inputs, results_dir, bar, copies):
    """The units ``todo`` on the pool or the Dask cluster, a few per worker in flight (each one's inputs
    are packed when it is sent); the units a worker finished are installed as soon as it returns. After
    a failure nothing more is sent; the units in flight finish and are stored, then the error is raised."""
    from collections import deque

    backend = _Pool(ex, len(todo)) if ex.kind == "process" else _Dask(ex, client, resources)
    pending, running = deque(todo), {}
    failures: list[tuple] = []
    stored = 0
    try:
        while running or (pending and not failures):
            while pending and not failures and len(running) < max(2 * backend.slots(), 2):
                i = pending.popleft()
                packed = []
                for store in (inputs(specs[i]) if inputs is not None else ()):
                    unit = _pack_unit(store.dir) if (store.dir / MANIFEST).exists() else None
                    if unit is not None:
                        packed.append(unit)
                running[backend.submit(fn, specs[i], packed, keys[i], resources)] = i
            for fut in backend.wait(running):
                i = running.pop(fut)
                try:
                    out = fut.result()
                except Exception as exc:  # the worker died, the pool broke, the task was lost
                    import traceback

                    failures.append((i, str(ex), type(exc).__name__, str(exc),
                                     "".join(traceback.format_exception(exc))))
                    continue
                for unit in out["units"]:
                    install_unit(results_dir, unit)
                    stored += 1
                if out["error"] is not None:
                    e = out["error"]
                    failures.append((i, out["where"], e["type"], e["message"], e["traceback"]))
                    continue
                results[i] = out["result"]
                bar.update(copies[keys[i]])
    except BaseException:
        backend.cancel(list(running))
        backend.close(cancel=True)
        raise
    backend.close()
    if failures:
        raise _unit_error(specs, keys, failures, stored, results_dir)


if __name__ == "__main__":
    sys.exit(main())
