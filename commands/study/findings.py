"""report.md: the settings, the main table, bits/dim and its terms, and findings generated from the
numbers, which say so where they do not support the paper (Franzese et al. 2023, Sec. 5)."""

from __future__ import annotations

import math
from typing import Any

from commands.study.figures import config_name, configs
from commands.study.plan import Plan
from commands.study.spec import GAUSSIAN


def _pm(value: float, se: float) -> str:
    return f"{value:.3f} ± {se:.3f}" if not math.isnan(se) else f"{value:.3f}"


def _ci(row: dict[str, Any], key: str, style: str = ".2f") -> str:
    return f"{row[key]:{style}} [{row[key + '_low']:{style}}, {row[key + '_high']:{style}}]"


def _settings(plan: Plan, first: dict[str, Any]) -> str:
    """The paragraph under the title: what was measured, on what, with which intervals."""
    from difftime.quality import interval_note

    accuracy = f", test accuracy {first['extractor_test_accuracy']:.4f}" if first["extractor_test_accuracy"] is not None else ""
    return (f"Spec `{plan.spec_path.name}`; {len(plan.units) - 1} units. bits/dim: ELBO on the first "
            f"{first['bpd_n']} validation data (`callbacks.BitsPerDim`, n_t = {plan.spec.bpd.n_t}), ± one standard "
            f"error. Quality (`difftime.quality.quality_row`): Fréchet distance (FD, jackknife bias-corrected), KID "
            f"(Bińkowski et al. 2018) and precision/recall (Kynkäänniemi et al. 2019) against the "
            f"{first['reference']}{accuracy}, seed {plan.spec.quality.seed}. {interval_note(first)} Costs on this "
            "machine: training wall time (all attempts, start-up included) and steps, sampling wall time per sample, "
            "the prior's draw time per sample.")


