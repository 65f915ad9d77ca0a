"""``make gpu-check``'s driver runs end to end on a machine without a GPU.

The GPU machine is lent rarely and briefly: a crash in the driver itself would waste the call. Here
it runs one quick part (the tiling sweep, one SKIP row without a GPU) and must write its files.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_runs_a_part_and_writes_its_files(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "benches/gpu_check.py", "--parts", "bench-window_tiling"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json", "log.txt", "report.md"]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = {part["part"]: part["status"] for part in result["parts"]}
    assert parts == {"bench-window_tiling": "OK"}
    rows = result["benchmarks"]
    assert rows and all(row["suite"] == "window_attention_tiling" for row in rows)
    assert "bench-window_tiling" in (tmp_path / "report.md").read_text()
