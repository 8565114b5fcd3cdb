"""The benchmark kit's shared pieces (tools/benchkit): timing, FLOPs and peaks, children, inputs, recipes."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO

sys.path.insert(0, str(REPO / "tools"))  # tools/ is not a package: bench.py imports benchkit as a sibling

from benchkit import children, flops, inputs, memory, report, steps, timing


def test_time_calls_runs_warmup_untimed_then_times_each_repeat():
    calls = []
    out, watch = timing.time_calls(lambda: calls.append(1) or len(calls), repeats=3, warmup=2)
    assert len(calls) == 5 and out == 5  # the last call's output
    assert len(watch.laps) == 3 and all(t >= 0 for t in watch.laps)
    assert watch.total == pytest.approx(sum(watch.laps)) and watch.median in watch.laps


def test_stopwatch_counts_only_counted_laps():
    watch = timing.Stopwatch("cpu")
    for i in range(4):
        with watch.lap(counted=i >= 1):
            pass
    assert len(watch.laps) == 3


def test_interleaved_alternates_the_order_round_by_round_and_keeps_each_names_results():
    calls: list[str] = []
    out = timing.interleaved(["a", "b", "c"], 3, lambda name: calls.append(name) or f"{name}{len(calls)}")
    assert calls == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert out == {"a": ["a1", "a6", "a7"], "b": ["b2", "b5", "b8"], "c": ["c3", "c4", "c9"]}
    assert timing.interleaved(["a"], 0, lambda name: name) == {"a": ["a"]}  # at least one round


def test_flop_counter_gives_the_analytic_count_of_a_matmul_and_a_convolution():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert flops.count_flops(lambda: a @ b)[1] == 2 * 8 * 16 * 4
    conv = torch.nn.Conv2d(3, 5, kernel_size=3, padding=1, bias=False)
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        out, n = flops.count_flops(lambda: conv(x))
    assert out.shape == (2, 5, 10, 10)
    assert n == 2 * (2 * 5 * 10 * 10) * (3 * 3 * 3)  # 2 · output elements · (C_in · k · k)


def test_flop_counter_counts_the_backward_too():
    w = torch.randn(16, 4, requires_grad=True)
    a = torch.randn(8, 16)
    # forward a@w, backward only grad w = aᵀ @ grad_out (a needs none): two matmuls of the same size
    assert flops.count_flops(lambda: (a @ w).sum().backward())[1] == 2 * (2 * 8 * 16 * 4)


@pytest.mark.parametrize(("name", "precision", "peak"), [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.0), ("NVIDIA H100 PCIe", "bf16", 756.0),
    ("NVIDIA H200", "fp16", 989.0), ("NVIDIA A100-SXM4-80GB", "no", 19.5), ("NVIDIA L40S", "fp32", 91.6),
    ("NVIDIA L4", "bf16", 121.0), ("Some Other GPU", "bf16", None)])
def test_known_device_peaks(name, precision, peak):
    assert flops.known_peak(name, precision) == peak


def test_device_peak_override_wins_and_a_cpu_peak_is_measured_once(monkeypatch):
    assert flops.device_peak("cpu", "bf16", override=123.0) == (123.0, "--peak-tflops")
    measured = []
    monkeypatch.setattr(flops, "_MEASURED", {})
    monkeypatch.setattr(flops, "measure_gemm_tflops", lambda p, device="cpu": measured.append(p) or 1.5)
    assert flops.device_peak("cpu", "no") == (1.5, "measured fp32 GEMM on cpu")
    assert flops.device_peak("cpu", "fp32")[0] == 1.5 and measured == ["fp32"]  # cached per precision


def test_gemm_peak_measurement_is_positive():
    assert flops.measure_gemm_tflops("fp32", sides=(64, 128), repeats=1) > 0


def test_achieved_and_share():
    assert flops.achieved(2e12, 2.0) == 1.0 and flops.achieved(None, 1.0) is None
    assert flops.share(1.0, 4.0) == 0.25 and flops.share(None, 4.0) is None


def test_children_run_json_returns_the_childs_last_json_and_its_peak_memory():
    code = "import json; print('noise'); print(json.dumps({'a': 1})); print(json.dumps({'b': 2}))"
    cmd = [sys.executable, "-c", code]
    assert children.run_json(cmd) == {"b": 2}
    result = children.run(cmd)
    assert result.returncode == 0 and result.peak_rss > 0 and result.seconds > 0
    assert children.json_lines(result.stdout) == [{"a": 1}, {"b": 2}]


def test_children_report_a_failing_childs_stderr():
    cmd = [sys.executable, "-c", "import sys; print('out'); sys.exit('boom: the reason')"]
    with pytest.raises(children.ChildFailed, match="boom: the reason"):
        children.run_json(cmd)
    assert children.run(cmd, check=False).returncode == 1


def test_a_child_that_prints_no_json_fails_clearly():
    with pytest.raises(children.ChildFailed, match="printed no JSON"):
        children.run_json([sys.executable, "-c", "print('hello')"])


def test_synthetic_images_are_deterministic_per_seed_and_in_range():
    a, b, c = inputs.synthetic_images(2, 32, seed=3), inputs.synthetic_images(2, 32, seed=3), \
        inputs.synthetic_images(2, 32, seed=4)
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1 and a.std() > 0.1
    assert inputs.synthetic_images(1, 16, 24).shape == (1, 3, 16, 24)
    first, second = inputs.synthetic_batches(2, 2, 16), inputs.synthetic_batches(2, 2, 16)
    assert all(torch.equal(x, y) for x, y in zip(first, second, strict=True))
    assert not torch.equal(first[0], first[1])


def test_written_photos_are_deterministic_per_seed(tmp_path: Path):
    inputs.write_photos(tmp_path / "a", 3, 32, seed=1)
    inputs.write_photos(tmp_path / "b", 3, 32, seed=1)
    files = sorted((tmp_path / "a").iterdir())
    assert len(files) == 3
    assert all(f.read_bytes() == (tmp_path / "b" / f.name).read_bytes() for f in files)


def test_peak_memory_on_cpu_is_the_rss_high_water_mark():
    assert 0 < memory.peak_bytes("cpu") <= memory.peak_rss_bytes()  # a high-water mark only grows
    memory.reset_peak("cpu")  # a no-op off CUDA


def test_report_table_json_and_psnr(tmp_path: Path):
    table = report.markdown([{"a": 1.23456, "b": None}, {"a": float("nan"), "b": True}], [("a", "A"), ("b", "B")])
    assert table.splitlines() == ["| A | B |", "|---|---|", "| 1.235 | – |", "| – | yes |"]
    report.write_json(tmp_path / "sub" / "x.json", {"v": float("nan"), "w": [1.0, float("inf")]})
    assert (tmp_path / "sub" / "x.json").read_text().split() == ['{', '"v":', 'null,', '"w":', '[', '1.0,', 'null',
                                                                  ']', '}']
    x = inputs.synthetic_images(1, 16)
    assert report.psnr(x, x) == math.inf
    assert 20 < report.psnr(x, x + 0.02) < 50


@pytest.mark.parametrize(("mode", "precision"), [("ours", "no"), ("ours", "bf16"), ("ldm", "no"),
                                                 ("example", "bf16"), ("reference", "bf16")])
def test_each_recipe_runs_a_step_on_the_test_preset_and_changes_the_weights(mode, precision):
    from sdvae.model.build import build_preset

    vae = build_preset("test")
    spec = steps.TrainSpec(preset="test", batch=2, resolution=32, precision=precision, lpips_net="squeeze",
                           disc_weight=0.5, disc_layers=2, disc_ndf=8, device="cpu")
    recipe = steps.build_recipe(mode, vae, spec, total_steps=2)
    before = [p.detach().clone() for p in vae.parameters()]
    images = inputs.synthetic_images(2, 32)
    eps = torch.randn(2, vae.config.latent_channels, 4, 4)
    logs = recipe.step(0, images, eps)
    assert math.isfinite(logs["loss"])
    assert any(not torch.equal(b, p) for b, p in zip(before, vae.parameters(), strict=True))
    assert all(p.grad is None for p in vae.parameters())  # the step left no gradients behind
    if mode in ("ours", "ldm"):
        assert recipe.discriminator is not None and recipe.disc_opt.state  # the discriminator stepped too


def test_timed_steps_reports_speed_memory_flops_and_losses():
    from sdvae.model.build import build_preset

    vae = build_preset("test")
    spec = steps.TrainSpec(preset="test", batch=2, resolution=32, lpips=0.0, device="cpu")
    recipe = steps.build_recipe("ldm", vae, spec, total_steps=3)
    row = steps.timed_steps(recipe, spec, (vae.config.latent_channels, 4, 4), steps=2, warmup=1)
    assert row["images_per_s"] > 0 and row["peak_memory"] > 0 and row["flops_per_step"] > 0
    assert math.isfinite(row["first_loss"]) and math.isfinite(row["last_loss"])


def test_image_files_are_sorted_recursive_and_limited(tmp_path: Path):
    for name in ("b/2.jpg", "a.png", "b/1.JPG", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in inputs.image_files(tmp_path)] == ["a.png", "b/1.JPG", "b/2.jpg"]
    assert len(inputs.image_files(tmp_path, 2)) == 2


def test_pack_shards_writes_img2dataset_style_shards_of_the_original_bytes(tmp_path: Path):
    import json

    import webdataset as wds

    inputs.write_photos(tmp_path / "photos", 5, 32, seed=2)
    files = inputs.image_files(tmp_path / "photos")
    src = inputs.pack_shards(files, tmp_path / "shards", 2)
    assert src == f"{tmp_path / 'shards'}/{{00000..00001}}.tar"
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["00000.tar", "00001.tar"]  # no temp left
    samples = list(wds.WebDataset(src, shardshuffle=False))  # what a WebDataset reader makes of them
    assert [s["__key__"] for s in samples] == ["000000000", "000000001", "000000002", "000010000", "000010001"]
    assert [s["jpg"] for s in samples] == [f.read_bytes() for f in files]  # the files' own bytes, in order
    metas = [json.loads(s["json"]) for s in samples]
    assert [m["key"] for m in metas] == [s["__key__"] for s in samples]
    assert [m["url"] for m in metas] == [f.name for f in files]
    from PIL import Image

    assert all((m["width"], m["height"]) == Image.open(f).size and m["status"] == "success"
               for m, f in zip(metas, files, strict=True))
    again = inputs.pack_shards(files, tmp_path / "again", 2)
    assert again.startswith(str(tmp_path / "again"))
    assert all((tmp_path / "again" / n).read_bytes() == (tmp_path / "shards" / n).read_bytes()
               for n in ("00000.tar", "00001.tar"))  # deterministic


def test_pack_shards_refuses_more_shards_than_images(tmp_path: Path):
    inputs.write_photos(tmp_path, 2, 16)
    with pytest.raises(ValueError, match="2 images into 3 shards"):
        inputs.pack_shards(inputs.image_files(tmp_path), tmp_path / "shards", 3)
