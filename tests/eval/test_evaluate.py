"""`sdvae eval`: protocol, metrics, unavailable networks, reports, the command."""


from __future__ import annotations

import json
import math
from pathlib import Path
from unittest import mock

import pytest
import torch

from sdvae.errors import UserError
from sdvae.eval.elbo import (
    SIGMA_GRID,
)
from sdvae.eval.engine import EvalSettings, apply_protocol, evaluate_source
from sdvae.eval.report import markdown_table, report_json, summary_lines
from sdvae.images.sources import open_source
from sdvae.metrics.lpips import lpips_distance
from sdvae.metrics.pixel import psnr, quantize, ssim

LEVELS = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # every 8-bit value on the [-1, 1] scale


def _settings(**kw) -> EvalSettings:
    base = {"resolution": 32, "batch_size": 2, "lpips": False, "fid": False, "workers": 0}
    return EvalSettings(**(base | kw))


# --------------------------------------------------------------------------------------------------
# evaluate_source: metrics, protocol, report
# --------------------------------------------------------------------------------------------------


def test_psnr_ssim_agree_with_sdvae_metrics_and_bad_images_are_counted(codec, folder):
    source = open_source(str(folder))
    report = evaluate_source(codec, source, _settings(), model_ref="test", progress=False)
    assert report["data"]["evaluated"] == 3 and report["data"]["skipped"] == 1
    assert report["data"]["skipped_examples"][0]["name"] == "broken.png"
    assert "broken.png" in report["data"]["skipped_examples"][0]["reason"]
    # The same pairs computed by hand: apply_protocol, posterior-mean reconstruction, 8-bit, sdvae.metrics.
    names = [n for n in source.files if n != "broken.png"]
    x = torch.stack([apply_protocol(source.load(source.files.index(n)), _settings()) for n in names])
    recon, _ = codec.roundtrip(x)
    expected_psnr, expected_ssim = psnr(quantize(x), quantize(recon)), ssim(quantize(x), quantize(recon))
    got = {row["name"]: row for row in report["per_image"]}
    for i, name in enumerate(names):
        assert got[name]["psnr"] == pytest.approx(expected_psnr[i].item(), abs=1e-4)
        assert got[name]["ssim"] == pytest.approx(expected_ssim[i].item(), abs=1e-5)
    metrics = report["metrics"]
    assert metrics["psnr"]["mean"] == pytest.approx(expected_psnr.double().mean().item(), abs=1e-4)
    assert metrics["psnr"]["std"] == pytest.approx(expected_psnr.double().std(correction=0).item(), abs=1e-4)
    assert metrics["ssim"]["mean"] == pytest.approx(expected_ssim.double().mean().item(), abs=1e-5)
    assert metrics["lpips"] == {"available": False, "reason": "not requested (--no-lpips)"}
    assert metrics["elbo"]["iw_bpd"]["mean"] <= metrics["elbo"]["elbo_bpd"]["mean"]


