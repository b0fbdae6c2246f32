"""Cluster jobs on a real SLURM (the one-node cluster of ``scripts/local_slurm.sh``): preemption by
``scancel --signal=USR1``, requeue through the real ``scontrol``, a time limit with
``--signal=USR1@N``, and the study's array jobs chained with ``--dependency=afterok``.

Independent answers: an uninterrupted run of the same config (every tensor of the model, EMA and
optimizer state bit for bit), the local executor's run of the same study spec, and SLURM's own
job records (``scontrol show job``: JobState, Restarts, ExitCode, start and end times).

Also: a SIGUSR1 that arrives before training starts does not kill the job.

The scenarios run side by side: one module fixture submits them all at once and each test waits
for its own (the node shares its 2 CPUs among up to 8 jobs that mostly wait). Without a running
cluster every test here is skipped with the reason (``tests/conftest.py``). Also here, unmarked:
files are created with the umask's permissions (group-readable checkpoints on a shared cluster),
and the templates' argument lists (a stand-in ``srun``: the exact order the real one hides).
"""

from __future__ import annotations

import csv
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from slurm_helpers import ROOT, job, job_env, job_records, sbatch, wait_finished, wait_until

TOY = "configs/toy_gaussian.yaml"
MAX_STEPS, CKPT_EVERY = 400, 50
TIMEOUT = 420  # seconds any one scenario may take on a loaded 2-core machine


# ---------------------------------------------------------------------- configs and specs
def train_layer(folder: Path, name: str, sleep: float) -> Path:
    """A layer over configs/toy_gaussian.yaml: a few hundred steps, a checkpoint every 50, runs under
    ``folder/runs``; ``sleep`` seconds per step in a job's first attempt (slurm_callbacks)."""
    layer = {"trainer": {
        "max_steps": MAX_STEPS, "log_every_n_steps": 50, "val_check_interval": 200, "limit_val_batches": 1,
        "enable_progress_bar": False, "enable_model_summary": False,
        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                   "init_args": {"save_dir": str(folder / "runs"), "name": name, "version": None}},
        "callbacks": [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"filename": "{step:08d}", "every_n_train_steps": CKPT_EVERY, "save_last": True,
                           "save_top_k": -1}},
            {"class_path": "slurm_callbacks.SlowFirstAttempt", "init_args": {"seconds": sleep}}]}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(layer))
    return path


def study_spec(folder: Path, name: str, fail_aux_while: Path | None = None) -> Path:
    """configs/study/toy_tiny.yaml cut to 5 units (score fit at T = 1, RealNVP prior at T' = 0.4,
    one bits/dim and one sample unit, the report); a score fit of 300 steps, slow in its first
    attempt (so it can be preempted between checkpoints); optionally an aux fit that fails while
    ``fail_aux_while`` exists."""
    spec = yaml.safe_load((ROOT / "configs/study/toy_tiny.yaml").read_text())
    spec.update(out=str(folder / name), T=[{"T": 1.0, "mode": "trained"}, {"T": 0.4, "mode": "truncated"}],
                priors=["realnvp"], samplers=[{"name": "dpm_solver_pp", "nfe": [4]}])
    spec["score"].update(steps=300, remove_callbacks=[])
    spec["score"]["overrides"] = {
        "trainer.callbacks": [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"filename": "{step:08d}", "every_n_train_steps": 30, "save_last": True}},
            {"class_path": "slurm_callbacks.SlowFirstAttempt", "init_args": {"seconds": 0.05}}],
        "trainer.val_check_interval": 60, "trainer.limit_val_batches": 1, "trainer.log_every_n_steps": 30,
        "trainer.enable_progress_bar": False, "data.init_args.n_train": 4000}
    if fail_aux_while is not None:
        aux = spec["aux_priors"]["realnvp"]
        aux["remove_callbacks"] = []
        aux["overrides"] = {k: v for k, v in aux["overrides"].items() if not k.startswith("trainer.callbacks")}
        aux["overrides"]["trainer.callbacks"] = [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"filename": "{step:08d}", "every_n_train_steps": 20, "save_last": True}},
            {"class_path": "slurm_callbacks.FailWhileExists", "init_args": {"path": str(fail_aux_while)}}]
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


