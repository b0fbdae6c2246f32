"""How much does a fitted grid depend on its pilot batch? (T = 1, oracle score, ring mixture.)

For pilot seeds 1-4 and pilot sizes 64 and 512 (N(0, I) draws), :func:`difftime.grid_fit.grid_costs`
fits the DP grids (and :func:`difftime.grid_fit.refine_grid` tunes them to each sampler and step count,
2 sweeps from the DP and the LogSNR grid), and DPM-Solver++(2M) with and without the UniC-style corrector runs on them at 8, 9,
10 and 12 NFE from the x_T of ``sampler_nfe.py`` (case 0), against its dopri5 reference and
convergence criterion. A cell reads ``NFE:mark(Delta E[log p], Delta MMD^2 x 1e3)``, Y converged.
Results: ``benchmarks/results/fitted_grid/pilot_seeds.txt``.

    python benchmarks/fitted_grid_pilots.py     # about 4 minutes on one thread
"""

from __future__ import annotations

import torch

from common import REFINE_SWEEPS, converged, make_case, oracle_at_T1, references
from difftime.grid_fit import grid_costs, refine_grid
from difftime.samplers import DPMSolverPP
from difftime.schedules import LogSNR

NFES = (8, 9, 10, 12)


def main() -> None:
    args, evaluator, floor, contender = oracle_at_T1()
    sde = contender.sde
    case = make_case(contender, args.reps * args.n, args.seed, 0)
    references(case, evaluator, args)
    ref = case.refs["ode"]
    print("grid, pilot seed, size | DPM++2M+UniC at 8 9 10 12 NFE | DPM++2M at 8 9 10 12 NFE")
    for refined, seed, size in [(r, seed, size) for r in (False, True) for seed in (1, 2, 3, 4) for size in (64, 512)]:
        pilot = sde.prior((2,)).sample(size, torch.Generator().manual_seed(seed))
        costs = grid_costs(contender.score_fn, sde, pilot)
        cells = []
        for corrector in (True, False):
            for nfe in NFES:
                grid = costs.schedule(nfe)
                if refined:
                    on = lambda schedule: DPMSolverPP(steps=nfe, corrector=corrector, schedule=schedule)  # noqa: E731
                    grid = refine_grid(costs, on, contender.score_fn, sde, {"dp": grid, "log_snr": LogSNR()}, nfe,
                                       sweeps=REFINE_SWEEPS).schedule
                sampler = DPMSolverPP(steps=nfe, order=2, corrector=corrector, schedule=grid)
                m = evaluator(sampler(contender.score_fn, sde, case.x_T)[0])
                cells.append(f"{nfe}:{'Y' if converged(m, ref, floor) else '.'}"
                             f"({m['logp'].mean - ref['logp'].mean:+.3f},{1e3 * (m['mmd2'].mean - ref['mmd2'].mean):+.2f})")
        print(f"{'refined' if refined else 'DP':7s} {seed} {size:4d} | " + " ".join(cells[:4]) + " | "
              + " ".join(cells[4:]), flush=True)


if __name__ == "__main__":
    main()
