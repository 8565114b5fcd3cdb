"""tools/bench.py: ``gpu --device cpu --tiny`` is the smoke test of the prepared GPU script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import REPO


def test_gpu_cpu_tiny_mode_runs_every_part_and_writes_json_and_markdown(tmp_path: Path):
    out = tmp_path / "check.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench.py"), "gpu", "--device", "cpu", "--tiny",
                           "--out", str(out)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    whats = [r["what"] for r in rows]
    assert all(r["ok"] for r in rows), [(r["what"], r["failures"]) for r in rows if not r["ok"]]
    for kind in ("train ours bf16", "train ours fp16", "train ldm same-work fp32", "train ldm same-work bf16",
                 "train example bf16", "infer", "encode-dataset"):
        assert any(w.startswith(kind) for w in whats), kind
    fp16 = next(r for r in rows if r["what"] == "train ours fp16")
    assert fp16["scaler_updates"] == 3 and fp16["vae_steps"] == 3  # one update per iteration, every step taken
    assert fp16["disc_steps"] == 2  # the discriminator from step 1
    for row in rows:
        if row["kind"] != "encode":
            assert row["tflops"] > 0 and row["peak_tflops"] > 0 and row["share"] > 0, row
            assert row["peak_memory"] > 0
    infer = [r for r in rows if r["kind"] == "infer"]
    assert all(r["psnr_vs_fp32"] > 25 for r in infer if r["mode"] != "diffusers-fp32")
    assert "| what | ok |" in proc.stdout and out.with_suffix(".md").read_text().startswith("| what | ok |")
