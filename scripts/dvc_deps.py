"""Derive the package dependencies of each DVC stage from the imports of the notebooks it runs.

A stage of ``dvc.yaml`` runs notebooks through papermill (``scripts/run_stage.py NOTEBOOK ...``
or ``papermill NOTEBOOK ...``). It depends on every package module
those notebooks import, transitively: ``import anchorformer.x``, ``from anchorformer.x import y``
(``y`` a submodule or a name), relative imports inside the package, imports inside functions,
``importlib.import_module("anchorformer.x")`` and ``python -m anchorformer.x`` command lines; the
``__init__.py`` of every package on the way counts. A non-Python file of the package, such as
``anchorformer/configs/cls.yaml``, counts when a module of the closure names its folder
(``"configs"``) and a module of the closure passes its name or stem (``"cls"``) to a call,
as in ``load_profile("cls", profile)``. A stage run by ``scripts/run_stage.py`` also depends on
``anchorformer/engine/numerics.py``, which the runner reads to set its kernel's numeric path.

Usage (from anywhere in the repository)::

    python scripts/dvc_deps.py --check   # exit 1 and print each stage's missing and extra deps
    python scripts/dvc_deps.py --write   # rewrite the deps: lists of dvc.yaml in place

The derived entries (the notebooks and the package files) come first in each ``deps:`` list,
sorted, a folder standing for its files only when every file in it is needed; other entries
(outputs of earlier stages, ``${...}`` paths) follow unchanged. Nothing else in ``dvc.yaml``
changes: the list items are replaced line by line, so comments and layout stay.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "anchorformer"
RUNNER_MODULES = ("engine.numerics",)  # what scripts/run_stage.py reads for every stage
SKIP_DIRS = {"__pycache__"}
SKIP_SUFFIXES = {".pyc", ".pyo"}


# ---------------------------------------------------------------------------------------------
# The package: modules, data files, what each module refers to
# ---------------------------------------------------------------------------------------------


def _package_files(root: Path, package: str) -> list[Path]:
    """Every file of the package, as DVC hashes a folder of it (no ``__pycache__``), relative to ``root``."""
    base = root / package
    if not (base / "__init__.py").is_file():
        raise FileNotFoundError(f"{base}/__init__.py: expected the package {package!r} under {root}")
    return sorted(
        p.relative_to(root)
        for p in base.rglob("*")
        if p.is_file() and not SKIP_DIRS & set(p.relative_to(root).parts) and p.suffix not in SKIP_SUFFIXES
    )


def _module_name(rel: Path) -> str:
    parts = rel.with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@dataclass
class Refs:
    """What one piece of code refers to."""

    modules: set[str] = field(default_factory=set)  # dotted names, maybe attributes (from x import name)
    calls: set[tuple[str, str]] = field(default_factory=set)  # (function name, string constant passed to it)
    strings: set[str] = field(default_factory=set)  # every string constant
    defs: set[str] = field(default_factory=set)  # the functions defined

    def update(self, other: Refs) -> None:
        self.modules |= other.modules
        self.calls |= other.calls
        self.strings |= other.strings
        self.defs |= other.defs


def _refs(tree: ast.AST, module: str | None = None, is_package: bool = False) -> Refs:
    """Imports and string constants of ``tree``; ``module`` resolves relative imports."""
    refs = Refs()
    # module-level string constants (TASK = "cls"), so that load_profile(TASK, ...) names "cls"
    consts = {
        t.id: node.value.value
        for node in getattr(tree, "body", [])
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
        for t in node.targets
        if isinstance(t, ast.Name)
    }

    def string(node: ast.AST) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        return consts.get(node.id) if isinstance(node, ast.Name) else None

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            refs.modules.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if module is None:
                    continue  # a relative import outside the package (a notebook) refers to nothing here
                parts = module.split(".") if is_package else module.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, node.module] if node.module else parts)
            else:
                base = node.module or ""
            refs.modules.add(base)
            refs.modules.update(f"{base}.{a.name}" for a in node.names if a.name != "*")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            refs.strings.add(node.value)
        elif isinstance(node, ast.Call):
            args = [*node.args, *(k.value for k in node.keywords)]
            strings = [v for v in map(string, args) if v is not None]
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            refs.calls.update((name, s) for s in strings)
            if name == "import_module" and strings:
                refs.modules.add(strings[0])
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            refs.defs.add(node.name)
        elif isinstance(node, ast.ClassDef):
            # a recipe class (task = "det"): the engine reads its preset with load_preset(cls.task, ...)
            for item in node.body:
                target = item.target if isinstance(item, ast.AnnAssign) else None
                if isinstance(item, ast.Assign) and len(item.targets) == 1:
                    target = item.targets[0]
                value = string(item.value) if isinstance(item, (ast.Assign, ast.AnnAssign)) and item.value else None
                if isinstance(target, ast.Name) and target.id == "task" and value:
                    refs.calls.add(("load_preset", value))
        if isinstance(node, (ast.List, ast.Tuple)):  # [..., "-m", "anchorformer.cli", ...]: a module run
            items = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
            refs.modules.update(b for a, b in zip(items, items[1:]) if a == "-m" and isinstance(b, str))
    return refs


class Package:
    """The modules and data files of a package and the references between them."""

    def __init__(self, root: Path = ROOT, package: str = PACKAGE) -> None:
        self.root, self.package = root, package
        self.files = _package_files(root, package)
        self.modules = {_module_name(f): f for f in self.files if f.suffix == ".py"}
        self.data_files = [f for f in self.files if f.suffix != ".py"]
        self._refs: dict[str, Refs] = {}

    def refs(self, module: str) -> Refs:
        if module not in self._refs:
            path = self.modules[module]
            try:
                tree = ast.parse((self.root / path).read_text(encoding="utf-8"), filename=str(path))
            except SyntaxError as e:
                raise SyntaxError(f"{path}: {e}") from e
            self._refs[module] = _refs(tree, module, path.name == "__init__.py")
        return self._refs[module]

    def resolve(self, name: str) -> set[str]:
        """The package modules that importing ``name`` runs: the module and its parent packages."""
        parts = name.split(".")
        found = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        return {m for m in found if m in self.modules}

    def closure(self, refs: Refs) -> tuple[set[str], Refs]:
        """Every module reached from ``refs``, and the union of their references (``refs`` included)."""
        seen: set[str] = set()
        todo = [m for name in refs.modules for m in self.resolve(name)]
        total = Refs()
        total.update(refs)
        while todo:
            module = todo.pop()
            if module in seen:
                continue
            seen.add(module)
            r = self.refs(module)
            total.update(r)
            todo.extend(m for name in r.modules for m in self.resolve(name) if m not in seen)
        return seen, total

    def data_files_read(self, modules: set[str], refs: Refs) -> set[Path]:
        """The package's data files that ``modules`` read, ``refs`` being all their references.

        A file ``configs/cls.yaml`` is read when a module names it (``"cls.yaml"``, ``"configs/cls.yaml"``)
        next to its folder (``"configs"``), or when a module naming the folder defines a function (the
        loader, ``load_profile``) that some module calls with the file's name or stem (``"cls"``).
        """
        read = set()
        for f in self.data_files:
            folder = f.parent.relative_to(self.package)
            names = {f.name, f.stem}
            loaders = [self.refs(m) for m in modules if {str(folder), folder.name} & self.refs(m).strings]
            named = any({f.name, str(folder / f.name)} & r.strings for r in loaders)
            functions = {d for r in loaders for d in r.defs}
            if named or any(fn in functions and s in names for fn, s in refs.calls):
                read.add(f)
        return read

    def covered(self, entries: list[str]) -> set[Path]:
        """The package files that DVC dependencies ``entries`` (files or folders) cover."""
        out = set()
        for e in entries:
            p = Path(e)
            out.update(f for f in self.files if f == p or p in f.parents)
        return out

    def listing(self, needed: set[Path]) -> list[str]:
        """``needed`` as DVC dependencies: a folder in place of its files when every file in it is needed."""
        folders = sorted({p for f in self.files for p in f.parents if p != Path(".")}, key=lambda p: len(p.parts))
        whole = [d for d in folders if all(f in needed for f in self.files if d in f.parents)]
        out = []
        for d in whole:
            if not any(w in d.parents for w in whole):
                out.append(d)
        out += [f for f in needed if not any(d in f.parents for d in out)]
        return sorted(str(p) for p in out)


# ---------------------------------------------------------------------------------------------
# Notebooks and stages
# ---------------------------------------------------------------------------------------------

_MAGIC = re.compile(r"^\s*[%!]")


def notebook_refs(path: Path) -> Refs:
    """The references of a notebook's code cells (IPython magics and shell lines left out)."""
    nb = nbformat.read(path, as_version=4)
    refs = Refs()
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        source = "\n".join("" if _MAGIC.match(line) else line for line in cell.source.splitlines())
        try:
            tree = ast.parse(source, filename=f"{path}, cell {i}")
        except SyntaxError as e:
            raise SyntaxError(f"{path}: cell {i} does not parse: {e}") from e
        refs.update(_refs(tree))
    return refs


