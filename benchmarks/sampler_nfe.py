"""Smallest NFE that reaches converged quality, per sampler x schedule x T x prior (a measurement).

On the 2-D ring mixture of ``benchmarks/t_tradeoff_gmm.py`` (its data, training helpers, priors and
metrics come from ``benchmarks/common.py``, so every data/training option of that script works here too), with the
ORACLE score and with a trained MLP score per T, for T in {0.2, 0.4, 0.6, 1.0} (VP SDE, eps = 1e-3)
and the priors N(0, I), the exact q_T and (T < 1) the RealNVP flow trained on q_T:

* every (sampler, schedule) of :data:`CONFIGS` is run at increasing NFE from the SAME x_T (common
  random numbers: the differences are discretisation, not sampling noise);
* schedule ``fitted`` is :mod:`difftime.grid_fit`'s DP grid with the case's own score, on 512 pilot
  draws of its prior (their own seeds), 240 candidates; ``refined`` that grid tuned to the sampler and
  step count (:func:`difftime.grid_fit.refine_grid`); the pilot NFE are reported once per case;
* its quality is compared with the converged value of the same (score, T, prior) and sampler family:
  the probability-flow ODE solved by dopri5 at rtol = atol = 1e-6 for the deterministic samplers, the
  reverse SDE with ``--ref-steps`` exact DDPM-posterior steps (SDE-DPM-Solver++(1), eta = 1) for the
  stochastic ones;
* converged quality = |E[log p_data] - converged| <= 0.05 nats AND MMD^2 - converged MMD^2 <= its
  noise floor (2 standard errors of the data-vs-data MMD^2 at this sample size); the smallest NFE
  of the grid where this holds at two consecutive grid points is reported (">max" when never).

Tables (stdout and ``<out stem>_tables.md``): smallest NFE per configuration; the ratio of the
smallest NFE of the best configuration at each short T with the flow prior to that of the BEST T = 1
configuration (N(0, I) prior); the converged references. CSVs: every evaluation (``--out``) and the
smallest NFE per configuration (``<stem>_summary.csv``).

    python benchmarks/sampler_nfe.py             # quick: 21 min on one thread of a 2-core machine
                                                 # (80 s training; --score oracle skips it)
    python benchmarks/sampler_nfe.py --full      # t_tradeoff's full training, 5 x 5000 samples, NFE <= 400
    python benchmarks/sampler_nfe.py --score oracle --short-T 0.2   # options of t_tradeoff_gmm.py pass through
"""

from __future__ import annotations

import argparse
import csv
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common import (CANDIDATES, LOGP_TOL, PILOT_N, REFINE_SWEEPS, Case, Contender, Evaluator, Setup, Stat, build_setup,
                    converged, evaluation, flatten_stats, header, make_case, make_data, nfe_args, noise, oracle_score_fn,
                    quiet, references, train_flow)
from difftime.samplers import SAMPLERS
from difftime.schedules import SCHEDULES, Schedule
from difftime.sde import VPSDE


@dataclass(frozen=True)
class Config:
    label: str
    sampler: str
    schedule: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def stochastic(self) -> bool:
        return self.sampler in ("euler_maruyama", "predictor_corrector", "sde_dpm_solver_pp")

    def build(self, steps: int, case: "Case"):
        return SAMPLERS[self.sampler](steps=steps, schedule=self.grid(steps, case), **dict(self.options))

    def grid(self, steps: int, case: "Case") -> Schedule:
        """The schedule; "fitted" is the DP grid of :func:`difftime.grid_fit.grid_costs` on the case's own
        score and prior, "refined" that grid tuned to this sampler by :func:`difftime.grid_fit.refine_grid`
        (from the DP and the LogSNR grid, ``REFINE_SWEEPS`` sweeps, on the same pilot batch)."""
        if self.schedule == "fitted":
            return case.fitted().schedule(steps)
        if self.schedule == "refined":
            return case.refined(self, steps)
        return SCHEDULES[self.schedule]()

    def name(self) -> str:
        return f"{self.label} / {self.schedule}"


