"""tools/bench.py: ``gpu --device cpu --tiny`` is the smoke test of the prepared GPU script; ``encode`` on tar
shards of a few tiny images (one CLI process; torchrun and Ray in the slow test)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, load_tool


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


@pytest.fixture(scope="module")
def bench():
    return load_tool("bench")


def test_encode_on_tar_shards_reports_the_bare_loop_and_the_full_path(bench, tmp_path: Path, monkeypatch):
    seen, real = [], bench._encode_cli

    def recording(src, out, args, processes, engine="torchrun"):
        r = real(src, out, args, processes, engine)  # `sdvae encode-dataset` in a fresh process
        seen.append((str(src), processes, engine, sorted(p.name for p in Path(out).iterdir())))
        return r

    monkeypatch.setattr(bench, "_encode_cli", recording)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "encode.json"
    assert bench.main(["encode", "--model", "test", "--images", "6", "--resolution", "32", "--batch", "4",
                       "--shards", "2", "--workers", "0", "--engines", "1", "--out", str(out)]) == 0
    [(src, processes, engine, written)] = seen
    assert src.endswith("/{00000..00001}.tar") and (processes, engine) == (1, "torchrun")  # the shards, one process
    assert "sdvae_latents.json" in written and "data" in written  # the dataset it wrote
    result = json.loads(out.read_text())
    assert result["info"]["shards"] == 2 and result["info"]["images"] == 6
    bare, one = result["rows"]
    assert bare["engine"] == "bare" and bare["images_per_s"] > 0 and bare["vs_bare"] == 1
    assert bare["before"] > 0 and bare["after"] > 0
    assert one["engine"] == "1" and one["ok"] and one["images"] == 6 and one["images_per_s"] > 0
    assert one["vs_bare"] == pytest.approx(one["images_per_s"] / bare["images_per_s"])
    assert 0 <= one["waiting_share"] <= 1 and one["waiting_share"] == pytest.approx(one["waiting_s"] / one["seconds"])
    assert out.with_suffix(".md").read_text().startswith("| what | images | seconds | images/s |")


def test_a_failing_ray_engine_is_a_row_not_a_crash(bench, tmp_path: Path, monkeypatch, capsys):
    def fail(*args, **kw):
        raise bench.children.ChildFailed("cmd failed (exit 1):\nTraceback...\nsdvae: --engine ray needs Ray\n")

    monkeypatch.setattr(bench, "_encode_cli", fail)
    row = bench._engine_row("ray", "src", tmp_path, None)
    assert row["note"] == "not available (sdvae: --engine ray needs Ray)" and row["ok"]
    assert "ray: not available (sdvae: --engine ray needs Ray)" in capsys.readouterr().out
    assert bench._engine_row("2", "src", tmp_path, None)["ok"] is False  # torchrun failing is a failure


@pytest.mark.parametrize("spec", ["", "0", "1,two", "gpu"])
def test_bad_engines_are_refused(bench, spec):
    with pytest.raises(SystemExit, match="--engines"):
        bench._engine_names(spec)


@pytest.mark.slow
def test_encode_runs_two_processes_and_the_ray_engine_on_shards(bench, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "encode.json"
    assert bench.main(["encode", "--model", "test", "--images", "6", "--resolution", "32", "--batch", "4",
                       "--shards", "2", "--workers", "0", "--engines", "2,ray", "--out", str(out)]) == 0
    rows = {r["engine"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["2"]["ok"] and rows["2"]["images"] == 6 and 0 <= rows["2"]["waiting_share"] <= 1
    ray = rows["ray"]
    assert (ray["ok"] and ray["images"] == 6) or ray["note"].startswith("not available ("), ray


def test_infer_rounds_interleave_modes_in_alternating_order_and_take_the_median(bench, tmp_path: Path, monkeypatch):
    import argparse

    import torch
    from safetensors.torch import save_file

    calls: list[str] = []
    times = {"diffusers-fp32": iter([3.0, 1.0, 2.0]), "b": iter([10.0, 30.0, 20.0])}

    def child(*argv: str) -> dict:  # stands in for the fresh process of each (round, mode)
        mode, save = argv[argv.index("--mode") + 1], argv[argv.index("--save") + 1]
        calls.append(mode)
        out = torch.full((1, 3, 8, 8), 0.5 if mode == "b" else 0.6)  # each mode's own output
        save_file({"out": out, "x": torch.zeros(1, 3, 8, 8)}, save)
        return {"seconds": next(times[mode]), "first_seconds": 0.0, "peak_memory": 1, "dtype": "fp32"}

    monkeypatch.setattr(bench, "_bench_child", child)
    args = argparse.Namespace(device="cpu", repeats=1, warmup=0, rounds=3, peak_tflops=1.0)
    rows = {r["mode"]: r for r in bench.infer_rows("test", 32, ["diffusers-fp32", "b"], args, str(tmp_path))}
    a = "diffusers-fp32"
    assert calls == [a, "b", "b", a, a, "b"]
    assert rows[a]["seconds"] == 2.0 and rows[a]["rounds"] == [3.0, 1.0, 2.0]
    assert rows["b"]["seconds"] == 20.0 and rows["b"]["tflops"] == pytest.approx(rows[a]["tflops"] / 10)
    assert rows["b"]["speed"] == "0.10x"  # against the diffusers-fp32 row
    # each row compared with its own output: 0.5 against 0.6 on [-1, 1] images
    assert rows["b"]["psnr_vs_fp32"] == pytest.approx(10 * math.log10(1 / 0.05 ** 2), abs=0.5)


def test_train_rounds_take_each_rows_median_and_print_paired_ratios(bench, monkeypatch, capsys):
    speeds = {"ldm": iter([10.0, 30.0, 20.0]), "ours": iter([24.0, 33.0, 18.0]), "example": iter([5.0, 5.0, 5.0])}
    calls: list[str] = []

    def child(*argv: str) -> dict:  # stands in for the fresh process of each (round, row)
        mode, precision = argv[argv.index("--mode") + 1], argv[argv.index("--precision") + 1]
        calls.append(f"{mode} {precision}")
        ips = next(speeds[mode]) if precision == "bf16" or mode == "example" else 8.0
        return {"images_per_s": ips, "seconds_per_step": 16 / ips, "flops_per_step": 1e9, "peak_memory": 1,
                "first_loss": 1.0, "last_loss": 0.5, "device": "cpu"}

    monkeypatch.setattr(bench, "_bench_child", child)
    bench.main(["train", "--precisions", "bf16", "--rounds", "3", "--peak-tflops", "1"])
    rows = ["ldm no", "ldm bf16", "example bf16", "ours bf16"]
    assert calls == rows + rows[::-1] + rows
    out = capsys.readouterr().out
    # medians 24 / 20 = 1.20x; paired per round 24/10, 33/30, 18/20
    assert "ours (bf16) / ldm same-work (bf16): 1.20x images/s (medians; per round 0.90–2.40x)" in out
    assert "ours (bf16) / ldm same-work (fp32): 3.00x images/s (medians; per round 2.25–4.12x)" in out
