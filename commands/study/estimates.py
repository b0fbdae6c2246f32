"""Cost estimates of ``--dry-run``, from this machine's own measured rates.

Rates come from what the units of this study's folder recorded when they ran (finished or not,
current or from an earlier version of the spec): seconds per training step from the fit units'
``attempts.jsonl`` (per score model and per auxiliary prior), seconds per NFE per sample and per
bits/dim image from the evaluation units' ``result.json``. Only a rate nothing has measured yet
falls back to the spec's ``cost:`` block. Every estimate is printed with its source.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from commands.study.config import FIT_KINDS
from commands.study.plan import Plan, Unit
from commands.study.records import done_steps, status

STARTUP_SAMPLE_S = 2.0  # loading the model of a sample unit
# an adaptive solver's NFE is known only after its run: dopri5 at rtol 1e-5 took 494 NFE on 28x28 digits at T = 1
ADAPTIVE_NFE = 500
REPORT_S = 30.0  # the report: a guess, it is not measured


@dataclass
class Rate:
    value: float
    source: str


def _jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def _json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def fit_rate(out: Path, kind: str, prefix: str, fallback: float, what: str) -> Rate:
    """Seconds per step of the fits in ``out/units/<kind>/<prefix>*`` (start-up included), measured."""
    wall = steps = attempts = 0
    for path in (out / "units" / kind).glob(f"{prefix}*/attempts.jsonl"):
        for attempt in _jsonl(path):
            trained = int(attempt.get("step_after", 0)) - int(attempt.get("step_before", 0))
            if trained > 0:
                wall, steps, attempts = wall + float(attempt["wall_s"]), steps + trained, attempts + 1
    if steps:
        return Rate(wall / steps, f"measured here: {steps:,} steps in {attempts} attempt(s), start-up included")
    return Rate(fallback, f"the spec's cost.{what} (nothing measured yet)")


def eval_rate(out: Path, kind: str, work: Any, wall_key: str, fallback: float, what: str) -> Rate:
    """Seconds per unit of ``work(result, params)`` over the evaluation units of ``kind`` that recorded a result."""
    wall = amount = units = 0.0
    for path in (out / "units" / kind).glob("*/result.json"):
        result = _json(path)
        try:
            done = float(work(result)) if result else 0.0
            spent = float(result[wall_key]) if result else 0.0
        except (KeyError, TypeError, ValueError):
            continue
        if done > 0:
            wall, amount, units = wall + spent, amount + done, units + 1
    if amount:
        return Rate(wall / amount, f"measured here on {units:.0f} {kind} unit(s)")
    return Rate(fallback, f"the spec's cost.{what} (nothing measured yet)")


class Rates:
    """This machine's rates for a plan, each with its source."""

    def __init__(self, plan: Plan) -> None:
        cost, out = plan.spec.cost, plan.out
        self.kinds = {unit.kind for unit in plan.units.values()}
        self.fit = {"score": fit_rate(out, "score", "", cost.score_s_per_step, "score_s_per_step")}
        for name in dict.fromkeys(_fit_key(u).split(" ", 1)[1] for u in plan.units.values() if u.kind == "aux"):
            self.fit[f"aux {name}"] = fit_rate(out, "aux", f"{name}-T", cost.aux_s_per_step, "aux_s_per_step")
        self.sample = eval_rate(out, "sample", lambda r: r["nfe"] * r["n"], "wall_time_s",
                                cost.s_per_nfe_per_sample, "s_per_nfe_per_sample")
        self.bpd = eval_rate(out, "bpd", lambda r: r["n"], "wall_s", cost.bpd_s_per_image, "bpd_s_per_image")
        if not self.bpd.source.startswith("the spec"):
            self.bpd.source += " (at their n_t)"
        self.classifier = eval_rate(out, "classifier", lambda r: 1.0, "wall_s", cost.classifier_s, "classifier_s")
        self.startup = cost.startup_s

    def lines(self) -> list[str]:
        rows = [(f"{name} fit", rate, "s/step") for name, rate in self.fit.items()]
        rows += [("sampling", self.sample, "s per NFE per sample"), ("bits/dim", self.bpd, "s per image")]
        rows += [("classifier", self.classifier, "s")] if "classifier" in self.kinds else []
        return [f"  {name}: {rate.value:.4g} {unit}, {rate.source}" for name, rate, unit in rows]


def _fit_key(unit: Unit) -> str:
    return "score" if unit.kind == "score" else f"aux {unit.label.rsplit('-T', 1)[0]}"


def estimate(unit: Unit, rates: Rates, spec: Any, state: str | None = None) -> float:
    """Estimated seconds still needed for ``unit`` (0 when done)."""
    if (state or status(unit)) == "done":
        return 0.0
    if unit.kind in FIT_KINDS:
        rate = rates.fit[_fit_key(unit)]
        left = unit.params["trainer"]["max_steps"] - done_steps(unit)
        return rate.value * left + (rates.startup if rate.source.startswith("the spec") else 0.0)
    if unit.kind == "classifier":
        return rates.classifier.value
    if unit.kind == "bpd":
        if rates.bpd.source.startswith("the spec"):  # its rate is per image at n_t = 16
            return rates.bpd.value * spec.bpd.max_samples * spec.bpd.n_t / 16 + rates.startup / 2
        return rates.bpd.value * spec.bpd.max_samples
    if unit.kind == "sample":
        nfe = unit.params["nfe"] if unit.params["nfe"] is not None else ADAPTIVE_NFE
        return STARTUP_SAMPLE_S + rates.sample.value * nfe * unit.params["n"]
    return REPORT_S
