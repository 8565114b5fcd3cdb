"""`sdvae eval` / `sample` / `interpolate`: likelihood bounds, metrics, reports, latent-space tools."""

from __future__ import annotations

import json
import math
from pathlib import Path
from unittest import mock

import pytest
import torch

from helpers import make_photo
from sdvae.codec.codec import Codec
from sdvae.errors import UserError
from sdvae.eval.elbo import (
    SIGMA_GRID,
    BoundTerms,
    bound_terms,
    discretized_gaussian_log_likelihood,
    image_generator,
    log_likelihood_per_image,
    summarize_bounds,
)
from sdvae.eval.engine import EvalSettings, evaluate_source, preprocess
from sdvae.eval.latent_space import interpolate_images, interpolation_latents, prior_latents, sample_images, slerp
from sdvae.eval.report import markdown_table, report_json, summary_lines
from sdvae.images.compose import image_grid, labelled_rows
from sdvae.images.sources import open_source
from sdvae.latents.scaling import unscale_latents
from sdvae.metrics.lpips import lpips_distance
from sdvae.metrics.pixel import psnr, quantize, ssim
from sdvae.train.losses import kl_divergence

LEVELS = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # every 8-bit value on the [-1, 1] scale


@pytest.fixture
def codec(test_vae) -> Codec:
    return Codec(test_vae)


