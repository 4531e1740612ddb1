"""Typed run configurations, canonical hashes, and a results store that reuses finished work.

Every chapter describes its settings as a frozen dataclass derived from :class:`RunConfig`. Each field is
declared with :func:`param`, which records its allowed values; a class-level ``PROFILES`` dict gives the
values of the ``smoke``, ``cpu`` and ``paper`` profiles. A notebook builds its config with
:meth:`RunConfig.from_namespace`, which rejects unknown parameters and invalid values with an error that
names them.

Results (as in open_lth) live in a folder named by a hash of the canonical JSON of what produced them, so
a rerun with the same settings finds and loads them, and a run stopped half-way resumes from the units it
had finished. Every write is atomic (write to a temporary file in the same folder, then ``os.replace``),
so an interrupted run never leaves a half-written file that a later run would trust.
"""
from __future__ import annotations

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

def _atomic(path: Path, write: Callable[[str], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
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


# --- the results store ----------------------------------------------------------------------------

class Store:
    """A folder of results for one unit of work, named by the hash of what produced it.

    ``Store(root, kind, spec)`` -> ``root/kind/<digest(spec)>/`` with ``spec.json`` beside the results.
    """

    def __init__(self, root: str | Path, kind: str, spec: dict[str, Any]):
        self.spec = json.loads(canonical(spec))
        self.key = digest(self.spec)
        self.dir = Path(root) / kind / self.key
        self._spec_written = False

    def path(self, name: str) -> Path:
        return self.dir / name

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def _write_spec(self):
        if not self._spec_written:
            p = self.path("spec.json")
            if not p.exists():
                atomic_write_text(json.dumps(self.spec, indent=1, sort_keys=True), p)
            self._spec_written = True

    def frame(self, name: str, compute: Callable[[], pd.DataFrame] | None = None) -> pd.DataFrame:
        """Load ``name.csv`` if it exists, else ``compute()`` it, save atomically and return it."""
        p = self.path(f"{name}.csv")
        if p.exists():
            return pd.read_csv(p)
        if compute is None:
            raise FileNotFoundError(p)
        df = compute()
        self._write_spec()
        atomic_write_frame(df, p)
        return df

    def save_frame(self, name: str, df: pd.DataFrame) -> Path:
        self._write_spec()
        return atomic_write_frame(df, self.path(f"{name}.csv"))

    def torch(self, name: str, compute: Callable[[], Any] | None = None) -> Any:
        """Load ``name.pt`` if it exists, else compute, save atomically and return it."""
        p = self.path(f"{name}.pt")
        if p.exists():
            return torch.load(p, map_location="cpu", weights_only=False)
        if compute is None:
            raise FileNotFoundError(p)
        obj = compute()
        self._write_spec()
        atomic_torch_save(obj, p)
        return obj

    def save_torch(self, name: str, obj: Any) -> Path:
        self._write_spec()
        return atomic_torch_save(obj, self.path(f"{name}.pt"))

    def json(self, name: str, compute: Callable[[], Any] | None = None) -> Any:
        p = self.path(f"{name}.json")
        if p.exists():
            return json.loads(p.read_text())
        if compute is None:
            raise FileNotFoundError(p)
        obj = compute()
        self._write_spec()
        atomic_write_text(json.dumps(obj, indent=1, default=float), p)
        return obj


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
