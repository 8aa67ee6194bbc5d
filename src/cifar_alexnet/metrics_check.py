"""check-metrics: compare a metrics file with a reference, within explicit tolerances.

``dvc metrics diff`` shows changes but cannot fail on them; CI needs a command that exits
non-zero when a metric moves too far. A metric passes when
``|current - reference| <= max(abs_tol, rel_tol * |reference|)`` (like ``math.isclose``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from .config import flatten


def read_metrics(path: str | Path) -> dict[str, float]:
    """Numeric leaves of a JSON/YAML metrics file, flattened to dotted keys."""
    text = Path(path).read_text()
    data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    return {k: float(v) for k, v in flatten(data or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


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


def compare(current: dict[str, float], reference: dict[str, float], abs_tol: tuple[float, dict],
            rel_tol: tuple[float, dict], keys: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per reference metric (or per ``keys``): values, difference, allowed, ok."""
    rows = []
    for key in keys or sorted(reference):
        ref = reference.get(key)
        cur = current.get(key)
        allowed = max(abs_tol[1].get(key, abs_tol[0]),
                      rel_tol[1].get(key, rel_tol[0]) * abs(ref if ref is not None else 0.0))
        if ref is None or cur is None:
            rows.append({"metric": key, "reference": ref, "current": cur, "diff": None,
                         "allowed": allowed, "ok": False})
            continue
        diff = cur - ref
        ok = math.isfinite(cur) and abs(diff) <= allowed + 1e-12
        rows.append({"metric": key, "reference": ref, "current": cur, "diff": diff,
                     "allowed": allowed, "ok": ok})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    def fmt(value: Any) -> str:
        return "missing" if value is None else f"{value:.6g}"
    header = ("metric", "reference", "current", "diff", "allowed", "status")
    body = [(r["metric"], fmt(r["reference"]), fmt(r["current"]), fmt(r["diff"]),
             fmt(r["allowed"]), "ok" if r["ok"] else "FAIL") for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths))
                     for line in [header, *body])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="check-metrics",
        description="Fail (exit 1) when metrics differ from a reference beyond a tolerance.")
    parser.add_argument("current", type=Path, help="metrics file just produced (JSON or YAML)")
    parser.add_argument("reference", type=Path, help="reference metrics file (JSON or YAML)")
    parser.add_argument("--abs-tol", action="append", default=[], metavar="[KEY=]X",
                        help="absolute tolerance, for all metrics or one KEY; repeatable")
    parser.add_argument("--rel-tol", action="append", default=[], metavar="[KEY=]X",
                        help="relative tolerance (fraction of the reference); repeatable")
    parser.add_argument("--keys", help="comma-separated metrics to compare (default: all "
                                       "numeric metrics in the reference)")
    args = parser.parse_args(argv)
    try:
        current, reference = read_metrics(args.current), read_metrics(args.reference)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        print(f"check-metrics: cannot read metrics: {exc}", file=sys.stderr)
        return 2
    keys = [k.strip() for k in args.keys.split(",")] if args.keys else None
    rows = compare(current, reference, parse_tolerances(args.abs_tol, "--abs-tol"),
                   parse_tolerances(args.rel_tol, "--rel-tol"), keys)
    print(format_table(rows))
    failed = [r["metric"] for r in rows if not r["ok"]]
    if failed:
        print(f"check-metrics: {len(failed)} metric(s) outside tolerance: {', '.join(failed)}",
              file=sys.stderr)
        return 1
    print(f"check-metrics: all {len(rows)} metric(s) within tolerance")
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