_PAPERMILL = re.compile(r"(?:papermill|run_stage\.py)\s+(\S+\.ipynb)")  # papermill or its runner


def stages(dvc_yaml: dict) -> dict[str, dict]:
    """Each stage of a parsed ``dvc.yaml`` by name: its ``cmd`` and ``deps`` (``foreach ... do`` unwrapped)."""
    out = {}
    for name, stage in (dvc_yaml.get("stages") or {}).items():
        body = stage.get("do", stage)
        cmd = body.get("cmd", "")
        out[name] = {
            "cmd": " && ".join(cmd) if isinstance(cmd, list) else str(cmd),
            "deps": list(body.get("deps") or []),
        }
    return out


@dataclass
class StageDeps:
    name: str
    notebooks: list[str]
    current: list[str]
    derived: list[str]  # the whole deps list as --write makes it
    missing: list[str]  # package files needed and not covered
    extra: list[str]  # package files covered and not needed

    @property
    def ok(self) -> bool:
        return self.current == self.derived


def derive(root: Path = ROOT, package: str = PACKAGE) -> list[StageDeps]:
    """The derived deps of every stage of ``root/dvc.yaml`` that runs notebooks."""
    pkg = Package(root, package)
    raw = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))
    result = []
    for name, stage in stages(raw).items():
        notebooks = sorted(set(_PAPERMILL.findall(stage["cmd"])))
        if not notebooks:
            continue
        refs = Refs()
        for nb in notebooks:
            if not (root / nb).is_file():
                raise FileNotFoundError(f"dvc.yaml: stage {name!r} runs {nb}, which does not exist")
            refs.update(notebook_refs(root / nb))
        modules, total = pkg.closure(refs)
        if "run_stage.py" in stage["cmd"]:
            modules |= {m for m in (f"{package}.{r}" for r in RUNNER_MODULES) if m in pkg.modules}
        needed = {pkg.modules[m] for m in modules} | pkg.data_files_read(modules, total)
        current = stage["deps"]
        # the entries derived here: the notebooks and the package's files; the others are kept
        managed = [d for d in current if d in notebooks or ("${" not in d and Path(d).parts[:1] == (package,))]
        derived = notebooks + pkg.listing(needed) + [d for d in current if d not in managed]
        covered = pkg.covered(managed)
        result.append(
            StageDeps(
                name=name,
                notebooks=notebooks,
                current=current,
                derived=derived,
                missing=sorted(str(f) for f in needed - covered),
                extra=sorted(str(f) for f in covered - needed),
            )
        )
    return result


