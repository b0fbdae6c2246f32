#!/usr/bin/env bash
# GPU check of the CIFAR-10 DDPM++ configuration: one table (training throughput and MFU in fp32 /
# bf16-mixed / 16-mixed with and without channels_last and torch.compile, peak memory, Lightning/bare
# ratio, DPM-Solver++ vs Heun sampling throughput, bf16-vs-fp32 ELBO and ODE likelihood, FID of 1,000
# samples with the converted Inception weights). About 5-8 minutes on one modern GPU.
#
#   bash benchmarks/gpu_check.sh                                   # GPU; table also in benchmarks/results/gpu_check.md
#   bash benchmarks/gpu_check.sh --inception-weights inception.pth # FID (scripts/convert_inception.py makes the file)
#   bash benchmarks/gpu_check.sh --tiny --device cpu --out /tmp/t.md   # tiny U-Net on CPU, seconds (the test suite)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
case " $* " in
  *" --out "*) exec "$PY" benchmarks/gpu_check.py "$@" ;;
  *" --tiny "*) exec "$PY" benchmarks/gpu_check.py "$@" ;;
  *) exec "$PY" benchmarks/gpu_check.py --out benchmarks/results/gpu_check.md "$@" ;;
esac
