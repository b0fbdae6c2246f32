"""``python -m commands.study.train fit --config unit.yaml``: ``train.py fit`` as a study's fit unit runs it
(in a subprocess of the study, with whichever interpreter runs the study, installed or not)."""

import sys

from commands.cli import cli_main

if __name__ == "__main__":
    sys.argv[0] = "train.py"  # the program name of the CLI's messages
    cli_main()
