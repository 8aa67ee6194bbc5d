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


def _imported_modules(source: Path, module: str | None) -> set[str]:
    """Names of the package's modules that ``source`` imports anywhere (lazy imports too)."""
    found = set()
    for node in ast.walk(ast.parse(source.read_text(), str(source))):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names
                         if a.name.startswith(f"{PACKAGE}."))
        elif isinstance(node, ast.ImportFrom):
            absolute = node.module == PACKAGE or (node.module or "").startswith(f"{PACKAGE}.")
            if node.level == 0 and not absolute:
                continue
            if node.level > 0 and module is None:
                continue  # a script outside the package has no relative imports
            base = (node.module or "").removeprefix(PACKAGE).lstrip(".") if absolute \
                else (node.module or "")
            if base:
                found.add(base.split(".")[0])
            else:  # from . import tracking / from cifar_alexnet import tracking
                found.update(a.name for a in node.names)
    return {m for m in found if (PACKAGE_DIR / f"{m}.py").is_file()}


def module_files(*entries: str | Path) -> list[Path]:
    """The package files that ``entries`` (module names such as ``"train"``, or script paths)
    import, directly or not, with ``__init__.py``; sorted."""
    todo = [(Path(e), None) if isinstance(e, Path) or str(e).endswith(".py")
            else (PACKAGE_DIR / f"{e}.py", str(e)) for e in entries]
    seen: set[Path] = set()
    while todo:
        path, module = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += [(PACKAGE_DIR / f"{m}.py", m) for m in _imported_modules(path, module)]
    files = {p for p in seen if p.parent == PACKAGE_DIR} | {PACKAGE_DIR / "__init__.py"}
    return sorted(files)