# ---------------------------------------------------------------------------------------------
# Rewriting dvc.yaml's deps lists in place
# ---------------------------------------------------------------------------------------------

_STAGE = re.compile(r"^  ([^\s#][^:]*):\s*(#.*)?$")
_DEPS = re.compile(r"^(\s+)deps:\s*(#.*)?$")
_ITEM = re.compile(r"^(\s+)- (.*?)(\s+#.*)?$")


def rewrite(text: str, deps: dict[str, list[str]]) -> str:
    """``text`` (a ``dvc.yaml``) with the ``deps:`` list of each stage in ``deps`` replaced.

    Only the list items change; an item kept keeps its line (and its comment).
    """
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    stage = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if m := _STAGE.match(line):
            stage = m.group(1).strip()
        out.append(line)
        i += 1
        if not (stage in deps and _DEPS.match(line)):
            continue
        old: dict[str, str] = {}
        indent = None
        while i < len(lines):
            m = _ITEM.match(lines[i])
            if lines[i].strip().startswith("#"):
                raise ValueError(f"dvc.yaml: a comment inside the deps list of stage {stage!r}; move it above deps:")
            if not m or (indent is not None and m.group(1) != indent):
                break
            indent = m.group(1)
            old[m.group(2).strip()] = lines[i]
            i += 1
        if indent is None:
            raise ValueError(f"dvc.yaml: stage {stage!r} has an empty or inline deps list; expected '- item' lines")
        out += [old.get(d, f"{indent}- {d}\n") for d in deps.pop(stage)]
    if deps:
        raise ValueError(f"dvc.yaml: no deps: list found for stages {sorted(deps)}")
    return "".join(out)


