"""tools/train_latent_diffusion.py: a few steps on a tiny latent dataset (`test` presets), resumed once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import REPO, encode_small, load_tool, save_photo

SCRIPT = REPO / "tools" / "train_latent_diffusion.py"



@pytest.mark.slow
def test_trains_resumes_samples_and_reports(tmp_path: Path) -> None:
    tool = load_tool("train_latent_diffusion")
    for i in range(16):
        save_photo(tmp_path / "imgs" / f"im{i:02d}.png", 40 + 4 * (i % 3), 36, seed=i)
    latents = tmp_path / "latents"
    encode_small(tmp_path / "imgs", latents)  # `test` VAE, 32x32 crops: (4, 4, 4) latents
    run = tmp_path / "run"
    common = [str(latents), str(run), "--preset", "test", "--batch-size", "4", "--held-out", "4", "--save-every", "2",
              "--num-samples", "4", "--num-stats", "6", "--sample-steps", "2"]
    first = tool.main([*common, "--steps", "3"])
    assert first["steps"] == 3 and first["train_rows"] == 12 and first["latent_shape"] == [4, 4, 4]
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["step"] == 3 and len(state["log"]["train"]) == 3

    report = tool.main([*common, "--steps", "5"])  # resumes at step 3
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert report["steps"] == 5 and [s for s, _ in state["log"]["train"]] == [1, 2, 3, 4, 5]
    assert [s for s, _ in state["log"]["held_out"]] == [0, 2, 3, 4, 5]
    assert report["held_out_loss"]["step_0"] == state["log"]["held_out"][0][1] > 0
    gen = report["generated"]
    assert gen["count"] == 6 and len(gen["channel_mean"]) == len(gen["channel_std"]) == 4
    assert json.loads((run / "report.json").read_text()) == json.loads(json.dumps(report))
    assert Image.open(run / "samples.png").size[0] > 2 * 32 and Image.open(run / "loss.png").size[0] > 100
