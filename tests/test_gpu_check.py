"""benchmarks/gpu_check.sh runs end to end on CPU in --tiny mode and prints its one table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_tiny_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.md"
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--tiny", "--device", "cpu",
                             "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    table = out.read_text()
    assert table.startswith("# GPU check (tiny U-Net, CPU") and table.strip() in result.stdout
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| section")]
    sections = [line.split("|")[1].strip() for line in rows]
    assert sections.count("train") == 4 and {"lightning", "sampling", "likelihood", "fid"} <= set(sections)
    assert all("PASS" in line for line in rows if line.startswith("| likelihood"))
    sampling = [line for line in rows if line.startswith("| sampling")]
    assert "NFE 10" in sampling[0] and "Heun" in sampling[1]