def write(root: Path = ROOT, package: str = PACKAGE) -> list[StageDeps]:
    """Rewrite the deps lists of ``root/dvc.yaml`` that differ from the derived ones; the stages changed."""
    changed = [s for s in derive(root, package) if not s.ok]
    path = root / "dvc.yaml"
    text = path.read_text(encoding="utf-8")
    new = rewrite(text, {s.name: s.derived for s in changed})
    # Nothing but the deps lists may differ.
    before, after = yaml.safe_load(text), yaml.safe_load(new)
    for s in changed:
        body = after["stages"][s.name].get("do", after["stages"][s.name])
        if body["deps"] != s.derived:
            raise RuntimeError(f"dvc.yaml: rewriting the deps of stage {s.name!r} went wrong; file left unchanged")
        body["deps"] = before["stages"][s.name].get("do", before["stages"][s.name])["deps"]
    if before != after:
        raise RuntimeError("dvc.yaml: the rewrite changed more than the deps lists; file left unchanged")
    if changed:
        path.write_text(new, encoding="utf-8")
    return changed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="exit 1 when a stage's deps differ from the derived ones")
    mode.add_argument("--write", action="store_true", help="rewrite the deps lists of dvc.yaml")
    p.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this script's)")
    p.add_argument("--package", default=PACKAGE, help=f"the package folder under the root (default: {PACKAGE})")
    args = p.parse_args(argv)
    if args.write:
        changed = write(args.root, args.package)
        for s in changed:
            print(f"{s.name}: deps rewritten (+{len(s.missing)} files, -{len(s.extra)} files)")
        print(f"dvc.yaml: {len(changed)} stage(s) updated" if changed else "dvc.yaml: deps already up to date")
        return 0
    bad = [s for s in derive(args.root, args.package) if not s.ok]
    for s in bad:
        print(f"stage {s.name!r} ({', '.join(s.notebooks)}):")
        for f in s.missing:
            print(f"  missing: {f}")
        for f in s.extra:
            print(f"  extra:   {f}")
        if not s.missing and not s.extra:
            print("  same files, listed differently; expected:")
            print("".join(f"    - {d}\n" for d in s.derived), end="")
    if bad:
        print(f"{len(bad)} stage(s) out of date: run python scripts/dvc_deps.py --write", file=sys.stderr)
        return 1
    print("dvc.yaml: every stage depends on the modules its notebooks import")
    return 0


if __name__ == "__main__":
    sys.exit(main())
