#!/bin/bash
# SLURM batch template for difftime: DDP over GPUs (the default) or CPUs, with preemption and requeue.
#
#   sbatch scripts/slurm_train.sh configs/cifar10.yaml [more --config files or overrides]      # 4 GPUs
#   sbatch --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 scripts/slurm_train.sh configs/cifar10.yaml
#   ACCELERATOR=cpu sbatch --gpus-per-node=0 --ntasks-per-node=1 --cpus-per-task=2 \
#       scripts/slurm_train.sh configs/toy_gaussian.yaml                                       # a CPU partition
#
# * Resources are sbatch's: options on the sbatch command line replace the #SBATCH lines below
#   (the GPU defaults: 4 tasks and 4 GPUs per node, 8 CPUs per task). One task per device,
#   launched by srun: Lightning reads ranks from SLURM, no extra launcher.
# * What train.py is told, in this order (later wins):
#     1. the GPU defaults of this template: --trainer.accelerator gpu, --trainer.devices
#        <tasks per node>, --trainer.num_nodes <nodes>, --trainer.strategy ddp;
#     2. the user's config files and arguments (configs/*.yaml set accelerator and devices: the
#        config decides; Lightning refuses a device or node count that differs from the
#        allocation, it never adapts silently);
#     3. ACCELERATOR, DEVICES, STRATEGY, RUN_NAME when set in the environment (sbatch passes the
#        submitter's environment): an explicit choice, so giving the same key as an argument too
#        is an error, not a silent override.
# * --signal=USR1@120 (no "B:", so it goes to every task, not only the batch shell): 120 s
#   before the time limit each rank gets SIGUSR1; difftime checkpoints at the next step
#   boundary, rank 0 calls `scontrol requeue <job id>`, and the job exits cleanly. Choose the
#   lead time longer than one training step plus one checkpoint write (SLURM sends the signal
#   up to 60 s earlier than asked);
# * --requeue lets the job be requeued (also after node failure or preemption by the scheduler);
# * the run directory is <save_dir>/<name>/<version> of the config (RUN_NAME sets the version;
#   a config without a version gets slurm-<job id>, which a requeued job keeps): the requeued job
#   runs this same script, finds the newest valid checkpoint there and resumes from it;
#   TensorBoard continues the same curves.
# * VENV (default .venv, relative to the submit directory) is the virtual environment to activate.
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

defaults=(--trainer.accelerator gpu --trainer.devices "${SLURM_NTASKS_PER_NODE:-1}"
          --trainer.num_nodes "${SLURM_NNODES:-1}" --trainer.strategy ddp)
explicit=()
choose() {  # choose ENV_NAME KEY: an environment value, unless the arguments give KEY as well
    local name=$1 key=$2 arg
    [[ -n "${!name:-}" ]] || return 0
    for arg in "${ARGS[@]}"; do
        if [[ "${arg}" == "${key}" || "${arg}" == "${key}="* ]]; then
            echo "slurm_train.sh: error: ${name}=${!name} and the argument ${key} both set ${key#--}; give one" >&2
            exit 2
        fi
    done
    explicit+=("${key}" "${!name}")
}
ARGS=("$@")
choose ACCELERATOR --trainer.accelerator
choose DEVICES --trainer.devices
choose STRATEGY --trainer.strategy
choose RUN_NAME --trainer.logger.init_args.version

cd "${SLURM_SUBMIT_DIR}"
source "${VENV:-.venv}/bin/activate"

# srun starts one process per task; `exec` so the signals reach python directly. Each task starts
# with SIGUSR1 ignored (an ignored signal stays ignored across exec): the Preemption callback
# handles it while training, and before (imports, setup) and after (teardown, exit) the warning
# cannot kill the process. SLURM sends it up to a minute early, and Lightning's teardown restores
# the handlers found at the start of fit: with SIGUSR1's default action a job whose training had
# finished was killed by the warning (exit 138) and marked FAILED.
exec srun --kill-on-bad-exit=1 bash -c 'trap "" USR1; exec "$@"' train-task \
    python train.py fit "${defaults[@]}" --config "${CONFIG}" "$@" "${explicit[@]}"
