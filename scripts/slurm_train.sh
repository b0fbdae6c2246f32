#!/bin/bash
# SLURM batch template for difftime: multi-GPU / multi-node DDP with preemption and requeue.
#
#   sbatch scripts/slurm_train.sh configs/cifar10.yaml [more --config files or overrides]
#
# * one task per GPU (ntasks-per-node = GPUs per node = trainer.devices), launched by srun:
#   Lightning reads ranks from SLURM, no extra launcher;
# * --signal=USR1@120 (no "B:", so it goes to every task, not only the batch shell): 120 s
#   before the time limit each rank gets SIGUSR1; difftime checkpoints at the next step
#   boundary, rank 0 calls `scontrol requeue <job id>`, and the job exits cleanly. Choose the
#   lead time longer than one training step plus one checkpoint write;
# * --requeue lets the job be requeued (also after node failure or preemption by the scheduler);
# * RUN_NAME pins the run directory runs/<name>/<RUN_NAME> (default: job name and id, which a
#   requeued job keeps): the requeued job runs this same script, finds the newest valid
#   checkpoint there and resumes from it; TensorBoard continues the same curves.
#
#SBATCH --job-name=difftime
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail
CONFIG=${1:?usage: sbatch scripts/slurm_train.sh CONFIG.yaml [extra arguments]}
shift
RUN_NAME=${RUN_NAME:-${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
GPUS_PER_NODE=${SLURM_NTASKS_PER_NODE:-1}

cd "${SLURM_SUBMIT_DIR}"
source .venv/bin/activate

# srun starts one process per GPU; `exec` so the signals reach python directly.
exec srun --kill-on-bad-exit=1 python train.py fit \
    --config "${CONFIG}" "$@" \
    --trainer.accelerator gpu \
    --trainer.devices "${GPUS_PER_NODE}" \
    --trainer.num_nodes "${SLURM_NNODES}" \
    --trainer.strategy ddp \
    --trainer.logger.init_args.version "${RUN_NAME}"
