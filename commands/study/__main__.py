"""``python -m commands.study ...``: the study's command line (:mod:`commands.study.cli`)."""

from commands.study.cli import cli_main

cli_main()
