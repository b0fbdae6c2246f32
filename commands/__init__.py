"""What the commands do: the application layer above the maths core and the Lightning systems.

* :mod:`commands.cli`: ``train.py`` / ``difftime-train``, the LightningCLI with its config checks
  and run folder (version pinning, resume choice, checkpoint fallback, lock, tidy-up).
* :mod:`commands.run_folder`: the run folder of ``fit`` (pinned version, resume and its notice,
  checkpoint fallback, tidy-up); :mod:`commands.run_lock`: its lock (one ``fit`` at a time).
* :mod:`commands.config_errors`: a refused config as one line naming the key (``did you mean``).
* :mod:`commands.runs`: a trained run rebuilt from its config and checkpoint (``load_run``), and
  the one check that a checkpoint matches a config.
* :mod:`commands.sampling`: ``sample.py`` / ``difftime-sample`` as functions (``sample(options)``).
* :mod:`commands.study`: ``study.py`` / ``difftime-study``.

Entry scripts (``train.py``, ``sample.py``, ``study.py``) are doors into these modules; nothing
imports them.
"""