def report_markdown(plan: Plan, rows: list[dict[str, Any]], figures: list[str]) -> str:
    """report.md: settings, the main table, the bits/dim table, costs, findings, figures."""
    lines = [f"# T study: {plan.spec.name}", "", *([plan.spec.note.strip(), ""] if plan.spec.note else []),
             _settings(plan, rows[0]), "", "## Main table", "",
             "| T' | score model | prior | sampler | NFE | bpd (ELBO) | FD | KID | precision | recall | train s (steps) "
             "| aux s (steps) | sample s/sample | prior ms/sample |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        source = "trained" if r["source"] == "trained" else f"trunc. from {r['T_train']:g}"
        aux = f"{r['aux_train_s']:.0f} ({r['aux_train_steps']})" if r["aux_train_steps"] else "-"
        lines.append(f"| {r['T']:g} | {source} | {r['prior']} | {r['sampler']} | {r['nfe']} | "
                     f"{_pm(r['bpd_elbo'], r['bpd_elbo_se'])} | {_ci(r, 'fd')} | {_ci(r, 'kid', '.3g')} | {_ci(r, 'precision')} | "
                     f"{_ci(r, 'recall')} | {r['score_train_s']:.0f} ({r['score_train_steps']}) | {aux} | "
                     f"{r['sample_s_per_sample']:.4f} | {r['prior_ms_per_sample']:.3f} |")
    lines += ["", "## Bits/dim and its terms", "", "bpd_elbo = bpd_prior + bpd_diffusion - bpd_reconstruction.", "",
              "| T' | score model | prior | bpd_elbo | bpd_prior | bpd_diffusion | bpd_reconstruction |",
              "|---|---|---|---|---|---|---|"]
    for config in configs(rows):
        r = next(r for r in rows if (r["T"], r["source"], r["prior"]) == config)
        source = "trained" if r["source"] == "trained" else f"trunc. from {r['T_train']:g}"
        lines.append(f"| {r['T']:g} | {source} | {r['prior']} | {_pm(r['bpd_elbo'], r['bpd_elbo_se'])} | "
                     f"{_pm(r['bpd_prior'], r['bpd_prior_se'])} | {_pm(r['bpd_diffusion'], r['bpd_diffusion_se'])} | "
                     f"{r['bpd_reconstruction']:.3f} |")
    lines += baseline_table(plan, rows)
    lines += ["", "## Findings", "", findings(rows, plan.T_max, nfe_to_baseline(plan, rows)[1]), "", "## Figures", ""]
    lines += [f"![{name}]({name})" for name in figures]
    return "\n".join(lines) + "\n"


def findings(rows: list[dict[str, Any]], T_max: float, reached: dict[tuple, int | None] | None = None) -> str:
    """A short paragraph generated from the numbers; it says so where they do not support the paper.
    ``reached``: :func:`nfe_to_baseline`'s NFE per configuration, when the study has a converged reference."""
    out = []
    ref_rows = [r for r in rows if r["T"] == T_max and r["source"] == "trained" and r["prior"] == GAUSSIAN]
    short = [c for c in configs(rows) if c[0] < T_max]
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        refs = [r for r in ref_rows if r["sampler"] == sampler]
        if not refs:
            continue
        ref = max(refs, key=lambda r: r["nfe"])
        for config in short:
            chosen = sorted((r for r in rows if r["sampler"] == sampler and (r["T"], r["source"], r["prior"]) == config),
                            key=lambda r: r["nfe"])
            if not chosen:  # this sampler does not run on this model (spec: samplers[i].models)
                continue
            first = next((r for r in chosen if r["fd_low"] <= ref["fd_high"]), None)
            name = config_name(chosen[0])
            if first is not None:
                better = " (better: its interval lies below)" if first["fd_high"] < ref["fd_low"] else ""
                out.append(f"With {sampler}, {name} reaches the quality of T={T_max:g} with the Gaussian prior at "
                           f"{ref['nfe']} NFE (FD {_ci(ref, 'fd')}) with {first['nfe']} NFE (FD {_ci(first, 'fd')}){better}.")
            else:
                best = min(chosen, key=lambda r: r["fd"])
                out.append(f"With {sampler}, {name} does not reach the quality of T={T_max:g} with the Gaussian prior at "
                           f"{ref['nfe']} NFE (FD {_ci(ref, 'fd')}) at any NFE tested (best FD {_ci(best, 'fd')} at "
                           f"{best['nfe']} NFE): these data do not support the paper's claim for it.")
    out += _bpd_findings(rows, T_max)
    out.insert(0, _verdict_by_baseline(rows, T_max, reached) if reached else _verdict(rows, T_max))
    out.append("(\"Reaches\": the lower end of its FD interval is at or below the upper end of the reference's; "
               "bits/dim differences count only beyond two combined standard errors.)")
    return " ".join(out)


def _verdict(rows: list[dict[str, Any]], T_max: float) -> str:
    """Overall: does some T' < T_max with an auxiliary prior match T_max + Gaussian in bits/dim and
    quality with fewer NFE (the paper's claim, Franzese et al. 2023, Sec. 5)?"""
    refs = {r["sampler"]: r for r in sorted(rows, key=lambda r: r["nfe"])
            if r["T"] == T_max and r["source"] == "trained" and r["prior"] == GAUSSIAN}
    best_recall = max(r["recall"] for r in rows)
    if best_recall < 0.1:
        return (f"Overall, these numbers cannot test the paper's claim on sample quality: the samples cover almost "
                f"none of the reference set (recall <= {best_recall:.2f} everywhere), so every configuration is far "
                "from the data and matching the T_max reference means only being equally poor; train longer.")
    supported = []
    for r in rows:
        ref = refs.get(r["sampler"])
        if ref is None or r["T"] >= T_max or r["prior"] == GAUSSIAN:
            continue
        bpd_ok = r["bpd_elbo"] - ref["bpd_elbo"] <= 2 * math.hypot(r["bpd_elbo_se"], ref["bpd_elbo_se"])
        if bpd_ok and r["nfe"] < ref["nfe"] and r["fd_low"] <= ref["fd_high"]:
            supported.append(f"{config_name(r)} with {r['sampler']} at {r['nfe']} NFE")
    if supported:
        return ("Overall, these numbers support the paper's claim that a shorter T with an auxiliary prior matches "
                f"T={T_max:g} with the Gaussian prior in bits/dim and sample quality at fewer NFE: "
                + "; ".join(supported[:3]) + ".")
    return ("Overall, these numbers do not support the paper's claim: no T' < " f"{T_max:g} with an auxiliary prior "
            f"matches T={T_max:g} with the Gaussian prior in both bits/dim and sample quality at fewer NFE.")


def _verdict_by_baseline(rows: list[dict[str, Any]], T_max: float, reached: dict[tuple, int | None]) -> str:
    """The paper's claim against the strongest T_max route: a T' < T_max with an auxiliary prior supports
    it if its bits/dim are no worse (2 s.e.) and it reaches the converged baseline's FD with fewer NFE than
    the fastest sampler at T_max with the Gaussian prior does (``nfe_to_baseline``)."""
    top = {key[3]: nfe for key, nfe in reached.items()
           if key[:3] == (T_max, "trained", GAUSSIAN) and nfe is not None}
    bpd = {(r["T"], r["source"], r["prior"]): r for r in rows}
    ref = bpd.get((T_max, "trained", GAUSSIAN))
    if not top or ref is None:
        return _verdict(rows, T_max)
    fastest = min(top, key=top.get)
    strongest = f"T={T_max:g} with the Gaussian prior reaches it at {top[fastest]} NFE ({fastest})"
    faster, equal = [], []
    for (T, source, prior, sampler), nfe in reached.items():
        if T >= T_max or prior == GAUSSIAN or nfe is None:
            continue
        r = bpd[(T, source, prior)]
        bpd_ok = r["bpd_elbo"] - ref["bpd_elbo"] <= 2 * math.hypot(r["bpd_elbo_se"], ref["bpd_elbo_se"])
        name = f"{config_name(r)} with {sampler} at {nfe} NFE"
        (faster if nfe < top[fastest] and bpd_ok else equal).append(name)
    if faster:
        return ("Overall, these numbers support the paper's claim that a shorter T with an auxiliary prior matches "
                f"T={T_max:g} in bits/dim and reaches the converged sample quality with fewer NFE: {strongest}; "
                + "; ".join(faster[:3]) + ".")
    if equal:
        return ("Overall, these numbers do not support the paper's claim of fewer NFE: " f"{strongest}, and no "
                f"T' < {T_max:g} with an auxiliary prior does it with fewer NFE at bits/dim no worse "
                f"({'; '.join(equal[:3])}).")
    return (f"Overall, these numbers do not support the paper's claim: {strongest}; no T' < {T_max:g} with an "
            "auxiliary prior reaches that quality at any NFE tested.")


def _bpd_findings(rows: list[dict[str, Any]], T_max: float) -> list[str]:
    by_config = {c: next(r for r in rows if (r["T"], r["source"], r["prior"]) == c) for c in configs(rows)}
    ref = by_config.get((T_max, "trained", GAUSSIAN))
    out = []
    for (T, source, prior), r in by_config.items():
        if ref is None or r is ref:
            continue
        diff = r["bpd_elbo"] - ref["bpd_elbo"]
        se = math.hypot(r["bpd_elbo_se"], ref["bpd_elbo_se"])
        verdict = ("lower than" if diff < -2 * se else "higher than" if diff > 2 * se
                   else "not distinguishable (within 2 s.e.) from")
        out.append(f"{config_name(r)}: bits/dim {_pm(r['bpd_elbo'], r['bpd_elbo_se'])}, {verdict} "
                   f"T={T_max:g} Gaussian ({_pm(ref['bpd_elbo'], ref['bpd_elbo_se'])}); prior term "
                   f"{r['bpd_prior']:.3f} vs {ref['bpd_prior']:.3f}.")
    for (T, source, prior), r in by_config.items():
        trained = by_config.get((T, "trained", prior))
        if source == "truncated" and trained is not None:
            diff = r["bpd_elbo"] - trained["bpd_elbo"]
            se = math.hypot(r["bpd_elbo_se"], trained["bpd_elbo_se"])
            verdict = "indistinguishable from" if abs(diff) <= 2 * se else ("better than" if diff < 0 else "worse than")
            out.append(f"Truncating the T={r['T_train']:g} model at T'={T:g} ({prior}) gives bits/dim "
                       f"{_pm(r['bpd_elbo'], r['bpd_elbo_se'])}, {verdict} the model trained at {T:g} "
                       f"({_pm(trained['bpd_elbo'], trained['bpd_elbo_se'])}).")
    gaps = [(r, by_config.get((T, source, GAUSSIAN))) for (T, source, prior), r in by_config.items() if prior != GAUSSIAN]
    for r, gauss in gaps:
        if gauss is not None:
            helped = r["bpd_prior"] < gauss["bpd_prior"]
            out.append(f"At T={r['T']:g} ({r['source']}) the {r['prior']} prior {'lowers' if helped else 'does not lower'} "
                       f"the prior term ({r['bpd_prior']:.3f} vs Gaussian {gauss['bpd_prior']:.3f} bits/dim)"
                       f"{'' if helped else ', contrary to the paper'}.")
    return out


def is_reference(plan: Plan, row: dict[str, Any]) -> bool:
    """Whether ``row`` is the converged sample of its model (``spec.reference``)."""
    return bool(plan.units[row["unit"]].params.get("reference", False))


def nfe_to_baseline(plan: Plan, rows: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, dict[tuple, int | None]]:
    """The baseline (the reference row of the T = T_max model with the Gaussian prior) and, for each
    (T', source, prior, sampler), the smallest NFE whose FD interval overlaps the baseline's (None: no
    NFE tested does). Intervals overlap when each one's lower end is at or below the other's upper end."""
    base = next((r for r in rows if is_reference(plan, r) and r["T"] == plan.T_max and r["source"] == "trained"
                 and r["prior"] == GAUSSIAN), None)
    if base is None:
        return None, {}
    reached: dict[tuple, int | None] = {}
    for r in sorted((r for r in rows if not is_reference(plan, r)), key=lambda r: r["nfe"]):
        key = (r["T"], r["source"], r["prior"], r["sampler"])
        reached.setdefault(key, None)
        if reached[key] is None and r["fd_low"] <= base["fd_high"] and base["fd_low"] <= r["fd_high"]:
            reached[key] = r["nfe"]
    return base, reached


def baseline_table(plan: Plan, rows: list[dict[str, Any]]) -> list[str]:
    """report.md's ``nfe_to_baseline`` table with its method stated under it (empty without a reference)."""
    base, reached = nfe_to_baseline(plan, rows)
    if base is None:
        return []
    lines = ["", "## NFE to the converged baseline", "", "| T' | score model | prior | sampler | nfe_to_baseline |",
             "|---|---|---|---|---|"]
    for (T, source, prior, sampler), nfe in reached.items():
        row = next(r for r in rows if (r["T"], r["source"], r["prior"], r["sampler"]) == (T, source, prior, sampler))
        model = "trained" if source == "trained" else f"trunc. from {row['T_train']:g}"
        lines.append(f"| {T:g} | {model} | {prior} | {sampler} | {nfe if nfe is not None else '-'} |")
    lines += ["", f"nfe_to_baseline: the smallest NFE tested whose FD interval overlaps the FD interval of the "
              f"baseline, the converged sample ({plan.spec.reference.name}, NFE {base['nfe']}) of the model trained "
              f"at T = {plan.T_max:g} with the Gaussian prior: FD {_ci(base, 'fd')}; '-': no NFE tested reaches it."]
    return lines
