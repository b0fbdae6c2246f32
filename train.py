"""difftime command line: ``python train.py {fit,validate,test,predict} --config ...``.

A LightningCLI over layered YAML; what it adds (config checks before any work, the pinned and
locked run folder, verified checkpoints, resume) is described in :mod:`commands.cli`, which also
serves the ``difftime-train`` console script.
"""

from commands.cli import cli_main

if __name__ == "__main__":
    cli_main()
