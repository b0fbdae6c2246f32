"""The diffusion-time study as one command: ``python study.py --config configs/study/toy_tiny.yaml [--dry-run]``.

What it does is described in :mod:`commands.study`, which also serves the ``difftime-study`` console script.
"""

from commands.study.cli import cli_main

if __name__ == "__main__":
    cli_main()
