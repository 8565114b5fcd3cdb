"""tools/train_latent_diffusion.py: a few steps on a tiny latent dataset (`test` presets), resumed once; the
resumed run ends exactly where an uninterrupted one does, and a legacy pickle ``checkpoint.pt`` is never loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers import REPO, encode_small, load_tool, save_photo
from sdvae.train.checkpoint import latest_checkpoint

SCRIPT = REPO / "tools" / "train_latent_diffusion.py"


def _state(run: Path) -> tuple[Path, dict]:
    """The run's newest checkpoint folder and its state.json."""
    ckpt = latest_checkpoint(run)
    assert ckpt is not None
    return ckpt, json.loads((ckpt / "state.json").read_text())


@pytest.mark.slow
def test_trains_resumes_samples_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tool = load_tool("train_latent_diffusion")
    for i in range(16):
        save_photo(tmp_path / "imgs" / f"im{i:02d}.png", 40 + 4 * (i % 3), 36, seed=i)
    latents = tmp_path / "latents"
    encode_small(tmp_path / "imgs", latents)  # `test` VAE, 32x32 crops: (4, 4, 4) latents
    run, whole = tmp_path / "run", tmp_path / "whole"
    common = ["--preset", "test", "--batch-size", "4", "--held-out", "4", "--save-every", "2",
              "--num-samples", "4", "--num-stats", "6", "--sample-steps", "2"]
    first = tool.main([str(latents), str(run), *common, "--steps", "3"])
    assert first["steps"] == 3 and first["train_rows"] == 12 and first["latent_shape"] == [4, 4, 4]
    ckpt, state = _state(run)
    assert ckpt.name == "step-00000003" and state["step"] == 3 and len(state["meta"]["log"]["train"]) == 3
    assert not [p for p in run.rglob("*") if p.suffix in (".pt", ".pth", ".bin", ".pkl")]  # no pickle written

    report = tool.main([str(latents), str(run), *common, "--steps", "5"])  # resumes at step 3
    assert "resumed at step 3" in capsys.readouterr().out
    ckpt, state = _state(run)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000005"]  # only the newest is kept
    assert report["steps"] == 5 and [s for s, _ in state["meta"]["log"]["train"]] == [1, 2, 3, 4, 5]
    assert [s for s, _ in report["held_out_curve"]] == [0, 2, 3, 4, 5] and report["held_out_curve"] == state[
        "meta"]["log"]["held_out"]
    assert report["held_out_loss"]["step_0"] == state["meta"]["log"]["held_out"][0][1] > 0
    gen = report["generated"]
    assert gen["count"] == 6 and len(gen["channel_mean"]) == len(gen["channel_std"]) == 4
    assert json.loads((run / "report.json").read_text()) == json.loads(json.dumps(report))
    assert Image.open(run / "samples.png").size[0] > 2 * 32 and Image.open(run / "loss.png").size[0] > 100

    # The same 5 steps in one go, in a folder holding a legacy checkpoint.pt (not a pickle here: loading it
    # would raise): ignored with one line, and the run starts at step 0.
    whole.mkdir()
    (whole / "checkpoint.pt").write_bytes(b"legacy resume state")
    straight = tool.main([str(latents), str(whole), *common, "--steps", "5"])
    printed = capsys.readouterr().out
    assert "legacy pickle format" in printed and "resumed" not in printed
    assert (whole / "checkpoint.pt").read_bytes() == b"legacy resume state"  # left as it was
    # Exact resume: the same final held-out loss, training losses and weights as the uninterrupted run.
    assert [s for s, _ in straight["held_out_curve"]] == [0, 2, 4, 5]
    assert straight["held_out_loss"] == report["held_out_loss"]
    assert straight["held_out_curve"] == [p for p in report["held_out_curve"] if p[0] != 3]
    whole_ckpt, whole_state = _state(whole)
    assert whole_state["meta"]["log"]["train"] == state["meta"]["log"]["train"]
    a, b = load_file(ckpt / "unet.safetensors"), load_file(whole_ckpt / "unet.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
