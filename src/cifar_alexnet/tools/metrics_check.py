"""check-metrics: compare metrics with a reference, within explicit tolerances; exit 1 if not.

``dvc metrics diff`` shows changes but cannot fail on them; CI needs a command that exits
non-zero when a metric moves too far. A metric passes when
``|current - reference| <= max(abs, rel * |reference|)`` (like ``math.isclose``), or, for a
``min`` check, when ``current >= min``.

Two forms:

* ``check-metrics CURRENT REFERENCE --abs-tol ... --rel-tol ...``: one file against another.
* ``check-metrics --spec checks.yaml --reference reference.json RUN_DIR [RUN_DIR ...]``: every
  metric a spec names, in every run directory (one column each), against one reference file;
  ``--write-reference`` writes that file from the first run instead. This is what
  ``.ci/reproduce-metrics`` and the CI job summary use (``--markdown``).

A spec maps files (paths inside a run directory: JSON, YAML, or CSV with a ``key`` column) to
metrics and their tolerances, each with a ``why``:

    tune/summary.json:
      best_trial: {abs: 0, why: "..."}
    tune/trials.csv:
      key: number                       # CSV rows become <number>.<column>
      metrics:
        0.value: {abs: 0.02, why: "..."}
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from cifar_alexnet.config import flatten
from cifar_alexnet.files import write_json

CHECK_KEYS = {"abs", "rel", "min", "why"}


def _numeric(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def read_metrics(path: str | Path, key: str | None = None) -> dict[str, float]:
    """Numeric leaves of a JSON/YAML metrics file, flattened to dotted keys; for a CSV, every
    numeric cell as ``<row's key column>.<column>``."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        if rows and (key is None or key not in rows[0]):
            raise ValueError(f"{path}: a CSV needs `key:` naming one of its columns "
                             f"({', '.join(rows[0])})")
        return {f"{row[key]}.{column}": number for row in rows for column, cell in row.items()
                if column != key and (number := _numeric(cell)) is not None}
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    return {k: number for k, v in flatten(data or {}).items()
            if not isinstance(v, str) and (number := _numeric(v)) is not None}


def parse_tolerances(items: Sequence[str], option: str) -> tuple[float, dict[str, float]]:
    """``["0.01", "loss=0.05"]`` -> (default 0.01, {"loss": 0.05})."""
    default, per_key = 0.0, {}
    for item in items:
        key, _, value = item.rpartition("=")
        try:
            number = float(value)
        except ValueError:
            raise SystemExit(f"check-metrics: {option} {item!r}: expected [KEY=]NUMBER") from None
        if number < 0:
            raise SystemExit(f"check-metrics: {option} {item!r}: tolerance must be >= 0")
        if key:
            per_key[key] = number
        else:
            default = number
    return default, per_key


@dataclass(frozen=True)
class Check:
    """One metric of one file: ``|current - reference| <= max(abs, rel*|ref|)``, or
    ``current >= min`` when ``min`` is set (no reference needed)."""

    file: str
    metric: str
    abs: float = 0.0
    rel: float = 0.0
    min: float | None = None
    why: str = ""

    def allowed(self, reference: float | None) -> float:
        return max(self.abs, self.rel * abs(reference or 0.0))

    def passes(self, current: float | None, reference: float | None) -> bool:
        if current is None or not math.isfinite(current):
            return False
        if self.min is not None:
            return current >= self.min
        return reference is not None and abs(current - reference) <= self.allowed(reference) + 1e-12


@dataclass(frozen=True)
class Spec:
    checks: list[Check]
    csv_keys: dict[str, str]  # file -> key column, for CSV files

    @property
    def files(self) -> list[str]:
        return list(dict.fromkeys(c.file for c in self.checks))


