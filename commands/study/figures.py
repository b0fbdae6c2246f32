"""The report's figures: bits/dim terms against T', Fréchet distance against NFE, samples side by side."""

from __future__ import annotations

import math
from typing import Any

from commands.study.plan import Plan
from commands.study.records import load_samples


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def config_name(row: dict[str, Any]) -> str:
    source = "trained" if row["source"] == "trained" else f"trunc. from {row['T_train']:g}"
    return f"T={row['T']:g} ({source}), {row['prior']}"


def configs(rows: list[dict[str, Any]]) -> list[tuple[float, str, str]]:
    """The (T', source, prior) evaluated, in row order."""
    return list(dict.fromkeys((r["T"], r["source"], r["prior"]) for r in rows))


def figure_bpd(rows: list[dict[str, Any]]) -> Any:
    """ELBO bits/dim and its three terms against T', one line per (prior, source), s.e. error bars."""
    plt = _pyplot()
    terms = (("bpd_elbo", "bpd_elbo_se"), ("bpd_prior", "bpd_prior_se"), ("bpd_diffusion", "bpd_diffusion_se"),
             ("bpd_reconstruction", None))
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    points = {(r["T"], r["source"], r["prior"]): r for r in rows}
    for prior, source in dict.fromkeys((r["prior"], r["source"]) for r in rows):
        chosen = sorted((k[0], v) for k, v in points.items() if k[1] == source and k[2] == prior)
        for axis, (key, se) in zip(axes, terms):
            axis.errorbar([T for T, _ in chosen], [r[key] for _, r in chosen],
                          yerr=[r[se] for _, r in chosen] if se else None, marker="o" if source == "trained" else "s",
                          linestyle="-" if source == "trained" else "--", capsize=3, label=f"{prior}, {source}")
    for axis, (key, _) in zip(axes, terms):
        axis.set_xlabel("T'")
        axis.set_title(key.replace("bpd_", "") + " (bits/dim)", fontsize=10)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def _curve(rows: list[dict[str, Any]], sampler: str, config: tuple[float, str, str]) -> list[dict[str, Any]]:
    return sorted((r for r in rows if r["sampler"] == sampler and (r["T"], r["source"], r["prior"]) == config),
                  key=lambda r: r["nfe"])


def figure_quality(rows: list[dict[str, Any]]) -> Any:
    """Fréchet distance (jackknife interval) against NFE, one panel per sampler, one curve per (T', source,
    prior) in the same colour on every panel; the converged references (``reference_*`` rows) are bands
    drawn on every panel, not panels of their own. Symmetric-log y axis: FD spans 0 to hundreds."""
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    refs = [r for r in rows if r["sampler"].startswith("reference_")]
    rows = [r for r in rows if not r["sampler"].startswith("reference_")]
    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    colours = {config: f"C{i % 10}" for i, config in enumerate(configs(rows + refs))}
    fig, axes = plt.subplots(1, len(samplers), figsize=(5.2 * len(samplers), 4.2), squeeze=False, sharey=True)
    for axis, sampler in zip(axes[0], samplers):
        for ref in refs:
            config = (ref["T"], ref["source"], ref["prior"])
            axis.axhspan(ref["fd_low"], ref["fd_high"], color=colours[config], alpha=0.12)
            axis.axhline(ref["fd"], color=colours[config], linestyle=":", linewidth=1,
                         label=f"{config_name(ref)}, {ref['sampler'].removeprefix('reference_')} {ref['nfe']} NFE "
                               "(converged reference)")
        for config in configs(rows):
            chosen = _curve(rows, sampler, config)
            if not chosen:  # a sampler entry restricted to some models (spec: samplers[i].models)
                continue
            # draw the interval itself, not symmetric error bars around the point
            nfe = [r["nfe"] for r in chosen]
            axis.plot(nfe, [r["fd"] for r in chosen], marker="o", color=colours[config], label=config_name(chosen[0]))
            axis.vlines(nfe, [r["fd_low"] for r in chosen], [r["fd_high"] for r in chosen], color=colours[config],
                        alpha=0.6)
        ticks = sorted({r["nfe"] for r in rows if r["sampler"] == sampler})
        axis.set_xscale("log")
        axis.set_xticks(ticks)
        axis.xaxis.set_major_formatter(ScalarFormatter())
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.set_yscale("symlog", linthresh=10)
        axis.set_xlabel("NFE per sample")
        axis.set_title(sampler, fontsize=10)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("Fréchet distance (features), 95 % interval")
    handles = {label: handle for axis in axes[0] for handle, label in zip(*axis.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(4, len(handles)), fontsize=8,
               bbox_to_anchor=(0.5, -0.02 - 0.035 * math.ceil(len(handles) / 4)))
    fig.tight_layout()
    return fig


def figure_samples(plan: Plan, rows: list[dict[str, Any]]) -> Any:
    """The same seeds' samples side by side for each (T', source, prior) that has the most common
    sampler, all at the largest NFE they share (each at its own largest if they share none)."""
    from difftime.render import image_grid

    plt = _pyplot()
    tags = [r["sampler"] for r in rows]
    sampler = max(dict.fromkeys(tags), key=tags.count)
    curves = {config: _curve(rows, sampler, config) for config in configs(rows)}
    curves = {config: curve for config, curve in curves.items() if curve}
    shared = set.intersection(*({r["nfe"] for r in curve} for curve in curves.values()))
    columns = min(5, len(curves))
    fig, axes = plt.subplots(math.ceil(len(curves) / columns), columns, figsize=(3.2 * columns,
                             3.6 * math.ceil(len(curves) / columns)), squeeze=False)
    for axis in axes.flat[len(curves):]:
        axis.axis("off")
    n = plan.spec.quality.grid
    for axis, curve in zip(axes.flat, curves.values()):
        row = next(r for r in curve if r["nfe"] == max(shared)) if shared else curve[-1]
        samples = load_samples(plan.units[row["unit"]])[:n]
        if samples.dtype.is_floating_point:
            axis.scatter(samples[:, 0], samples[:, -1], s=6)
            axis.set_aspect("equal")
        else:
            grid = image_grid(samples, nrow=int(math.sqrt(n)), min_width=256)
            axis.imshow(grid.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", interpolation="nearest")
            axis.axis("off")
        axis.set_title(f"{config_name(row)}\n{sampler}, NFE {row['nfe']}", fontsize=8)
    fig.suptitle(f"seeds {plan.spec.seed}..{plan.spec.seed + n - 1}, the same for every panel", fontsize=9, y=1.04)
    fig.tight_layout()
    return fig
