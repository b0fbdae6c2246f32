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
#   for both (afterok), report for evaluate.
#
# GPUS_PER_TASK, TIME_TRAIN, TIME_EVAL, PARTITION_ARGS (e.g. "--partition=gpu") tune the jobs.
#SBATCH --job-name=difftime-study
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
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
    # exec + srun: SLURM's signals reach the study and the train.py it starts
    exec srun --kill-on-bad-exit=1 ${STUDY} --config "${SPEC}" --task "${STAGE}" "${SLURM_ARRAY_TASK_ID}"
fi

SPEC=${1:?usage: bash slurm_study.sh STUDY_SPEC.yaml}
GPUS=${GPUS_PER_TASK:-1}
EXTRA=${PARTITION_ARGS:-}
submit() {  # submit STAGE DEPENDENCY TIME -> prints the job id (empty when the stage has nothing to do)
    local stage=$1 dep=$2 time=$3 n
    n=$(${STUDY} --config "${SPEC}" --task-list "${stage}")
    if [[ "${n}" -eq 0 ]]; then return 0; fi
    sbatch --parsable --array=0-$((n - 1)) --gpus-per-task="${GPUS}" --time="${time}" ${dep:+--dependency=afterok:${dep}} \
        --job-name="study-${stage}" ${EXTRA} "$0" --task "${stage}" "${SPEC}"
}
TRAIN=$(submit train "" "${TIME_TRAIN:-24:00:00}")
AUX=$(submit aux "" "${TIME_TRAIN:-24:00:00}")
DEPS=$(echo "${TRAIN}" "${AUX}" | xargs | tr ' ' ':')
EVAL=$(submit evaluate "${DEPS}" "${TIME_EVAL:-04:00:00}")
LAST=${EVAL:-${DEPS}}
REPORT=$(sbatch --parsable --time=01:00:00 ${LAST:+--dependency=afterok:${LAST}} --job-name=study-report ${EXTRA} \
    "$0" --task report "${SPEC}")
echo "submitted: train ${TRAIN:-none}, aux ${AUX:-none}, evaluate ${EVAL:-none}, report ${REPORT}"