def _configs(full: bool) -> list[Config]:
    """The quick subset (schedule letters: Uniform t, Log-SNR, Karras, Fitted, Refined) or, with ``full``,
    every sampler on U, L, K and (deterministic samplers) F and R."""
    two, three = (("order", 2), ("corrector", False)), (("order", 3), ("corrector", False))
    unic2, unic3 = (("order", 2), ("corrector", True)), (("order", 3), ("corrector", True))
    kinds = [("EM", "euler_maruyama", (), "UL"), ("Heun", "heun_ode", (), "ULK"), ("DDIM", "ddim", (), "LF"),
             ("DPM++2M", "dpm_solver_pp", two, "ULKFR"), ("DPM++3M", "dpm_solver_pp", three, "L"),
             ("DPM++2M+UniC", "dpm_solver_pp", unic2, "LKFR"), ("DPM++3M+UniC", "dpm_solver_pp", unic3, "L"),
             ("SDE-DPM++2M", "sde_dpm_solver_pp", (("eta", 1.0),), "LK"),
             ("DPM++2M+UniC+Tweedie", "dpm_solver_pp", unic2 + (("denoise", True),), "LF")]
    if full:
        kinds += [("DPM++2M exact", "dpm_solver_pp", two + (("variant", "exact"),), "L"),
                  ("DPM++2M+UniC no-lof", "dpm_solver_pp", unic2 + (("lower_order_final", False),), "L"),
                  ("DDIM+Tweedie", "ddim", (("denoise", True),), "L"),
                  ("SDE-DPM++2M eta=0.5", "sde_dpm_solver_pp", (("eta", 0.5),), "L")]
    names = {"U": "uniform_t", "L": "log_snr", "K": "karras", "F": "fitted", "R": "refined"}
    configs = [Config(label, name, names[k], opts) for label, name, opts, keys in kinds for k in keys]
    if full:
        configs = [Config(label, name, names[k], opts) for label, name, opts, _ in kinds
                   for k in "ULK" + ("" if Config(label, name, "", opts).stochastic else "FR")]
    return configs


CONFIGS: list[Config] = []  # set in main: the quick subset or, with --full, every sampler x schedule


def steps_for(config: Config, nfe: int) -> int | None:
    """Steps whose NFE is ``nfe`` (Heun: 2 per step; +1 for a final Tweedie step), or None."""
    options = dict(config.options)
    denoise = options.get("denoise", SAMPLERS[config.sampler]().denoise)
    per_step = 2 if config.sampler == "heun_ode" else 1
    steps, rest = divmod(nfe - int(denoise), per_step)
    return steps if steps >= 1 and rest == 0 else None


# ---------------------------------------------------------------------- one (score, T, prior)
def smallest_nfe(case: Case, config: Config, evaluator: Evaluator, floor: float,
                 args: argparse.Namespace) -> tuple[int | None, list[dict]]:
    """Walk the NFE grid; the first NFE of two consecutive converged grid points (None if none)."""
    ref, rows, first, hits = case.refs["sde" if config.stochastic else "ode"], [], None, 0
    for nfe in args.grid:
        steps = steps_for(config, nfe)
        if steps is None:
            continue
        x, info = config.build(steps, case)(case.contender.score_fn, case.contender.sde, case.x_T, generator=noise(args))
        metrics = evaluator(x)
        ok = converged(metrics, ref, floor)
        rows.append({"score": case.score, "T": case.T, "prior": case.prior, "config": config.name(),
                     "nfe": info["nfe"], "steps": steps, "converged": ok, **metrics})
        hits = hits + 1 if ok else 0
        first = info["nfe"] if hits == 1 else first
        if hits == 2:
            return first, rows
    return None, rows


# ---------------------------------------------------------------------- tables
def _cell(nfe: int | None, grid: list[int]) -> str:
    return str(nfe) if nfe is not None else f">{grid[-1]}"


