"""requirements.lock: the exact versions of every package the full environment installs.

The lock is the closure of ``pyproject.toml``'s dependencies and all its extras over the
installed packages' own requirements (markers evaluated for this platform), each pinned at its
installed version. ``make env`` and ``environment.yml`` install from it. After changing a range
or upgrading a package in the environment, rewrite it with::

    .venv/bin/python tests/lockfile.py        # writes requirements.lock

``tests/test_environment.py`` checks that the lock is this closure of the running environment.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
HEADER = """\
# Exact versions of the full environment (Python 3.11, Linux x86-64): the closure of pyproject.toml's
# dependencies and all its extras. `make env` and environment.yml install from this file.
# Regenerate with `.venv/bin/python tests/lockfile.py` (see that file); do not edit by hand.
"""


def project_requirements() -> list[Requirement]:
    """pyproject.toml's dependencies and every extra (self-references to anchorformer left out)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for group in project["optional-dependencies"].values():
        reqs += group
    return [r for r in map(Requirement, reqs) if canonicalize_name(r.name) != "anchorformer"]


def _applies(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": e}) for e in ({""} | extras))


def closure(reqs: list[Requirement]) -> dict[str, tuple[str, str]]:
    """Installed packages needed by ``reqs``: canonical name -> (distribution name, version).

    Raises:
        metadata.PackageNotFoundError: a required package is not installed.
    """
    found: dict[str, tuple[str, str]] = {}
    done: set[tuple[str, str]] = set()
    todo = [(r, set()) for r in reqs if _applies(r, set())]
    while todo:
        req, _ = todo.pop()
        name = canonicalize_name(req.name)
        extras = {e for e in req.extras}
        if (name, "") in done and all((name, e) in done for e in extras):
            continue
        dist = metadata.distribution(req.name)
        found[name] = (dist.metadata["Name"], dist.version)
        new = ({""} | extras) - {e for n, e in done if n == name}
        done |= {(name, e) for e in new}
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in new):
                todo.append((sub, set()))
    return found


def render(pins: dict[str, tuple[str, str]]) -> str:
    return HEADER + "".join(f"{dist}=={version}\n" for _, (dist, version) in sorted(pins.items()))


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """canonical name -> version, from the lock's ``name==version`` lines."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        if not sep or not version or any(c in version for c in "<>=!~;, "):
            raise ValueError(f"{path}: not an exact pin: {line!r}")
        pins[canonicalize_name(name)] = version
    return pins


if __name__ == "__main__":
    LOCK.write_text(render(closure(project_requirements())))
    print(f"wrote {LOCK} ({len(read_lock())} packages)", file=sys.stderr)
