#!/bin/bash
# The T study on a SLURM cluster: one array job per stage chained with --dependency=afterok, the
# report job last. The template ships beside the study package (commands/study/slurm_study.sh, what
# `python study.py --config SPEC --executor slurm` submits); this path keeps working for
#
#   bash scripts/slurm_study.sh configs/study/cifar10.yaml
#
# Partitions: GPUS_PER_TASK (0 on a CPU partition), TIME_TRAIN, TIME_EVAL and PARTITION_ARGS (extra
# sbatch options, e.g. "--partition=cpu --cpus-per-task=2", placed after the template's own).
exec bash "$(cd "$(dirname "$0")/.." && pwd)/commands/study/slurm_study.sh" "$@"
