"""tools/gpu_check.py in its CPU smoke mode (--device cpu --tiny): every check runs and passes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import REPO


def test_gpu_check_cpu_tiny_mode_runs_every_part_and_writes_json(tmp_path: Path):
    out = tmp_path / "check.json"
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--infer", "--out", str(out)], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    whats = [r["what"] for r in rows]
    assert any("train sdvae bf16" in w for w in whats) and any("train sdvae fp16" in w for w in whats)
    assert any(w.startswith("baseline") for w in whats)
    assert any(w.startswith("roundtrip") for w in whats) and any(w.startswith("infer") for w in whats)
    assert all(r["ok"] for r in rows)
    fp16 = next(r for r in rows if "fp16" in r["what"])
    assert fp16["scaler_updates"] == 3  # one per iteration
    assert "| what |" in proc.stdout  # the markdown table