def test_nothing_readable_is_a_user_error(codec, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(UserError, match=r"none of the 1 images could be evaluated \(first: .*bad\.png"):
        evaluate_source(codec, open_source(str(tmp_path)), _settings(), model_ref="test", progress=False)


def test_fitted_sigma_is_the_curve_minimum_and_a_fixed_sigma_reproduces_it(codec, folder):
    source = open_source(str(folder))
    auto = evaluate_source(codec, source, _settings(iw_samples=2), model_ref="test", progress=False)["metrics"]["elbo"]
    assert auto["sigma"] in SIGMA_GRID and len(auto["curve"]) == len(SIGMA_GRID)
    assert auto["elbo_bpd"]["mean"] == pytest.approx(min(c["elbo_bpd"] for c in auto["curve"]), rel=1e-12)
    fixed = evaluate_source(codec, source, _settings(iw_samples=2, sigma=auto["sigma"]), model_ref="test",
                            progress=False)["metrics"]["elbo"]
    assert fixed["sigma_rule"] == "fixed (--sigma)" and len(fixed["curve"]) == 1
    # Same seeds, same samples: the same bound, whatever the batch size.
    assert fixed["elbo_bpd"]["mean"] == pytest.approx(auto["elbo_bpd"]["mean"], rel=1e-9)
    rebatched = evaluate_source(codec, source, _settings(iw_samples=2, sigma=auto["sigma"], batch_size=1),
                                model_ref="test", progress=False)["metrics"]["elbo"]
    assert rebatched["elbo_bpd"]["mean"] == pytest.approx(fixed["elbo_bpd"]["mean"], rel=1e-6)
    assert rebatched["iw_bpd"]["mean"] <= rebatched["elbo_bpd"]["mean"]


def test_full_resolution_keeps_each_size(codec, folder):
    report = evaluate_source(codec, open_source(str(folder)), _settings(resolution=None, batch_size=4),
                             model_ref="test", progress=False)
    assert report["protocol"]["resolution"] is None and not report["protocol"]["center_crop"]
    assert report["data"]["evaluated"] == 3
    assert report["protocol"]["preprocessing"].startswith("full resolution")


def test_missing_lpips_and_inception_weights_are_reported_unavailable(codec, folder, empty_hub):
    report = evaluate_source(codec, open_source(str(folder)), _settings(lpips=True, fid=True), model_ref="test",
                             progress=False)
    lp, fid = report["metrics"]["lpips"], report["metrics"]["rfid"]
    assert not lp["available"] and not fid["available"]
    assert "vgg16-397923af.pth" in lp["reason"] and "--lpips-weights" in lp["reason"]
    assert str(empty_hub / "checkpoints") in lp["reason"] and "\n" not in lp["reason"]
    assert "weights-inception-2015-12-05-6726825d.pth" in fid["reason"] and "--inception-weights" in fid["reason"]
    assert "\n" not in fid["reason"]
    assert report["metrics"]["psnr"]["available"] and report["metrics"]["elbo"]["available"]
    lines = summary_lines(report)
    assert any(line.startswith("LPIPS  unavailable: ") for line in lines)
    assert any(line.startswith("rFID   unavailable: ") for line in lines)
    # An explicit file that does not exist is the user's typo: a one-line error, not a silent n/a.
    for kw in ({"lpips": True, "lpips_weights": str(empty_hub / "nope.pth")},
               {"fid": True, "inception_weights": str(empty_hub / "nope.pth")}):
        with pytest.raises(UserError, match=r"nope\.pth: no such file"):
            evaluate_source(codec, open_source(str(folder)), _settings(**kw), model_ref="test", progress=False)


def test_lpips_with_local_backbone_weights(codec, folder, empty_hub, tmp_path):
    from torchvision.models import squeezenet1_1

    from sdvae.metrics.lpips import build_lpips

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        torch.save(squeezenet1_1(weights=None).state_dict(), tmp_path / "squeeze.pth")
    source = open_source(str(folder))
    report = evaluate_source(codec, source, _settings(lpips=True, lpips_net="squeeze",
                                                      lpips_weights=str(tmp_path / "squeeze.pth")),
                             model_ref="test", progress=False)
    lp = report["metrics"]["lpips"]
    assert lp["available"] and lp["net"] == "squeeze"
    assert "squeeze.pth" in report["protocol"]["lpips"] and "sha256:" in report["protocol"]["lpips"]
    x = apply_protocol(source.load(source.files.index("img0.png")), _settings())[None]
    recon, _ = codec.roundtrip(x)
    expected = lpips_distance(build_lpips("squeeze", tmp_path / "squeeze.pth"), quantize(x) * 2 - 1,
                              quantize(recon) * 2 - 1)
    row = next(r for r in report["per_image"] if r["name"] == "img0.png")
    assert row["lpips"] == pytest.approx(expected.item(), rel=1e-5)


def _random_inception(path: Path) -> None:
    """A randomly initialised torch-fidelity InceptionV3 state dict (the real one needs a download)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None), \
            torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), path)


def test_rfid_with_local_inception_weights(codec, folder, empty_hub, tmp_path):
    from torchmetrics.image.fid import FrechetInceptionDistance

    weights = tmp_path / "inception.pth"
    _random_inception(weights)
    source = open_source(str(folder))
    report = evaluate_source(codec, source, _settings(fid=True, inception_weights=str(weights)), model_ref="test",
                             progress=False)
    fid = report["metrics"]["rfid"]
    assert fid["available"] and math.isfinite(fid["value"]) and fid["value"] >= 0
    assert "inception.pth" in report["protocol"]["rfid"]
    # The number is torchmetrics' own FID of the 8-bit inputs vs the 8-bit reconstructions.
    x = torch.stack([apply_protocol(source.load(i), _settings()) for i in range(len(source))
                     if source.files[i] != "broken.png"])
    recon, _ = codec.roundtrip(x)
    direct = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights))
    direct.update((quantize(x) * 255).round().to(torch.uint8), real=True)
    direct.update((quantize(recon) * 255).round().to(torch.uint8), real=False)
    assert fid["value"] == pytest.approx(float(direct.compute()), abs=1e-6)
    # A file that is not that network's state dict is refused in one line.
    torch.save({"nope": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(UserError, match=r"wrong\.pth: not torch-fidelity's Inception") as err:
        evaluate_source(codec, source, _settings(fid=True, inception_weights=str(tmp_path / "wrong.pth")),
                        model_ref="test", progress=False)
    assert "\n" not in str(err.value)


def test_report_json_and_markdown(codec, folder):
    report = evaluate_source(codec, open_source(str(folder)), _settings(iw_samples=3, seed=4), model_ref="test",
                             progress=False)
    data = json.loads(report_json(report))
    protocol = data["protocol"]
    for key in ("resolution", "center_crop", "preprocessing", "likelihood", "prior", "sigma_rule", "iw_samples",
                "seed", "dtype", "device", "versions"):
        assert key in protocol, key
    assert protocol["resolution"] == 32 and protocol["center_crop"] and protocol["iw_samples"] == 3
    assert protocol["seed"] == 4 and protocol["versions"]["torch"] == torch.__version__
    assert "2/255" in protocol["likelihood"] and "N(0, I)" in protocol["prior"]
    assert data["model"]["ref"] == "test" and len(data["model"]["config_hash"]) == 16
    elbo = data["metrics"]["elbo"]
    for key in ("sigma", "sigma_8bit", "elbo_bpd", "iw_bpd", "distortion_bpd", "rate_bpd", "kl_closed_form_bpd"):
        assert key in elbo, key
    assert elbo["elbo_bpd"]["mean"] == pytest.approx(elbo["distortion_bpd"]["mean"] + elbo["rate_bpd"]["mean"])
    assert len(data["per_image"]) == 3
    header, align, row = markdown_table(report).splitlines()
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert header.startswith("| Model | Data | Resolution | Images | rFID | PSNR | SSIM | LPIPS | ELBO")
    assert len(cells) == 9 == align.count("---")
    assert cells[:5] == ["test", "data", "32² center crop", "3", "n/a"] and cells[7] == "n/a"
    assert " +/- " in cells[5] and " +/- " in cells[6]
    assert cells[8] == f"{elbo['elbo_bpd']['mean']:.3f}"


def test_report_json_turns_infinite_psnr_into_null():
    assert json.loads(report_json({"psnr": math.inf, "rows": [{"x": -math.inf}, 1.5]})) == {
        "psnr": None, "rows": [{"x": None}, 1.5]}


def test_eval_settings_are_checked():
    for kw, match in (({"iw_samples": 0}, "--iw"), ({"batch_size": 0}, "--batch-size"), ({"sigma": -1.0}, "--sigma"),
                      ({"resolution": 8}, "--resolution"), ({"limit": 0}, "--limit")):
        with pytest.raises(UserError, match=match):
            EvalSettings(**kw).check()


# --------------------------------------------------------------------------------------------------
# The commands, as a user runs them
# --------------------------------------------------------------------------------------------------