@pytest.fixture
def empty_hub(tmp_path: Path):
    """torch hub pointed at an empty folder, and any download attempt made to fail loudly."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    with mock.patch("torch.hub.download_url_to_file", no_download), \
            mock.patch("torch.hub.load_state_dict_from_url", no_download):
        yield tmp_path / "hub"
    torch.hub.set_dir(previous)


def _settings(**kw) -> EvalSettings:
    base = {"resolution": 32, "batch_size": 2, "lpips": False, "fid": False, "workers": 0}
    return EvalSettings(**(base | kw))


def _batch(codec: Codec, n: int = 2, size: int = 32) -> tuple[torch.Tensor, object]:
    x = torch.stack([preprocess(torch.from_numpy(make_photo(size, size, seed=s)).permute(2, 0, 1).float() / 127.5 - 1,
                                _settings(resolution=None)) for s in range(n)])
    return x, codec.encode(x)


# --------------------------------------------------------------------------------------------------
# The likelihood and the bounds
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mean", [-1.5, -1.0, -0.37, 0.0, 0.5, 0.999, 1.0, 3.0])
@pytest.mark.parametrize("sigma", [1 / 255, 0.003, 0.05, 0.5, 4.0])
def test_discretized_gaussian_is_a_distribution_over_the_256_values(mean, sigma):
    log_p = discretized_gaussian_log_likelihood(LEVELS, torch.tensor(mean), sigma)
    assert log_p.dtype == torch.float64 and torch.isfinite(log_p).all() and (log_p <= 0).all()
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_discretized_gaussian_matches_the_gaussian_mass_of_each_bin():
    normal = torch.distributions.Normal(torch.tensor(0.1, dtype=torch.float64), 0.2)
    x = LEVELS[100:110]
    expected = normal.cdf(x + 1 / 255) - normal.cdf(x - 1 / 255)
    torch.testing.assert_close(discretized_gaussian_log_likelihood(x, torch.tensor(0.1), 0.2).exp(), expected)
    # Edge bins reach to ±inf; far tails stay finite (no log(0)) where a naive CDF difference underflows.
    edge = discretized_gaussian_log_likelihood(torch.tensor([-1.0, 1.0]), torch.tensor(0.1), 0.2).exp()
    torch.testing.assert_close(edge, torch.stack([normal.cdf(torch.tensor(-1 + 1 / 255)),
                                                  1 - normal.cdf(torch.tensor(1 - 1 / 255))]))
    far = discretized_gaussian_log_likelihood(torch.tensor([-1.0, 1.0, 0.5]), torch.tensor([1.0, -1.0, -1.0]), 1 / 255)
    assert torch.isfinite(far).all() and (far < -1000).all()


def test_bits_per_dim_of_the_distortion_are_nonnegative(codec):
    x, enc = _batch(codec)
    terms = bound_terms(codec, x, enc, SIGMA_GRID, 2, [image_generator(0, i) for i in range(2)])
    assert terms.log_px.shape == (2, len(SIGMA_GRID), 2) and terms.dims == 3 * 32 * 32
    assert (terms.log_px <= 0).all()  # a probability of the 8-bit image: −log2 p ≥ 0 bits
    assert (terms.distortion() >= 0).all()


def test_elbo_decomposes_into_distortion_and_rate_and_the_rate_estimates_the_kl(codec):
    x, enc = _batch(codec)
    k = 64
    terms = bound_terms(codec, x, enc, (0.1, 0.3), k, [image_generator(3, i) for i in range(2)])
    torch.testing.assert_close(terms.elbo(), -(terms.distortion() + terms.rate()[None]), rtol=1e-12, atol=1e-9)
    # Closed form: the same KL as the training loss (batch mean of nats per image).
    assert terms.kl.mean().item() == pytest.approx(kl_divergence(enc.mean, enc.logvar).item(), rel=1e-5)
    # The Monte-Carlo rate (1/K) Σ log q − log p is an unbiased estimate of it.
    per_sample = -terms.log_prior_ratio  # (K,B)
    tolerance = 5 * per_sample.std(0) / math.sqrt(k) + 1e-6
    assert ((per_sample.mean(0) - terms.kl).abs() <= tolerance).all()


def test_log_density_ratio_is_that_of_the_posterior_and_the_prior(codec):
    x, enc = _batch(codec, n=1)
    terms = bound_terms(codec, x, enc, (0.1,), 3, [image_generator(5, 0)])
    eps = torch.randn((3, *enc.mean.shape[1:]), generator=image_generator(5, 0), dtype=torch.float64)
    mean, std = enc.mean[0].double(), torch.exp(0.5 * enc.logvar[0].double())
    q = torch.distributions.Normal(mean, std)
    prior = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    for j in range(3):
        z = mean + std * eps[j]
        expected = prior.log_prob(z).sum() - q.log_prob(z).sum()
        assert terms.log_prior_ratio[j, 0].item() == pytest.approx(expected.item(), rel=1e-9)


def test_iw_bound_is_never_below_the_elbo_and_equals_it_for_one_sample(codec):
    x, enc = _batch(codec)
    gens = [image_generator(0, i) for i in range(2)]
    one = bound_terms(codec, x, enc, SIGMA_GRID, 1, gens)
    assert torch.equal(one.iw_elbo(), one.elbo())
    many = bound_terms(codec, x, enc, SIGMA_GRID, 6, [image_generator(0, i) for i in range(2)])
    assert (many.iw_elbo() >= many.elbo()).all()
    # The same holds for arbitrary log-weights (Jensen, not luck): large spreads, many shapes.
    gen = torch.Generator().manual_seed(0)
    for k in (1, 2, 5, 50):
        log_px = -torch.rand((k, 3, 4), generator=gen, dtype=torch.float64) * 1e5
        synthetic = BoundTerms(log_px, torch.randn((k, 4), generator=gen, dtype=torch.float64) * 100,
                               torch.zeros(4, dtype=torch.float64), dims=12)
        assert (synthetic.iw_elbo() >= synthetic.elbo()).all()


def test_log_likelihood_per_image_scores_every_sigma():
    x = LEVELS[torch.randint(0, 256, (2, 3, 5, 4), generator=torch.Generator().manual_seed(0))].float()
    recon = x + 0.05
    out = log_likelihood_per_image(x, recon, (0.02, 0.2))
    assert out.shape == (2, 2)
    assert out[1, 0].item() == pytest.approx(discretized_gaussian_log_likelihood(x[0], recon[0], 0.2).sum().item())


def test_sigma_auto_picks_the_grid_maximum():
    gen = torch.Generator().manual_seed(1)
    sigmas = (0.01, 0.02, 0.04, 0.08)
    elbo = -torch.rand((5, 4), generator=gen, dtype=torch.float64) * 1000
    elbo[:, 2] += 400  # the best mean ELBO
    zeros = torch.zeros(5, dtype=torch.float64)
    dims = torch.full((5,), 300.0, dtype=torch.float64)
    out = summarize_bounds(elbo, elbo, -elbo, zeros, zeros, dims, sigmas, fitted=True)
    assert out["sigma"] == 0.04 and out["sigma_index"] == 2 and "fitted" in out["sigma_rule"]
    assert out["elbo_bpd"]["mean"] == min(c["elbo_bpd"] for c in out["curve"])
    assert out["elbo_bpd"]["mean"] == pytest.approx(float((-elbo[:, 2] / (300 * math.log(2))).mean()))
    assert "warning" not in out
    edge = summarize_bounds(elbo[:, :2], elbo[:, :2], -elbo[:, :2], zeros, zeros, dims, sigmas[:2], fitted=True)
    assert "edge of the grid" in edge["warning"]


def test_image_generators_are_independent_of_batching():
    a = torch.randn(4, generator=image_generator(0, 7))
    assert torch.equal(a, torch.randn(4, generator=image_generator(0, 7)))
    assert not torch.equal(a, torch.randn(4, generator=image_generator(0, 8)))
    assert not torch.equal(a, torch.randn(4, generator=image_generator(1, 7)))


# --------------------------------------------------------------------------------------------------
# evaluate_source: metrics, protocol, report
# --------------------------------------------------------------------------------------------------


def test_psnr_ssim_agree_with_sdvae_metrics_and_bad_images_are_counted(codec, folder):
    source = open_source(str(folder))
    report = evaluate_source(codec, source, _settings(), model_ref="test", progress=False)
    assert report["data"]["evaluated"] == 3 and report["data"]["skipped"] == 1
    assert report["data"]["skipped_examples"][0]["name"] == "broken.png"
    assert "broken.png" in report["data"]["skipped_examples"][0]["reason"]
    # The same pairs computed by hand: preprocess, posterior-mean reconstruction, 8-bit, sdvae.metrics.
    names = [n for n in source.files if n != "broken.png"]
    x = torch.stack([preprocess(source.load(source.files.index(n)), _settings()) for n in names])
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
    x = preprocess(source.load(source.files.index("img0.png")), _settings())[None]
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
    x = torch.stack([preprocess(source.load(i), _settings()) for i in range(len(source))
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
# The latent space: prior samples and interpolation
# --------------------------------------------------------------------------------------------------


def test_prior_samples_live_in_the_scaled_space():
    config = {"scaling_factor": 0.25, "shift_factor": 0.5}
    scaled = prior_latents(3, (4, 2, 2), config, seed=1)
    eps = torch.randn((3, 4, 2, 2), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(scaled, unscale_latents(eps, config))
    torch.testing.assert_close(prior_latents(3, (4, 2, 2), config, seed=1, space="vae", temperature=0.5), eps * 0.5)


def test_sample_images_are_deterministic_by_seed(codec):
    a = sample_images(codec, 3, (16, 24), seed=7)
    assert a.shape == (3, 3, 16, 24)
    assert torch.equal(a, sample_images(codec, 3, (16, 24), seed=7))
    # Sample i does not depend on n or the batch size (up to the float differences of batched convolutions).
    torch.testing.assert_close(a, sample_images(codec, 3, (16, 24), seed=7, batch_size=1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[:2], sample_images(codec, 2, (16, 24), seed=7), atol=1e-5, rtol=1e-5)
    assert not torch.equal(a, sample_images(codec, 3, (16, 24), seed=8))
    with pytest.raises(UserError, match="multiple of the model's downsampling factor 8"):
        sample_images(codec, 1, (20, 16))


def test_image_grid_and_labelled_rows_sizes():
    images = torch.zeros(5, 3, 16, 12)
    grid = image_grid(images, nrow=3, padding=2)
    assert grid.size == (3 * 14 + 2, 2 * 18 + 2)
    assert grid.getpixel((0, 0)) == (255, 255, 255) and grid.getpixel((2, 2)) == (128, 128, 128)
    strip = labelled_rows([("linear", images[:4]), ("spherical", images[:4])], padding=2)
    assert strip.height == 2 * 18 + 2 and strip.width > 4 * 14


def test_slerp_properties():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 3, 3, generator=gen), torch.randn(4, 3, 3, generator=gen)
    assert torch.equal(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    b = b * a.norm() / b.norm()  # same norm: slerp stays on the sphere, lerp cuts inside it
    mid = slerp(a, b, 0.5)
    assert mid.norm().item() == pytest.approx(a.norm().item(), rel=1e-5)
    assert torch.lerp(a, b, 0.5).norm() < mid.norm()
    torch.testing.assert_close(slerp(a, 2 * a, 0.5), 1.5 * a)  # parallel: falls back to lerp


def test_interpolation_endpoints_are_the_decoded_posterior_means(codec):
    img_a = torch.from_numpy(make_photo(24, 16, seed=0)).permute(2, 0, 1)[None].float() / 127.5 - 1
    img_b = torch.from_numpy(make_photo(24, 16, seed=5)).permute(2, 0, 1)[None].float() / 127.5 - 1
    paths = interpolate_images(codec, img_a, img_b, 5)
    expected_a = codec.decode(codec.encode(img_a).mean, (16, 24))[0]
    expected_b = codec.decode(codec.encode(img_b).mean, (16, 24))[0]
    for name in ("linear", "spherical"):
        assert paths[name].shape == (5, 3, 16, 24)
        torch.testing.assert_close(paths[name][0], expected_a, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(paths[name][-1], expected_b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(paths["linear"][2], paths["spherical"][2])
    config = {"scaling_factor": 0.5, "shift_factor": 0.3}
    za, zb = torch.randn(1, 4, 2, 3), torch.randn(1, 4, 2, 3)
    latents = interpolation_latents(za, zb, 3, config)
    torch.testing.assert_close(latents["linear"][1], (za[0] + zb[0]) / 2)
    assert torch.equal(latents["spherical"][0], za[0]) and torch.equal(latents["spherical"][-1], zb[0])
    with pytest.raises(UserError, match="at least 2"):
        interpolation_latents(za, zb, 1, config)


# --------------------------------------------------------------------------------------------------
# The commands, as a user runs them
# --------------------------------------------------------------------------------------------------
