"""A sweep below 15 NFE at T = 1 (oracle score, N(0, I) prior) on the ring mixture of sampler_nfe.py.

Looks for a DPM-Solver++ configuration that reaches converged quality (sampler_nfe.py's criterion:
|Delta E[log p]| <= 0.05 nats and Delta MMD^2 <= 2 se of the data floor, against the dopri5
reference of the same x_T) at <= 10 NFE: Karras rho in {5, 7}, LogSNR, fitted (DP) and refined grids
(:mod:`difftime.grid_fit`, 512 pilot samples of N(0, I) with their own seed, 240 candidates; refined:
tuned to each variant and step count, 2 sweeps from the DP and the LogSNR grid), order 2
and 3, with and without the UniC-style corrector and the final Tweedie step. Each configuration
runs from two independent x_T draws of 3 x 1000 samples; a cell reads
``NFE:marks(Delta E[log p], Delta MMD^2 x 1e3 of the first draw)``, a mark per draw (Y converged).
Results: ``benchmarks/results/sampler_nfe_t1_sweep.txt``.

    python benchmarks/sampler_nfe_t1_sweep.py    # about 2 minutes on one thread
"""

from __future__ import annotations

from common import PILOT_N, REFINE_SWEEPS, converged, make_case, oracle_at_T1, references
from difftime.grid_fit import refine_grid
from difftime.samplers import DPMSolverPP
from difftime.schedules import KarrasRho, LogSNR, Tabulated

NFES = (6, 7, 8, 9, 10, 12)
VARIANTS = {"2M": dict(order=2, corrector=False), "2M+UniC": dict(order=2, corrector=True),
            "3M+UniC": dict(order=3, corrector=True), "2M+UniC+Tweedie": dict(order=2, corrector=True, denoise=True),
            "2M+UniC exact": dict(order=2, corrector=True, variant="exact")}


def main() -> None:
    args, evaluator, floor, contender = oracle_at_T1()
    sde = contender.sde
    cases = [make_case(contender, args.reps * args.n, args.seed, index) for index in (0, 1)]
    for case in cases:
        references(case, evaluator, args)
    costs = cases[0].fitted()
    refs = ", ".join(f"{c.refs['ode']['logp'].mean:.3f}" for c in cases)
    print(f"references E[log p] {refs}; MMD^2 floor "
          f"(2 se) {floor * 1e3:.2f}e-3; fitted grids: {costs.nfe} NFE on {PILOT_N} pilot samples, "
          f"{cases[0].fit_seconds:.1f} s")
    def refined(steps: int, options: dict) -> Tabulated:
        on = lambda schedule: DPMSolverPP(steps=steps, schedule=schedule, **options)  # noqa: E731
        return refine_grid(costs, on, contender.score_fn, sde, {"dp": costs.schedule(steps), "log_snr": LogSNR()},
                           steps, sweeps=REFINE_SWEEPS).schedule

    grids = {"karras rho=5": lambda n, o: KarrasRho(5.0), "karras rho=7": lambda n, o: KarrasRho(7.0),
             "log_snr": lambda n, o: LogSNR(), "fitted": lambda n, o: costs.schedule(n), "refined": refined}
    for grid_name, grid in grids.items():
        for name, options in VARIANTS.items():
            cells = []
            for nfe in NFES:
                steps = nfe - int(options.get("denoise", False))
                sampler = DPMSolverPP(steps=steps, schedule=grid(steps, options), **options)
                marks, first = "", None
                for case in cases:
                    x, info = sampler(contender.score_fn, sde, case.x_T)
                    m, ref = evaluator(x), case.refs["ode"]
                    marks += "Y" if converged(m, ref, floor) else "."
                    first = first or (m["logp"].mean - ref["logp"].mean, 1e3 * (m["mmd2"].mean - ref["mmd2"].mean))
                cells.append(f"{info['nfe']}:{marks}({first[0]:+.3f},{first[1]:+.2f})")
            print(f"{grid_name + ' ' + name:30s} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
