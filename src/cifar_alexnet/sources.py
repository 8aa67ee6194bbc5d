"""What each stage depends on, derived in one place: its code (the package files its script
imports, lazily too) and its params (the fields config.py marks with what the stage reads).

`python -m cifar_alexnet.sources` writes both into dvc.yaml's `deps:` and `params:` lists (the
data deps there are kept); `--check` says whether dvc.yaml is current (the tests run it). The
training fingerprint hashes the training core's import closure, so an edit to the benchmark or
the CI tools neither retrains nor discards a resumable checkpoint.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Callable

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGE = PACKAGE_DIR.name


def _file_of(module: str) -> Path | None:
    """``core.trainer`` -> core/trainer.py, ``core`` -> core/__init__.py; None outside the package."""
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
    """The package files that ``entries`` (dotted module names such as ``"core.trainer"``, or
    script paths) import, directly or not, with every ``__init__.py`` Python runs on the way;
    sorted."""
    todo = [(Path(e), None) if isinstance(e, Path) or str(e).endswith(".py")
            else (_file_of(str(e)), str(e)) for e in entries]
    unknown = [str(e) for e, (path, _) in zip(entries, todo) if path is None or not path.is_file()]
    if unknown:  # a renamed module would otherwise drop out of a fingerprint silently
        raise ValueError(f"no module or script {', '.join(unknown)} in {PACKAGE}")
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


STAGE_SCRIPTS = "pipeline"  # pipeline/<stage>.py runs stage <stage>


def stage_code(stage: str, root: Path) -> list[str]:
    """The stage script and the package files it imports, as dvc.yaml paths from ``root``."""
    script = root / STAGE_SCRIPTS / f"{stage}.py"
    return [f"{STAGE_SCRIPTS}/{stage}.py",
            *(str(p.relative_to(PACKAGE_DIR.parents[1])) for p in module_files(script))]


def _block(text: str, stage: str) -> tuple[int, int]:
    """The span of ``stage``'s entry under ``stages:`` in dvc.yaml's text."""
    import re

    start = re.search(rf"^  {re.escape(stage)}:\n", text, re.M)
    if start is None:
        raise ValueError(f"dvc.yaml has no stage {stage!r}")
    end = re.compile(r"^(  [A-Za-z_][\w-]*:|\S)", re.M).search(text, start.end())
    return start.end(), end.start() if end else len(text)


def _replace_list(block: str, key: str, items: list[str], keep: Callable[[str], bool]) -> str:
    """``block`` with its ``key:`` list holding ``items``, then the old entries ``keep`` keeps."""
    import re

    match = re.search(rf"^    {key}:(.*)\n((?:      - .*\n)+)", block, re.M)
    if match is None:
        raise ValueError(f"a stage has no {key}: list")
    old = [line.removeprefix("      - ") for line in match[2].splitlines()]
    kept = [entry for entry in old if keep(entry)]
    lines = "".join(f"      - {entry}\n" for entry in [*items, *kept])
    return block[:match.start(2)] + lines + block[match.end(2):]


def rewrite(dvc_yaml: str, root: Path) -> str:
    """dvc.yaml's text with every stage's code deps and params as derived here."""
    from cifar_alexnet.config import STAGE_READS, stage_params

    for stage in STAGE_READS:
        start, end = _block(dvc_yaml, stage)
        block = _replace_list(dvc_yaml[start:end], "deps", stage_code(stage, root),
                              keep=lambda d: not d.startswith((f"{STAGE_SCRIPTS}/", "src/")))
        block = _replace_list(block, "params", stage_params(stage), keep=lambda _: False)
        dvc_yaml = dvc_yaml[:start] + block + dvc_yaml[end:]
    return dvc_yaml


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dvc_yaml", nargs="?", type=Path, default=Path("dvc.yaml"))
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 when dvc.yaml is not what this would write")
    args = parser.parse_args(argv)
    current = args.dvc_yaml.read_text()
    derived = rewrite(current, args.dvc_yaml.resolve().parent)
    if args.check:
        if derived != current:
            print(f"{args.dvc_yaml} is out of date: run `python -m cifar_alexnet.sources`")
            return 1
        return 0
    args.dvc_yaml.write_text(derived)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