def load_spec(path: str | Path) -> Spec:
    """Read a checks spec (see the module docstring); refuse unknown or invalid fields."""
    tree = yaml.safe_load(Path(path).read_text()) or {}
    checks, csv_keys = [], {}
    for file, entry in tree.items():
        metrics = entry
        if isinstance(entry, dict) and "metrics" in entry:
            metrics = entry["metrics"]
            if "key" in entry:
                csv_keys[file] = str(entry["key"])
        if not isinstance(metrics, dict) or not metrics:
            raise ValueError(f"{path}: {file}: expected a mapping of metrics to checks")
        for metric, fields in metrics.items():
            where = f"{path}: {file}: {metric}"
            if not isinstance(fields, dict) or set(fields) - CHECK_KEYS:
                raise ValueError(f"{where}: expected a mapping with keys from "
                                 f"{sorted(CHECK_KEYS)}, got {fields!r}")
            numbers = {k: fields[k] for k in ("abs", "rel", "min") if k in fields}
            if any(_numeric(v) is None or (k != "min" and float(v) < 0)
                   for k, v in numbers.items()):
                raise ValueError(f"{where}: abs/rel must be numbers >= 0, min a number")
            checks.append(Check(file, str(metric), why=str(fields.get("why", "")),
                                **{k: float(v) for k, v in numbers.items()}))
    return Spec(checks, csv_keys)


def read_run(run_dir: str | Path, spec: Spec) -> dict[str, dict[str, float]]:
    """The metrics of every file the spec names, read from one run directory."""
    return {file: read_metrics(Path(run_dir) / file, spec.csv_keys.get(file))
            for file in spec.files}


def reference_from_run(run: dict[str, dict[str, float]], spec: Spec) -> dict[str, dict[str, float]]:
    """The reference values a spec needs (``min`` checks need none), taken from one run."""
    reference: dict[str, dict[str, float]] = {}
    for check in spec.checks:
        if check.min is None and check.metric in run[check.file]:
            reference.setdefault(check.file, {})[check.metric] = run[check.file][check.metric]
    return reference


def compare(current: dict[str, float], reference: dict[str, float], abs_tol: tuple[float, dict],
            rel_tol: tuple[float, dict], keys: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per reference metric (or per ``keys``): values, difference, allowed, ok."""
    rows = []
    for key in keys or sorted(reference):
        check = Check("", key, abs=abs_tol[1].get(key, abs_tol[0]),
                      rel=rel_tol[1].get(key, rel_tol[0]))
        ref, cur = reference.get(key), current.get(key)
        rows.append({"metric": key, "reference": ref, "current": cur,
                     "diff": None if ref is None or cur is None else cur - ref,
                     "allowed": check.allowed(ref), "ok": check.passes(cur, ref)})
    return rows


def compare_runs(runs: dict[str, dict[str, dict[str, float]]], reference: dict[str, dict[str, float]],
                 spec: Spec) -> list[dict[str, Any]]:
    """One row per check: the reference, each run's value and whether all runs pass."""
    rows = []
    for check in spec.checks:
        ref = reference.get(check.file, {}).get(check.metric)
        values = {name: run[check.file].get(check.metric) for name, run in runs.items()}
        rows.append({"file": check.file, "metric": check.metric, "reference": ref,
                     "values": values, "check": check,
                     "ok": {name: check.passes(v, ref) for name, v in values.items()}})
    return rows


def _fmt(value: float | None) -> str:
    return "missing" if value is None else f"{value:.6g}"


def _allowed(check: Check, reference: float | None) -> str:
    return f">= {check.min:g}" if check.min is not None else f"± {_fmt(check.allowed(reference))}"


def render(header: Sequence[str], body: Sequence[Sequence[str]], markdown: bool) -> str:
    if markdown:
        lines = [header, ["---"] * len(header), *body]
        return "\n".join("| " + " | ".join(str(c).replace("|", "\\|") for c in line) + " |"
                         for line in lines)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip()
                     for line in [header, *body])


def format_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    header = ("metric", "reference", "current", "diff", "allowed", "status")
    body = [(r["metric"], _fmt(r["reference"]), _fmt(r["current"]), _fmt(r["diff"]),
             _fmt(r["allowed"]), "ok" if r["ok"] else "FAIL") for r in rows]
    return render(header, body, markdown)


def spread(values: Sequence[float | None]) -> float | None:
    """max - min of the values, None if any is missing."""
    if any(v is None for v in values):
        return None
    return max(values) - min(values)  # type: ignore[type-var]


