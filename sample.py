"""Generate samples from a trained ScoreModule: a PNG grid and an ``.npz`` array.

    python sample.py --config runs/quickstart/default/config.yaml --n 64 --out samples/quickstart

Options and outputs: ``python sample.py --help`` and :mod:`commands.sampling` (also the
``difftime-sample`` console script, and ``sample(SampleOptions(...))`` from Python).
"""

from commands.runs import build, load_run, load_weights, run_config  # noqa: F401  (older callers)
from commands.sampling import cli_main, fitted_sampler, main, real_images  # noqa: F401

if __name__ == "__main__":
    cli_main()
