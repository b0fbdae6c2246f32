"""Generate samples from a trained ScoreModule: a PNG grid and an ``.npz`` array.

    python sample.py --config runs/quickstart/default/config.yaml --n 64 --out samples/quickstart

Options and outputs: ``python sample.py --help`` and :mod:`commands.sampling` (also the
``difftime-sample`` console script, ``sample(SampleOptions(...))`` from Python, and
``commands.runs.load_run`` to rebuild a trained run in a notebook).
"""

from commands.sampling import cli_main

if __name__ == "__main__":
    cli_main()
