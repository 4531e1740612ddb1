"""The pinned environment: pyproject.toml and environment.yml list the same packages at the same
versions, and the environment running the tests is that environment."""
from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;]+)\s*$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(requirements) -> dict[str, str]:
    pins = {}
    for req in requirements:
        m = PIN.match(req)
        assert m, f"not an exact pin (name==version): {req!r}"
        name = _norm(m.group(1))
        assert name not in pins, f"{name} is listed twice"
        pins[name] = m.group(2)
    return pins


def pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return _pins(reqs)


def environment_pins() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1, "environment.yml needs exactly one pip: section"
    # the local package itself ("-e .") is not a pin
    return _pins([r for r in pip_sections[0] if not r.strip().startswith("-e")])


def test_every_pyproject_requirement_is_an_exact_pin():
    assert pyproject_pins()


def test_pyproject_and_environment_yml_agree():
    py, env = pyproject_pins(), environment_pins()
    assert sorted(py) == sorted(env), (
        f"only in pyproject.toml: {sorted(set(py) - set(env))}; "
        f"only in environment.yml: {sorted(set(env) - set(py))}")
    differ = {n: (py[n], env[n]) for n in py if py[n] != env[n]}
    assert not differ, f"versions differ (pyproject, environment.yml): {differ}"


def test_environment_yml_python_is_311():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pythons = [d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python")]
    assert pythons == ["python=3.11"]


def test_running_python_is_311():
    assert sys.version_info[:2] == (3, 11)


@pytest.mark.parametrize("name,version", sorted(pyproject_pins().items()))
def test_installed_version_matches_pin(name, version):
    try:
        installed = metadata.version(name)
    except metadata.PackageNotFoundError:
        pytest.fail(f"{name} is pinned but not installed (run `make test`, which installs the pins)")
    # a local version label (torch's "+cu130", "+cpu") is a build variant of the same release
    assert installed.split("+")[0] == version, f"{name}: installed {installed}, pinned {version}"
