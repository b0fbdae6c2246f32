#!/bin/bash
# The T study on a SLURM cluster: one array job per stage, chained with --dependency=afterok,
# the report job last. No scheduler of our own: SLURM runs every unit. Submitted by
#
#   difftime-study --config configs/study/cifar10.yaml --executor slurm      # on the login node
#   (python study.py ... from a clone; PYTHON is the interpreter the jobs use, the submitter's by default)
#
# * `--task-list STAGE` pins the stage's units that are not done yet to array indices
#   (<out>/slurm/STAGE.units), so a re-submission skips finished units;
# * each array task runs `--task STAGE INDEX`: a fit unit is one ordinary `train.py fit` in its
#   hash-named run folder, with train.py's preemption handling: --signal=USR1@120 reaches every
#   process of the step, train.py checkpoints at the next step boundary, requeues the array task
#   (`scontrol requeue <array job>_<task>`) and exits cleanly; the requeued task resumes exactly
#   from the newest valid checkpoint. Evaluation tasks rewrite their outputs atomically and record
#   them when they finish, so a preempted one simply runs again;
# * train (score models, classifier) and aux (auxiliary priors) are independent; evaluate waits
#   for both (afterok), report for evaluate;
# * a failed task prints its unit and its log (StdOut of `scontrol show job`) and exits non-zero;
#   --kill-on-invalid-dep=yes then cancels the stages that depend on it (a fit preempted and
#   requeued is not a failure: the task exits 0 and SLURM restarts it).
#
# GPUS_PER_TASK (default 1; 0 leaves --gpus-per-task out, for a CPU partition), CPUS_PER_TASK
# (default 8), TIME_TRAIN, TIME_EVAL and PARTITION_ARGS (extra sbatch options, e.g.
# "--partition=gpu", placed after the template's own) tune the jobs.
#SBATCH --job-name=difftime-study
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%A_%a.out

set -euo pipefail
PY=${PYTHON:-python}
STUDY="${PY} -m commands.study"

if [[ "${1:-}" == "--task" ]]; then   # inside an array task (or the report job)
    STAGE=$2; SPEC=$3
    cd "${SLURM_SUBMIT_DIR}"
    if [[ "${STAGE}" == "report" ]]; then
        exec ${STUDY} --config "${SPEC}" --stage report
    fi
    # srun: SLURM's signals reach the study and the train.py it starts. SIGUSR1 is ignored until
    # train.py's Preemption callback installs its handler (its default action would kill the task
    # during startup, or after the fit has finished).
    STATUS=0
    srun --kill-on-bad-exit=1 bash -c 'trap "" USR1; exec "$@"' "study-${STAGE}" \
        ${STUDY} --config "${SPEC}" --task "${STAGE}" "${SLURM_ARRAY_TASK_ID}" || STATUS=$?
    if [[ "${STATUS}" -ne 0 ]]; then
        UNIT=$(${STUDY} --config "${SPEC}" --task-unit "${STAGE}" "${SLURM_ARRAY_TASK_ID}" 2>/dev/null || echo "?")
        LOG=$(scontrol show job "${SLURM_JOB_ID}" 2>/dev/null | grep -o 'StdOut=[^ ]*' | cut -d= -f2- || true)
        echo "study: unit ${UNIT} failed (exit status ${STATUS}); its log: ${LOG:-unknown}" >&2
        exit "${STATUS}"
    fi
    exit 0
fi

SPEC=${1:?usage: bash slurm_study.sh STUDY_SPEC.yaml}
GPUS=${GPUS_PER_TASK:-1}
CPUS=${CPUS_PER_TASK:-8}
EXTRA=${PARTITION_ARGS:-}
GPU_ARGS=""
if [[ "${GPUS}" != "0" ]]; then GPU_ARGS="--gpus-per-task=${GPUS}"; fi
# a failed stage cancels the jobs that wait on it instead of leaving them pending forever
after() { if [[ -n "$1" ]]; then echo "--dependency=afterok:$1 --kill-on-invalid-dep=yes"; fi; }
submit() {  # submit STAGE DEPENDENCY TIME -> prints the job id (empty when the stage has nothing to do)
    local stage=$1 dep=$2 time=$3 n
    n=$(${STUDY} --config "${SPEC}" --task-list "${stage}")
    if [[ "${n}" -eq 0 ]]; then return 0; fi
    sbatch --parsable --array=0-$((n - 1)) --cpus-per-task="${CPUS}" ${GPU_ARGS} --time="${time}" $(after "${dep}") \
        --job-name="study-${stage}" ${EXTRA} "$0" --task "${stage}" "${SPEC}"
}
TRAIN=$(submit train "" "${TIME_TRAIN:-24:00:00}")
AUX=$(submit aux "" "${TIME_TRAIN:-24:00:00}")
DEPS=$(echo "${TRAIN}" "${AUX}" | xargs | tr ' ' ':')
EVAL=$(submit evaluate "${DEPS}" "${TIME_EVAL:-04:00:00}")
LAST=${EVAL:-${DEPS}}
REPORT=$(sbatch --parsable --time=01:00:00 --cpus-per-task="${CPUS}" $(after "${LAST}") --job-name=study-report \
    ${EXTRA} "$0" --task report "${SPEC}")
echo "submitted: train ${TRAIN:-none}, aux ${AUX:-none}, evaluate ${EVAL:-none}, report ${REPORT}"