def format_runs_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """One row per check, a column per run; with several runs also their spread (max - min)."""
    names = list(rows[0]["values"]) if rows else []
    several = len(names) > 1
    header = ("file", "metric", "reference", *names, *(["spread"] if several else []),
              "allowed", "status")
    body = []
    for r in rows:
        failed = [name for name, ok in r["ok"].items() if not ok]
        status = "ok" if not failed else "FAIL" + (f" ({', '.join(failed)})" if several else "")
        values = [r["values"][n] for n in names]
        reference = "-" if r["check"].min is not None else _fmt(r["reference"])
        body.append((r["file"], r["metric"], reference, *map(_fmt, values),
                     *([_fmt(spread(values))] if several else []),
                     _allowed(r["check"], r["reference"]), status))
    return render(header, body, markdown)


def _report(rows: list[dict[str, Any]], table: str) -> int:
    print(table)
    failed = [r["metric"] for r in rows
              if not (all(r["ok"].values()) if isinstance(r["ok"], dict) else r["ok"])]
    if failed:
        print(f"check-metrics: {len(failed)} metric(s) outside tolerance: {', '.join(failed)}",
              file=sys.stderr)
        return 1
    print(f"check-metrics: all {len(rows)} metric(s) within tolerance")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="check-metrics",
        description="Fail (exit 1) when metrics differ from a reference beyond a tolerance.")
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                        help="CURRENT REFERENCE (two metrics files), or with --spec: run "
                             "directories")
    parser.add_argument("--abs-tol", action="append", default=[], metavar="[KEY=]X",
                        help="absolute tolerance, for all metrics or one KEY; repeatable")
    parser.add_argument("--rel-tol", action="append", default=[], metavar="[KEY=]X",
                        help="relative tolerance (fraction of the reference); repeatable")
    parser.add_argument("--keys", help="comma-separated metrics to compare (default: all "
                                       "numeric metrics in the reference)")
    parser.add_argument("--spec", type=Path, help="checks spec (YAML): files, metrics, "
                                                  "tolerances and why")
    parser.add_argument("--reference", type=Path, help="with --spec: the reference (JSON)")
    parser.add_argument("--name", action="append", default=[],
                        help="with --spec: a column title per run directory (default: its name)")
    parser.add_argument("--write-reference", action="store_true",
                        help="with --spec: write --reference from the first run directory")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    # intermixed: run directories and their --name options may come in any order
    args = parser.parse_intermixed_args(argv)
    try:
        if args.spec is None:
            if len(args.paths) != 2:
                parser.error("expected CURRENT REFERENCE (or --spec with run directories)")
            current, reference = read_metrics(args.paths[0]), read_metrics(args.paths[1])
            keys = [k.strip() for k in args.keys.split(",")] if args.keys else None
            rows = compare(current, reference, parse_tolerances(args.abs_tol, "--abs-tol"),
                           parse_tolerances(args.rel_tol, "--rel-tol"), keys)
            return _report(rows, format_table(rows, args.markdown))
        if args.reference is None:
            parser.error("--spec needs --reference")
        spec = load_spec(args.spec)
        names = args.name or [p.name for p in args.paths]
        if len(names) != len(args.paths):
            parser.error("give one --name per run directory")
        runs = {name: read_run(path, spec) for name, path in zip(names, args.paths)}
        reference = (reference_from_run(runs[names[0]], spec) if args.write_reference
                     else json.loads(args.reference.read_text()))
    except (OSError, ValueError, yaml.YAMLError) as exc:
        print(f"check-metrics: cannot read metrics: {exc}", file=sys.stderr)
        return 2
    rows = compare_runs(runs, reference, spec)
    status = _report(rows, format_runs_table(rows, args.markdown))
    if args.write_reference:
        if status:  # a `min` check failed: such a reference would not hold elsewhere
            print(f"check-metrics: {args.reference} not written", file=sys.stderr)
            return status
        write_json(args.reference, reference)
        print(f"check-metrics: wrote {args.reference} from {args.paths[0]}")
    return status


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
