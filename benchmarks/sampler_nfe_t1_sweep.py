"""A sweep below 15 NFE at T = 1 (oracle score, N(0, I) prior) on the ring mixture of sampler_nfe.py.

Looks for a DPM-Solver++ configuration that reaches converged quality (sampler_nfe.py's criterion:
|Delta E[log p]| <= 0.05 nats and Delta MMD^2 <= 2 se of the data floor, against the dopri5
reference) at <= 12 NFE: Karras rho in {3, 5, 7, 10} and log-SNR grids, order 2 and 3 with the
UniC-style corrector, with and without the final Tweedie step. Each cell prints
``NFE:Y/.(Delta E[log p], Delta MMD^2 x 1e3)``. Result (benchmarks/results/sampler_nfe_t1_sweep.txt):
no configuration converges at <= 12 NFE. The closest is log-SNR, order 2 + UniC, no Tweedie step:
at 10 NFE -0.055 nats and +1.95e-3 MMD^2, at 12 NFE -0.035 nats and +0.43e-3 (the floor is
0.42e-3). Karras grids are worse at T = 1 on these data (rho = 3 diverges; rho >= 5 stays 0.1-1
nats off up to 12 NFE).

    python benchmarks/sampler_nfe_t1_sweep.py    # about 4 minutes on one shared thread
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import sampler_nfe as sn  # noqa: E402
import t_tradeoff_gmm as tt  # noqa: E402
from difftime.samplers import DPMSolverPP  # noqa: E402
from difftime.schedules import KarrasRho, LogSNR, Schedule  # noqa: E402

NFES = (6, 7, 8, 9, 10, 12)


def configurations() -> dict[str, tuple[Schedule, int, bool]]:
    grids = {f"karras rho={rho:g}": KarrasRho(rho) for rho in (3.0, 5.0, 7.0, 10.0)} | {"log_snr": LogSNR()}
    return {f"{name} order {order} +UniC{' +Tweedie' if den else ''}": (grid, order, den)
            for name, grid in grids.items() for order in (2, 3) for den in (False, True)}


def main() -> None:
    sys.argv[1:] = ["--score", "oracle"]
    args = sn.parse_args()
    torch.set_num_threads(1)
    tt._quiet()
    data = tt.make_data(args)
    dirs = torch.randn(args.directions, 2, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
    evaluator = tt.Evaluator(data, tt.fresh_sets(data, args, offset=0), dirs / dirs.norm(dim=1, keepdim=True),
                             args.mmd_bandwidth, args.mmd_n)
    floor = 2.0 * evaluator(torch.cat(tt.fresh_sets(data, args, offset=1000)))["mmd2"].se
    sde = tt.VPSDE(T=1.0, eps=args.eps)
    contender = tt.Contender("oracle", 1.0, "gaussian", sde.prior((2,)), sde, tt.oracle_score_fn(data, sde))
    case = sn.make_case(contender, args.reps * args.n, args.seed, 0)
    sn.references(case, evaluator, args)
    ref = case.refs["ode"]
    print(f"reference E[log p] {ref['logp'].mean:.3f}, MMD^2 floor (2 se) {floor * 1e3:.2f}e-3")
    for name, (grid, order, den) in configurations().items():
        cells = []
        for nfe in NFES:
            sampler = DPMSolverPP(steps=nfe - int(den), order=order, corrector=True, denoise=den, schedule=grid)
            x, info = sampler(contender.score_fn, sde, case.x_T)
            m = evaluator(x)
            mark = "Y" if sn.converged(m, ref, floor) else "."
            cells.append(f"{info['nfe']}:{mark}({m['logp'].mean - ref['logp'].mean:+.3f},"
                         f"{1e3 * (m['mmd2'].mean - ref['mmd2'].mean):+.2f})")
        print(f"{name:40s} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
