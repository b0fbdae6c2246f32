"""The diffusion-time study as one command (Franzese et al. 2023, "How Much is Enough?").

    study.py --config configs/study/digits_cpu.yaml [--dry-run] [--executor local|slurm] [--stage ...]

A typed YAML spec (:class:`StudySpec`) names the base score and auxiliary-prior configs, the T
grid (each T trained, truncated from the model trained at T_max, or both), the priors, the
samplers with their NFE budgets (constructor options, labels), an optional converged reference
sampler, the metrics, sample counts and seeds. Everything the run will use is checked before any
work; a bad value fails naming its key.

Units of work, each in its own folder ``<out>/units/<kind>/<label>-<hash>`` named by a hash of
its resolved config (changing one spec value re-runs only the units it affects; a fit's hash covers
:func:`training_identity`, without the evaluation-only keys):

==========  ==========  ========================================================================
stage       kind        what runs
==========  ==========  ========================================================================
train       score       ``train.py fit`` of the score model at T (resumed exactly when interrupted)
train       classifier  the digit classifier of the quality metrics (:mod:`difftime.quality`)
aux         aux         ``train.py fit`` of an AuxPriorModule at each T' that needs one
evaluate    bpd         callbacks.BitsPerDim at T' with one prior (:func:`commands.runs.load_run`)
evaluate    sample      :func:`commands.sampling.sample` (sampler, steps for the NFE budget, seeds)
report      report      quality metrics, ``report.md``, ``results.csv``, figures, TensorBoard
==========  ==========  ========================================================================

A unit is done when the outputs it recorded on finishing (``done.json``: each file with its
SHA-256) still verify; a unit whose record does not verify runs again, and the study says which
file. A second invocation skips done units and re-runs the others (fit units resume from their
newest valid checkpoint through train.py).

Modules: :mod:`~commands.study.spec` (the typed spec), :mod:`~commands.study.check` (checks before
any work), :mod:`~commands.study.config` (layering and hashing), :mod:`~commands.study.nfe` (NFE
budgets to steps), :mod:`~commands.study.plan` (units), :mod:`~commands.study.records` (done
records), :mod:`~commands.study.units` (running a unit), :mod:`~commands.study.estimates` (costs),
:mod:`~commands.study.report`, :mod:`~commands.study.findings`, :mod:`~commands.study.figures`,
:mod:`~commands.study.executors` (local, SLURM) and :mod:`~commands.study.cli`.
"""

from commands.study.check import check_fit_configs, check_spec, load_spec
from commands.study.cli import cli_main, main, print_plan
from commands.study.config import (FIT_KINDS, build_object, digest, merge, merge_layers, model_config, set_key,
                                   training_identity)
from commands.study.estimates import Rates, estimate
from commands.study.nfe import steps_for_nfe
from commands.study.plan import STAGES, Plan, Unit, make_plan
from commands.study.records import OutputError, load_samples, read_result, record_problem, status, write_record
from commands.study.spec import (AuxSpec, BpdSpec, CostSpec, ModelSpec, QualitySpec, ReferenceSpec, SamplerSpec,
                                 SpecError, SpecFileError, StudySpec, TEntry)
from commands.study.units import UnitError, run_unit

__all__ = ["AuxSpec", "BpdSpec", "CostSpec", "FIT_KINDS", "ModelSpec", "OutputError", "Plan", "QualitySpec", "Rates",
           "ReferenceSpec", "STAGES", "SamplerSpec", "SpecError", "SpecFileError", "StudySpec", "TEntry", "Unit",
           "UnitError",
           "build_object", "check_fit_configs", "check_spec", "cli_main", "digest", "estimate", "load_samples",
           "load_spec", "main", "make_plan", "merge", "merge_layers", "model_config", "print_plan", "read_result",
           "record_problem", "run_unit", "set_key", "status", "steps_for_nfe", "training_identity", "write_record"]
