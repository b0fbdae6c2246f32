#!/bin/bash
# The T study on a SLURM cluster: one array job per stage chained with --dependency=afterok, the
# report job last. The template ships beside the study package (commands/study/slurm_study.sh, what
# `python study.py --config SPEC --executor slurm` submits); this path keeps working for
#
#   bash scripts/slurm_study.sh configs/study/cifar10.yaml
#
# It checks the spec and submits through the study command (PYTHON: the interpreter, `python` by
# default). Partitions: GPUS_PER_TASK (0 on a CPU partition), CPUS_PER_TASK, TIME_TRAIN, TIME_EVAL
# and PARTITION_ARGS (extra sbatch options, e.g. "--partition=cpu", placed after the template's own).
exec "${PYTHON:-python}" -m commands.study --config "${1:?usage: bash scripts/slurm_study.sh STUDY_SPEC.yaml}" --executor slurm