# ---------------------------------------------------------------------- launching
def submit_train(folder: Path, name: str, sleep: float, *sbatch_args: str) -> str:
    """scripts/slurm_train.sh on the CPU node (GPU request off, one task); umask 027 at submission."""
    args = ["--job-name", f"difftime-{name}", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
            f"--output={folder}/{name}-%j.out", *sbatch_args, "scripts/slurm_train.sh", TOY,
            "--config", str(train_layer(folder, name, sleep))]
    return sbatch(args, job_env(), umask=0o027)


def study_env(folder: Path) -> dict[str, str]:
    """The study's SLURM template on the CPU node: no GPU request, one CPU per task, logs in ``folder``."""
    return job_env(GPUS_PER_TASK="0", CPUS_PER_TASK="1", TIME_TRAIN="0:15:00", TIME_EVAL="0:15:00",
                   PARTITION_ARGS=f"--output={folder}/%x-%A_%a.out")


def start_study(spec: Path, env: dict[str, str]) -> subprocess.Popen:
    """``python study.py --config SPEC --executor slurm`` (it submits the stages one after the other)."""
    return subprocess.Popen([sys.executable, "study.py", "--config", str(spec), "--executor", "slurm"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def submitted(process: subprocess.Popen) -> dict[str, str | None]:
    """The job id of each stage the study printed (None: nothing to do)."""
    out, err = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, err[-3000:]
    line = next(l for l in out.splitlines() if l.startswith("submitted:"))
    ids = dict(part.strip().split(" ") for part in line.removeprefix("submitted:").split(","))
    return {stage: None if value == "none" else value for stage, value in ids.items()}


def stage_jobs(spec: Path) -> dict[str, str]:
    """Queued or running jobs of the study ``spec`` by stage (their command names the stage and spec)."""
    out = subprocess.run(["squeue", "-h", "-o", "%A|%o"], capture_output=True, text=True, timeout=30).stdout
    jobs = {}
    for line in out.splitlines():
        job_id, _, command = line.partition("|")
        words = command.split()
        if str(spec) in words and "--task" in words:
            jobs[words[words.index("--task") + 1]] = job_id
    return jobs


def checkpoints(run_root: Path) -> list[Path]:
    return sorted(run_root.glob("*/checkpoints/step=*.ckpt"))


class Scenario(threading.Thread):
    """Runs ``body`` beside the other scenarios; ``result()`` re-raises its failure in the test."""

    def __init__(self, body, *args) -> None:
        super().__init__(daemon=True)
        self.body, self.args, self.value, self.error = body, args, None, None
        self.start()

    def run(self) -> None:
        try:
            self.value = self.body(*self.args)
        except BaseException as error:  # noqa: BLE001 - handed to the test
            self.error = error

    def result(self):
        self.join(TIMEOUT * 2)
        assert not self.is_alive(), f"{self.body.__name__} still running"
        if self.error is not None:
            raise self.error
        return self.value


def preempt_after_checkpoints(folder: Path) -> dict:
    """Scenario 1: the train template, SIGUSR1 by scancel after two checkpoints."""
    job_id = submit_train(folder, "preempt", 0.03)
    runs = folder / "runs" / "preempt"
    wait_until(lambda: len(checkpoints(runs)) >= 2, TIMEOUT, "two checkpoints of the first attempt")
    sent = subprocess.run(["scancel", "--signal=USR1", job_id], capture_output=True, text=True)
    assert sent.returncode == 0, sent.stderr
    return {"job": job_id, "record": wait_finished(job_id, TIMEOUT)[0], "runs": runs}


def time_limit(folder: Path) -> dict:
    """Scenario 4: 400 steps at 0.3 s (first attempt) cannot fit in --time=3; USR1 90 s before the end
    (SLURM sends it up to a minute early: never before the run has started training)."""
    job_id = submit_train(folder, "timelimit", 0.3, "--time=3", "--signal=USR1@90")
    start = time.monotonic()
    wait_until(lambda: job(job_id).get("Restarts") == "1", TIMEOUT, "the time-limited job to be requeued")
    requeued_after = time.monotonic() - start
    return {"job": job_id, "record": wait_finished(job_id, TIMEOUT)[0], "runs": folder / "runs" / "timelimit",
            "requeued_after": requeued_after}


def warning_at_startup(folder: Path) -> dict:
    """SIGUSR1 while train.py still imports (SLURM sends --signal=USR1@N up to a minute early)."""
    job_id = submit_train(folder, "early", 0.0)
    steps = ["squeue", "-h", "-s", "-j", job_id, "-o", "%i"]
    wait_until(lambda: f"{job_id}.0" in subprocess.run(steps, capture_output=True, text=True).stdout.split(), TIMEOUT,
               "srun's step")
    time.sleep(1.0)  # the task's shell has set the disposition; python takes seconds to import
    runs = folder / "runs" / "early"
    sent = subprocess.run(["scancel", "--signal=USR1", job_id], capture_output=True, text=True)
    assert sent.returncode == 0, sent.stderr
    early = not any(runs.glob("*/checkpoints/*.ckpt"))
    return {"job": job_id, "record": wait_finished(job_id, TIMEOUT)[0], "runs": runs, "early": early}


def reference_run(folder: Path) -> Path:
    """The same config uninterrupted, outside SLURM: the independent answer for scenarios 1 and 4."""
    env = {k: v for k, v in job_env().items() if not k.startswith("SLURM")}
    result = subprocess.run([sys.executable, "train.py", "fit", "--config", TOY, "--config",
                             str(train_layer(folder, "reference", 0.0)), "--trainer.logger.init_args.version", "run"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "runs" / "reference" / "run" / "checkpoints" / "last.ckpt"


def study_on_slurm(folder: Path) -> dict:
    """Scenario 2: the study through the SLURM executor; its score fit preempted once, after its first
    checkpoint (the stages are submitted while it trains). Each stage's dependency is read while it waits."""
    spec = study_spec(folder, "slurm_study")
    process = start_study(spec, study_env(folder))
    fits, dependencies, preempted = folder / "slurm_study" / "units" / "score", {}, False
    deadline = time.monotonic() + TIMEOUT
    while process.poll() is None or not preempted or len(dependencies) < 2:
        assert time.monotonic() < deadline, f"study: preempted {preempted}, dependencies seen {dependencies}"
        jobs = stage_jobs(spec)
        for stage in ("evaluate", "report"):
            if stage in jobs and stage not in dependencies:
                dependency = job_records(jobs[stage])[0].get("Dependency", "(null)")
                if dependency != "(null)":
                    dependencies[stage] = dependency
        if not preempted and "train" in jobs and any(fits.glob("*/checkpoints/step=*.ckpt")):
            sent = subprocess.run(["scancel", "--signal=USR1", f"{jobs['train']}_0"], capture_output=True, text=True)
            assert sent.returncode == 0, sent.stderr
            preempted = True
        time.sleep(0.3)
    ids = submitted(process)
    records = {stage: wait_finished(ids[stage], TIMEOUT) for stage in ("train", "aux", "evaluate", "report")}
    return {"ids": ids, "dependencies": dependencies, "records": records, "out": folder / "slurm_study"}


def study_local(folder: Path) -> Path:
    """The same study spec with the local executor (another output folder)."""
    spec = study_spec(folder, "local_study")
    env = {k: v for k, v in job_env().items() if not k.startswith("SLURM")}
    result = subprocess.run([sys.executable, "study.py", "--config", str(spec)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "local_study"


def failing_task(folder: Path) -> dict:
    """Scenario 3: the aux array task fails; the chain stops; fixed and resubmitted."""
    marker = folder / "broken"
    marker.touch()
    spec = study_spec(folder, "failing_study", fail_aux_while=marker)
    env = study_env(folder)
    first = submitted(start_study(spec, env))
    aux = wait_finished(first["aux"], TIMEOUT)
    train = wait_finished(first["train"], TIMEOUT)
    stopped = {}
    for stage in ("evaluate", "report"):  # never start: cancelled, or pending on a dependency that cannot be met
        stopped[stage] = wait_until(lambda s=stage: _stopped(job_records(first[s])), 60, f"the {stage} job to stop")
        subprocess.run(["scancel", first[stage]], capture_output=True)
    marker.unlink()
    second = submitted(start_study(spec, env))
    report = wait_finished(second["report"], TIMEOUT)
    return {"first": first, "aux": aux, "train": train, "stopped": stopped, "second": second, "report": report,
            "out": folder / "failing_study"}


def _stopped(records: list[dict[str, str]]) -> list[dict[str, str]] | None:
    if all(r.get("JobState") == "CANCELLED" or "DependencyNeverSatisfied" in r.get("Reason", "") for r in records):
        return records
    return None


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    """All scenarios at once; each test waits only for its own."""
    folder = tmp_path_factory.mktemp("slurm")
    started = time.monotonic()
    running = {"reference": Scenario(reference_run, folder), "preempt": Scenario(preempt_after_checkpoints, folder),
               "timelimit": Scenario(time_limit, folder), "early": Scenario(warning_at_startup, folder),
               "study": Scenario(study_on_slurm, folder),
               "local": Scenario(study_local, folder), "failing": Scenario(failing_task, folder)}
    yield running
    for scenario in running.values():
        scenario.join(TIMEOUT)
    print(f"\nreal-SLURM scenarios: {time.monotonic() - started:.0f} s wall in all")
    leftovers = [job_id for s in running.values() if isinstance(s.value, dict) for job_id in _ids(s.value)]
    if leftovers:
        subprocess.run(["scancel", *leftovers], capture_output=True)


def _ids(value: dict) -> list[str]:
    ids = [value["job"]] if "job" in value else []
    for key in ("ids", "first", "second"):
        ids += [v for v in (value.get(key) or {}).values() if v]
    return ids


# ---------------------------------------------------------------------- comparing states
def tensors(value, prefix: str = "") -> dict[str, object]:
    """Every leaf of a checkpoint entry by its path (tensors and plain values)."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in tensors(item, f"{prefix}/{key}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in tensors(item, f"{prefix}/{i}").items()}
    return {prefix: value}


# Lightning's progress counters that a resume from a checkpoint written at the last batch of an epoch
# leaves one lower (the restarted epoch is not counted as ready/started again); seen when the time
# limit's signal fell on step 234 = 3 epochs of 78 batches. Nothing is computed from them
# (current_epoch is epoch_progress.current.completed, compared).
EPOCH_START_COUNTERS = tuple(f"loops/fit_loop/epoch_progress/{scope}/{what}"
                             for scope in ("total", "current") for what in ("ready", "started"))


def assert_same_training_state(path: Path, reference: Path) -> int:
    """Weights, EMA (``ema.*`` in the state dict), optimizer and scheduler state, step, epoch and the
    loop counters, bit for bit; returns the number of tensors compared."""
    a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in (path, reference))
    assert a["global_step"] == b["global_step"] == MAX_STEPS and a["epoch"] == b["epoch"]
    assert any(k.startswith("ema.") for k in a["state_dict"])
    compared = 0
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "loops"):
        ta, tb = tensors(a[key], key), tensors(b[key], key)
        assert ta.keys() == tb.keys(), key
        for name, value in ta.items():
            if name in EPOCH_START_COUNTERS:
                continue
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, tb[name]), f"{name} differs from the uninterrupted run"
                compared += 1
            else:
                assert value == tb[name], f"{name}: {value!r} != {tb[name]!r}"
    return compared


def log_of(record: dict[str, str]) -> str:
    return Path(record["StdOut"]).read_text()


# ---------------------------------------------------------------------- the scenarios
@pytest.mark.slurm
def test_train_template_preempted_by_scancel_requeues_once_and_resumes_exactly(scenarios):
    done, reference = scenarios["preempt"].result(), scenarios["reference"].result()
    record = done["record"]
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("COMPLETED", "0:0", "1")
    run = done["runs"] / f"slurm-{done['job']}"  # the config names no version: train.py pins the job id
    log = log_of(record)
    assert log.count(f"Preemption: requeued SLURM job {done['job']}") == 1
    assert f"resuming from {run / 'checkpoints' / 'preempt.ckpt'}" in log
    stopped = torch.load(run / "checkpoints" / "preempt.ckpt", map_location="cpu", weights_only=True)["global_step"]
    assert 2 * CKPT_EVERY <= stopped < MAX_STEPS
    assert assert_same_training_state(run / "checkpoints" / "last.ckpt", reference) > 100


@pytest.mark.slurm
def test_time_limit_signal_checkpoints_and_requeues_before_the_kill(scenarios):
    done, reference = scenarios["timelimit"].result(), scenarios["reference"].result()
    record = done["record"]
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("COMPLETED", "0:0", "1")
    assert record["TimeLimit"] == "00:03:00"
    log = log_of(record)
    assert "TIME LIMIT" not in log  # SLURM never had to kill it (it would say CANCELLED ... DUE TO TIME LIMIT)
    assert log.count(f"Preemption: requeued SLURM job {done['job']}") == 1
    assert done["requeued_after"] < 180  # before the limit
    run = done["runs"] / f"slurm-{done['job']}"
    stopped = torch.load(run / "checkpoints" / "preempt.ckpt", map_location="cpu", weights_only=True)["global_step"]
    assert 0 < stopped < MAX_STEPS  # the first attempt (0.3 s a step) could not have finished
    assert_same_training_state(run / "checkpoints" / "last.ckpt", reference)


@pytest.mark.slurm
def test_a_warning_before_training_starts_does_not_kill_the_job(scenarios):
    """The template starts each task with SIGUSR1 ignored until the Preemption callback takes it over:
    the job neither dies of the signal (exit 138, FAILED) nor is requeued, and trains to the end."""
    done, reference = scenarios["early"].result(), scenarios["reference"].result()
    assert done["early"]  # the signal went out before the first checkpoint
    record = done["record"]
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("COMPLETED", "0:0", "0")
    assert_same_training_state(done["runs"] / f"slurm-{done['job']}" / "checkpoints" / "last.ckpt", reference)


@pytest.mark.slurm
def test_run_files_are_group_readable_under_umask_027(scenarios):
    """SLURM applies the submitter's umask (027) to the job: every file of the run is 0640, every
    folder 0750 (mkstemp-made checkpoints used to be 0600)."""
    done = scenarios["preempt"].result()
    run = done["runs"] / f"slurm-{done['job']}"
    modes = {p.relative_to(run): stat.S_IMODE(p.stat().st_mode) for p in [run, *run.rglob("*")]}
    assert any(p.suffix == ".ckpt" for p in modes) and any("tfevents" in p.name for p in modes)
    wrong = {str(p): oct(m) for p, m in modes.items() if m != (0o750 if (run / p).is_dir() else 0o640)}
    assert not wrong


@pytest.mark.slurm
def test_study_on_slurm_chains_arrays_survives_a_requeue_and_equals_the_local_run(scenarios):
    done, local = scenarios["study"].result(), scenarios["local"].result()
    ids, records = done["ids"], done["records"]
    # one array per stage, sized by its units; evaluate waits for train and aux, the report for evaluate
    assert {stage: len(r) for stage, r in records.items()} == {"train": 1, "aux": 1, "evaluate": 2, "report": 1}
    assert all(r["ArrayJobId"] == ids[s] for s in ("train", "aux", "evaluate") for r in records[s])
    assert f"afterok:{ids['train']}" in done["dependencies"]["evaluate"]
    assert f"afterok:{ids['aux']}" in done["dependencies"]["evaluate"]
    assert f"afterok:{ids['evaluate']}" in done["dependencies"]["report"]
    ends = {s: max(r["EndTime"] for r in records[s]) for s in records}
    starts = {s: min(r["StartTime"] for r in records[s]) for s in records}
    assert starts["evaluate"] >= max(ends["train"], ends["aux"]) and starts["report"] >= ends["evaluate"]
    for stage, stage_records in records.items():
        for r in stage_records:
            assert (r["JobState"], r["ExitCode"]) == ("COMPLETED", "0:0"), (stage, r["JobId"])
    assert [r["Restarts"] for r in records["train"]] == ["1"]  # the preempted score fit, requeued once
    assert log_of(records["train"][0]).count("Preemption: requeued SLURM job") == 1
    # the results: every unit's output equal to the local executor's
    out = done["out"]
    assert (out / "report" / "report.md").is_file()
    assert_same_study_results(out, local)


WALL_CLOCK = ("_s", "_per_sample")  # results.csv columns that time the run, not what it computed


def assert_same_study_results(out: Path, local: Path) -> None:
    """Same units (their hashes name the folders); fits' weights, EMA and optimizer states and the
    samples bit for bit; every results.csv cell but the wall-clock ones equal as written."""
    units = sorted(p.relative_to(out) for p in (out / "units").glob("*/*"))
    assert units == sorted(p.relative_to(local) for p in (local / "units").glob("*/*"))
    for unit in units:
        if unit.parts[1] in ("score", "aux"):
            assert_same_fit(out / unit, local / unit)
        for path in sorted((local / unit).rglob("*.npz")):
            with np.load(path) as b, np.load(out / path.relative_to(local)) as a:
                assert sorted(a.files) == sorted(b.files)
                assert all(np.array_equal(a[k], b[k]) for k in b.files), f"{unit}: samples differ"
    rows = [list(csv.DictReader((folder / "report" / "results.csv").open())) for folder in (out, local)]
    assert len(rows[0]) == len(rows[1]) > 0
    for a, b in zip(*rows):
        assert a.keys() == b.keys()
        differ = {k: (a[k], b[k]) for k in a if a[k] != b[k] and not k.endswith(WALL_CLOCK)}
        assert not differ, f"results.csv differs from the local run: {differ}"


def assert_same_fit(a: Path, b: Path) -> None:
    sa, sb = (torch.load(p / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True) for p in (a, b))
    for key in ("state_dict", "optimizer_states"):
        ta, tb = tensors(sa[key]), tensors(sb[key])
        assert ta.keys() == tb.keys()
        assert all(torch.equal(v, tb[k]) if isinstance(v, torch.Tensor) else v == tb[k] for k, v in ta.items()), \
            f"{a.name}: {key} differs from the local run"


@pytest.mark.slurm
def test_failing_array_task_stops_the_chain_and_resubmission_runs_only_unfinished_units(scenarios):
    done = scenarios["failing"].result()
    (aux,), (train,) = done["aux"], done["train"]
    assert aux["JobState"] == "FAILED" and aux["ExitCode"] != "0:0"
    assert train["JobState"] == "COMPLETED"
    log = log_of(aux)
    unit = next(p.relative_to(done["out"] / "units") for p in (done["out"] / "units" / "aux").iterdir())
    assert f"unit {unit.as_posix()}" in log and "FailWhileExists" in log  # which unit, and why
    second = done["second"]
    assert second["train"] is None and second["aux"] is not None  # the finished score fit is not submitted again
    assert [r["JobState"] for r in done["report"]] == ["COMPLETED"]
    executed = [line for line in (done["out"] / "executed.jsonl").read_text().splitlines()]
    score_runs = [line for line in executed if '"score/' in line]
    assert len(score_runs) == 1


# ---------------------------------------------------------------------- without a cluster
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)], ids=["022", "027", "077"])
def test_checkpoints_honour_the_umask(tmp_path, umask, mode):
    """atomic_torch_save creates 0666 & ~umask, as open() does (mkstemp made every checkpoint 0600)."""
    from difftime.checkpoints import atomic_torch_save

    previous = os.umask(umask)
    try:
        atomic_torch_save({"w": torch.arange(3.0)}, tmp_path / "a.ckpt")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.ckpt").stat().st_mode) == mode
    assert [p.name for p in tmp_path.iterdir()] == ["a.ckpt"]


def template(tmp_path: Path, args: list[str], **env: str) -> subprocess.CompletedProcess:
    """scripts/slurm_train.sh as a 2-node, 4-task-per-node job would run it, with a stand-in srun
    that prints the command it was given, one argument a line."""
    bin_dir, venv = tmp_path / "bin", tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("")
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')
    (bin_dir / "srun").chmod(0o755)
    full = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_NTASKS_PER_NODE": "4",
            "SLURM_NNODES": "2", "VENV": str(venv), **env}
    return subprocess.run(["bash", str(ROOT / "scripts" / "slurm_train.sh"), *args], env=full, capture_output=True,
                          text=True, timeout=30)


def test_train_template_defaults_come_before_the_users_arguments(tmp_path):
    """The GPU defaults precede the config (the config and the arguments win over them); nothing
    follows the user's arguments unless set explicitly in the environment."""
    run = template(tmp_path, ["configs/cifar10.yaml", "--trainer.max_steps=5"])
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "--kill-on-bad-exit=1", "bash", "-c", 'trap "" USR1; exec "$@"', "train-task", "python", "train.py", "fit", "--trainer.accelerator", "gpu", "--trainer.devices", "4",
        "--trainer.num_nodes", "2", "--trainer.strategy", "ddp", "--config", "configs/cifar10.yaml",
        "--trainer.max_steps=5"]


def test_train_template_environment_choices_follow_and_never_clash_silently(tmp_path):
    run = template(tmp_path, ["configs/toy_gaussian.yaml"], ACCELERATOR="cpu", DEVICES="1", RUN_NAME="a")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-8:] == ["--config", "configs/toy_gaussian.yaml", "--trainer.accelerator", "cpu",
                                            "--trainer.devices", "1", "--trainer.logger.init_args.version", "a"]
    clash = template(tmp_path / "b", ["configs/toy_gaussian.yaml", "--trainer.accelerator=gpu"], ACCELERATOR="cpu")
    assert clash.returncode == 2 and clash.stdout == ""
    assert clash.stderr.strip().splitlines() == [
        "slurm_train.sh: error: ACCELERATOR=cpu and the argument --trainer.accelerator both set trainer.accelerator; give one"]