def nfe_table(summary: list[dict], cases: list[Case], score: str, grid: list[int]) -> list[str]:
    cols = [(c.T, c.prior) for c in cases if c.score == score]
    lines = ["| sampler / schedule | " + " | ".join(f"T={T:g} {p}" for T, p in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for config in CONFIGS:
        cells = [_cell(next(r["nfe_min"] for r in summary if (r["score"], r["T"], r["prior"], r["config"])
                            == (score, T, p, config.name())), grid) for T, p in cols]
        lines.append(f"| {config.name()} | " + " | ".join(cells) + " |")
    return lines


def best(summary: list[dict], score: str, T: float, prior: str) -> dict | None:
    rows = [r for r in summary if (r["score"], r["T"], r["prior"]) == (score, T, prior) and r["nfe_min"] is not None]
    return min(rows, key=lambda r: r["nfe_min"]) if rows else None


def ratio_table(summary: list[dict], short_T: list[float], grid: list[int]) -> list[str]:
    lines = ["| score | T | prior | best configuration | NFE | best T=1 gaussian configuration | NFE | ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for score in ("oracle", "trained"):
        base = best(summary, score, 1.0, "gaussian")
        for T in short_T:
            for prior in ("flow", "gaussian"):
                b = best(summary, score, T, prior)
                ratio = f"{b['nfe_min'] / base['nfe_min']:.2f}" if b and base else "n/a"
                lines.append(f"| {score} | {T:g} | {prior} | {b['config'] if b else '—'} | "
                             f"{_cell(b and b['nfe_min'], grid)} | {base['config'] if base else '—'} | "
                             f"{_cell(base and base['nfe_min'], grid)} | {ratio} |")
    return lines


def reference_table(cases: list[Case]) -> list[str]:
    lines = ["| score | T | prior | ODE ref E[log p] | ODE ref MMD² ×1e3 | ODE ref NFE | SDE ref E[log p] | "
             "SDE ref MMD² ×1e3 |", "|---|---|---|---|---|---|---|---|"]
    for c in cases:
        o, s = c.refs["ode"], c.refs["sde"]
        lines.append(f"| {c.score} | {c.T:g} | {c.prior} | {o['logp'].fmt(3)} | {_milli(o['mmd2'])} | {o['nfe']} | "
                     f"{s['logp'].fmt(3)} | {_milli(s['mmd2'])} |")
    return lines


def _milli(s: Stat) -> str:
    return f"{1e3 * s.mean:.3f}±{1e3 * s.se:.3f}"


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = [flatten_stats(r) for r in rows]
    fields = list(dict.fromkeys(k for r in flat for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(flat)


# ---------------------------------------------------------------------- main
def contenders(data, args: argparse.Namespace) -> tuple[list[Contender], list[dict]]:
    if args.score == "oracle":  # no training: only the oracle score, flows still needed for T < 1
        setup = Setup()
        for T in [1.0] + list(args.short_T):
            sde = VPSDE(T=T, eps=args.eps)
            priors = {"gaussian": sde.prior((2,)), "exact": data.at_time(sde, T)}
            if T < 1.0:
                priors["flow"] = train_flow(data, T, args)[0]
            setup.contenders += [Contender("oracle", T, k, p, sde, oracle_score_fn(data, sde))
                                 for k, p in priors.items()]
        return setup.contenders, setup.costs
    setup = build_setup(data, args)
    keep = ("oracle", "trained") if args.score == "both" else (args.score,)
    return [c for c in setup.contenders if c.score in keep], setup.costs


def main() -> None:
    args = nfe_args(description=__doc__)
    CONFIGS[:] = _configs(args.full)
    torch.set_num_threads(args.threads)
    quiet()
    start = time.perf_counter()
    data = make_data(args)
    evaluator, floor_stats = evaluation(data, args)
    floor = 2.0 * floor_stats["mmd2"].se
    print(header(args) + f"; NFE grid {args.grid}; reverse-SDE reference {args.ref_steps} steps", flush=True)
    found, _ = contenders(data, args)
    cases = [make_case(c, args.reps * args.n, args.seed, i) for i, c in enumerate(found)]
    rows, summary = [], []
    for case in cases:
        references(case, evaluator, args)
        for config in CONFIGS:
            nfe_min, evaluated = smallest_nfe(case, config, evaluator, floor, args)
            rows += evaluated
            summary.append({"score": case.score, "T": case.T, "prior": case.prior, "config": config.name(),
                            "nfe_min": nfe_min})
        print(f"# {case.score} T={case.T:g} {case.prior}: best "
              f"{(best(summary, case.score, case.T, case.prior) or {}).get('config')} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    out = Path(args.out)
    write_csv(out, rows)
    write_csv(out.with_name(f"{out.stem}_summary{out.suffix}"), summary)
    tables = report(summary, cases, floor_stats, floor, args)
    out.with_name(f"{out.stem}_tables.md").write_text(tables + "\n")
    print(tables)
    print(f"\n# total wall time {time.perf_counter() - start:.0f} s; CSV: {out}")


def report(summary: list[dict], cases: list[Case], floor_stats: dict, floor: float, args: argparse.Namespace) -> str:
    parts = [f"Data vs data: E[log p] {floor_stats['logp'].fmt(3)}, MMD² ×1e3 {_milli(floor_stats['mmd2'])}; "
             f"criterion |ΔE[log p]| <= {LOGP_TOL} and ΔMMD² <= {1e3 * floor:.3f}e-3 (2 se of the floor), "
             f"{args.reps} x {args.n} samples."]
    for score in ("oracle", "trained"):
        if any(c.score == score for c in cases):
            parts.append(f"\n### Smallest NFE to converged quality, {score} score\n\n"
                         + "\n".join(nfe_table(summary, cases, score, args.grid)))
    fits = [c for c in cases if c.costs is not None]
    if fits:
        parts.append(f"\nFitted grids (schedule `fitted`): `difftime.grid_fit.grid_costs` with each case's own score "
                     f"on {PILOT_N} pilot samples of its prior (seeds the evaluation does not use), {CANDIDATES} "
                     f"candidate LogSNR times, {fits[0].costs.nfe} score evaluations on the pilot batch once per case "
                     f"(not in the NFE columns; {sum(c.fit_seconds for c in fits) / len(fits):.1f} s per case here, "
                     f"refinement included). Schedule `refined`: that grid tuned to each sampler and step count by "
                     f"`difftime.grid_fit.refine_grid` ({REFINE_SWEEPS} sweeps from the DP and the LogSNR grid, "
                     f"pilot RMS distance to the teacher), {sum(c.refine_nfe for c in fits) / len(fits):.0f} pilot NFE "
                     f"per case over all the step counts walked.")
    parts.append("\n### NFE at equal (converged) quality: best short-T configuration against the best T = 1 "
                 "N(0, I) configuration\n\n" + "\n".join(ratio_table(summary, args.short_T, args.grid)))
    parts.append("\n### Converged references\n\n" + "\n".join(reference_table(cases)))
    return "\n".join(parts)


if __name__ == "__main__":
    main()
