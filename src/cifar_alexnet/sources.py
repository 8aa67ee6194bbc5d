"""Which of the package's source files a module runs: its import closure inside cifar_alexnet.

One answer to "what code does this stage depend on": the training fingerprint hashes it (an edit
to the benchmark or the CI tools does not discard a resumable checkpoint), and a test holds the
code deps in dvc.yaml to it (an edit to them does not retrain either).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGE = PACKAGE_DIR.name


def _file_of(module: str) -> Path | None:
    """``core.train`` -> core/train.py, ``core`` -> core/__init__.py; None outside the package."""
    base = PACKAGE_DIR.joinpath(*module.split(".")) if module else PACKAGE_DIR
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(source: Path, module: str | None) -> set[str]:
    """The package's modules (dotted, relative to the package) that ``source`` imports anywhere,
    lazy imports too. ``module`` is the source's own dotted name, None for a script."""
    package_of_source = module.rsplit(".", 1)[0] if module and "." in module else ""
    if source.name == "__init__.py":
        package_of_source = module or ""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text(), str(source))):
        if isinstance(node, ast.Import):
            found.update(a.name.removeprefix(f"{PACKAGE}.") for a in node.names
                         if a.name.startswith(f"{PACKAGE}."))
            continue
        if not isinstance(node, ast.ImportFrom):
            continue
        name = node.module or ""
        if node.level == 0:
            if name != PACKAGE and not name.startswith(f"{PACKAGE}."):
                continue
            base = name.removeprefix(PACKAGE).lstrip(".")
        elif module is None:
            continue  # a script outside the package has no relative imports
        else:
            parts = package_of_source.split(".") if package_of_source else []
            parts = parts[:len(parts) - (node.level - 1)]
            base = ".".join([*parts, *([name] if name else [])])
        found.add(base)
        # `from cifar_alexnet import tracking`, `from . import study`: names may be modules
        found.update(f"{base}.{a.name}".lstrip(".") for a in node.names)
    return {m for m in found if _file_of(m) is not None}


def module_files(*entries: str | Path) -> list[Path]:
    """The package files that ``entries`` (dotted module names such as ``"core.train"``, or
    script paths) import, directly or not, with every ``__init__.py`` Python runs on the way;
    sorted."""
    todo = [(Path(e), None) if isinstance(e, Path) or str(e).endswith(".py")
            else (_file_of(str(e)), str(e)) for e in entries]
    seen: set[Path] = set()
    while todo:
        path, module = todo.pop()
        if path is None or path in seen:
            continue
        seen.add(path)
        if module:  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
            parents = module.split(".")[:-1]
            todo += [(_file_of(".".join(parents[:i])), ".".join(parents[:i]) or None)
                     for i in range(1, len(parents) + 1)]
        todo += [(_file_of(m), m) for m in _imported_modules(path, module)]
    return sorted({p for p in seen if PACKAGE_DIR in p.parents} | {PACKAGE_DIR / "__init__.py"})
