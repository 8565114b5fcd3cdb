"""tools/diffusability_proxy.py: two VAEs, two seeds, a tiny budget; deterministic for its seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from helpers import load_tool, save_photo


@pytest.mark.slow
def test_two_models_two_seeds_deterministic(tmp_path: Path) -> None:
    tool = load_tool("diffusability_proxy")
    for i in range(12):
        save_photo(tmp_path / "imgs" / f"im{i:02d}.png", 40 + 4 * (i % 3), 36, seed=i)
    common = [str(tmp_path / "imgs"), "--model", "test", "--model", "tiny", "--resolution", "32", "--steps", "3",
              "--seeds", "0,1", "--preset", "test", "--batch-size", "4", "--held-out", "4"]
    first = tool.main([common[0], str(tmp_path / "a"), *common[1:]])
    assert list(first["models"]) == ["test", "tiny"]
    for r in first["models"].values():
        finals = [run["final"] for run in r["runs"].values()]
        assert len(finals) == 2 and all(f > 0 for f in finals) and finals[0] != finals[1]  # seeds differ
        assert r["spread"] == pytest.approx(max(finals) - min(finals)) and r["mean"] == pytest.approx(sum(finals) / 2)
        assert r["runs"]["0"]["curve"][0][0] == 0 and r["runs"]["0"]["curve"][-1][0] == 3
    assert first["models"]["test"]["mean"] != first["models"]["tiny"]["mean"]  # different latent spaces
    assert json.loads((tmp_path / "a" / "proxy.json").read_text()) == json.loads(json.dumps(first))
    assert Image.open(tmp_path / "a" / "proxy.png").size[0] > 100
    again = tool.main([common[0], str(tmp_path / "b"), *common[1:]])  # a fresh run folder, the same seeds
    assert again["models"] == first["models"]
