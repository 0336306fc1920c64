"""Baselines for ``dpmem check --baseline FILE``: regressions of accuracy and of the epsilon lower bound.

A baseline file is JSON:
    {"variants": {NAME: {"test_accuracy": float, "eps_lb": float | null}},
     "tolerances": {"test_accuracy": 0.02, "eps_lb": 0.5}}
``tolerances`` (or either key in it) may be left out; the defaults above apply. A run fails the
baseline when a variant's test accuracy dropped by more than its tolerance, its eps_lb rose by more
than its tolerance, or a baseline variant is missing from the run. Epsilon lower bounds at or below
0 (and null, no bound at all) say nothing about privacy, so both sides are floored at 0 before
they are compared.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TypeGuard

from dpmem.privacy.errors import UsageError

DEFAULT_TOLERANCES = {"test_accuracy": 0.02, "eps_lb": 0.5}


def _is_number(x) -> TypeGuard[int | float]:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate_baseline(baseline, source: str = "baseline") -> dict:
    """Check the shape of a baseline; returns it with the default tolerances filled in."""
    if not isinstance(baseline, dict):
        raise UsageError(f"{source}: expected a JSON object with 'variants'")
    unknown = set(baseline) - {"variants", "tolerances"}
    if unknown:
        raise UsageError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}; expected 'variants' and 'tolerances'")
    variants = baseline.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise UsageError(f"{source}: 'variants' must be a non-empty object of variant name -> figures")
    for name, entry in variants.items():
        if not isinstance(entry, dict):
            raise UsageError(f"{source}: variant {name!r} must be an object with 'test_accuracy' and 'eps_lb'")
        if not _is_number(entry.get("test_accuracy")) or not (0.0 <= entry["test_accuracy"] <= 1.0):
            raise UsageError(f"{source}: variant {name!r} needs 'test_accuracy', a number in [0, 1]")
        if "eps_lb" not in entry or not (entry["eps_lb"] is None or _is_number(entry["eps_lb"])):
            raise UsageError(f"{source}: variant {name!r} needs 'eps_lb', a finite number or null")
    tolerances = baseline.get("tolerances", {})
    if not isinstance(tolerances, dict):
        raise UsageError(f"{source}: 'tolerances' must be an object")
    unknown = set(tolerances) - set(DEFAULT_TOLERANCES)
    if unknown:
        raise UsageError(f"{source}: unknown tolerance(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(DEFAULT_TOLERANCES)}")
    for key, value in tolerances.items():
        if not _is_number(value) or value < 0:
            raise UsageError(f"{source}: tolerance {key!r} must be a number >= 0, got {value!r}")
    return {"variants": variants, "tolerances": DEFAULT_TOLERANCES | tolerances}


def load_baseline(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"baseline file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"baseline file {path} is not valid JSON: {str(e).splitlines()[0]}") from None
    return validate_baseline(data, source=f"baseline file {path}")


def _summary_variants(summary) -> dict:
    if not isinstance(summary, dict) or not isinstance(summary.get("variants"), dict):
        raise UsageError("run summary has no 'variants' object")
    return summary["variants"]


def _accuracy(summary_variants: dict, name: str) -> float:
    value = summary_variants[name].get("test_accuracy") if isinstance(summary_variants[name], dict) else None
    if not _is_number(value):
        raise UsageError(f"run summary: variant {name!r} has no finite 'test_accuracy'")
    return float(value)


def _eps_lb_floor(value) -> float:
    return 0.0 if value is None or (isinstance(value, float) and math.isnan(value)) else max(0.0, float(value))


def make_baseline(summary: dict, tolerances: dict | None = None) -> dict:
    """A baseline holding every variant's test accuracy and eps_lb from a run's summary.json."""
    variants = _summary_variants(summary)
    out = {"variants": {}, "tolerances": DEFAULT_TOLERANCES | (tolerances or {})}
    for name in variants:
        eps_lb = variants[name].get("eps_lb")
        out["variants"][name] = {
            "test_accuracy": _accuracy(variants, name),
            "eps_lb": float(eps_lb) if eps_lb is not None and math.isfinite(eps_lb) else None,
        }
    return validate_baseline(out)


def compare_to_baseline(summary: dict, baseline: dict) -> list[str]:
    """Human-readable failures of the run against the baseline; empty when it passes."""
    baseline = validate_baseline(baseline)
    variants = _summary_variants(summary)
    tol_acc, tol_eps = baseline["tolerances"]["test_accuracy"], baseline["tolerances"]["eps_lb"]
    failures = []
    for name, ref in baseline["variants"].items():
        if name not in variants:
            failures.append(f"{name}: in the baseline but missing from the run")
            continue
        acc = _accuracy(variants, name)
        drop = ref["test_accuracy"] - acc
        if drop > tol_acc:
            failures.append(f"{name}: test accuracy {acc:.4f} is {drop:.4f} below the baseline "
                            f"{ref['test_accuracy']:.4f} (tolerance {tol_acc:g})")
        run_lb = variants[name].get("eps_lb")
        rise = _eps_lb_floor(run_lb) - _eps_lb_floor(ref["eps_lb"])
        if rise > tol_eps:
            base_txt = "none" if ref["eps_lb"] is None else f"{ref['eps_lb']:.3f}"
            failures.append(f"{name}: eps_lb {float(run_lb):.3f} is {rise:.3f} above the baseline "
                            f"{base_txt} (tolerance {tol_eps:g})")
    return failures
