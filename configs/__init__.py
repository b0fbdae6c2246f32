"""The shipped LightningCLI configs (YAML only), installed as package data.

Base configs per dataset (``<name>.yaml``), auxiliary priors (``aux/``), diffusion times
(``T/``) and study specs (``study/``). The code that finds them after a non-editable install
is :mod:`commands.config_files`.
"""
