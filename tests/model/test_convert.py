"""Weight formats: the diffusers ⇄ LDM key map (sdvae.model.ldm_keys), single-file reading, write_ldm and convert()."""

from __future__ import annotations

import json
import os
import pickletools
import zipfile
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdvae.errors import UserError
from sdvae.model.build import build_preset
from sdvae.model.convert import convert
from sdvae.model.flux2_keys import split_flux2
from sdvae.model.ldm_keys import diffusers_to_ldm, infer_config_from_ldm, ldm_to_diffusers
from sdvae.model.load import load_vae
from sdvae.model.presets import PRESETS
from sdvae.model.save import save_diffusers, write_ldm
from sdvae.model.single_file import read_single_file

ARCH_KEYS = ("block_out_channels", "layers_per_block", "latent_channels", "in_channels", "out_channels",
             "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention")


def _plain(value: object) -> object:
    return list(value) if isinstance(value, (list, tuple)) else value


def _outputs(vae: AutoencoderKL) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder moments and decoder output on a fixed random input."""
    x = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        moments = vae.encode(x).latent_dist
        return torch.cat([moments.mean, moments.logvar], 1), vae.decode(moments.mean).sample


def _assert_same_model(a: AutoencoderKL, b: AutoencoderKL) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for x, y in zip(_outputs(a), _outputs(b), strict=True):
        assert torch.equal(x, y)


@pytest.fixture
def plain_vae() -> AutoencoderKL:
    """The `test` architecture with the GroupNorm count that shape inference picks for it (8, not 4).

    Files from elsewhere carry no group count, and for channels (8, 8, 16, 16) inference picks the
    largest count that divides them all, so round trips through such files use this model.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoencoderKL(**{**PRESETS["test"].config, "norm_num_groups": 8}).eval()


@pytest.mark.parametrize("name", list(PRESETS))
def test_key_map_roundtrip_bit_identical(name: str) -> None:
    """diffusers -> LDM -> diffusers gives back the same tensors; the LDM side matches diffusers' own reader."""
    vae = build_preset(name)
    sd, _ = split_flux2(vae.state_dict())  # FLUX.2's BatchNorm is not part of the LDM key map (flux2_keys)
    sd["decoder.conv_out.bias"] = sd["decoder.conv_out.bias"].to(torch.bfloat16)  # dtypes must survive too
    ldm = diffusers_to_ldm(sd)
    back = ldm_to_diffusers(ldm)
    assert list(back) == list(sd)
    for key, tensor in sd.items():
        assert back[key].dtype == tensor.dtype and back[key].shape == tensor.shape, key
        assert torch.equal(back[key], tensor), key
    # Layout facts of the original LDM naming.
    chans, levels = PRESETS[name].config["block_out_channels"], len(PRESETS[name].config["block_out_channels"])
    assert ldm["decoder.up.0.block.0.conv1.weight"].shape[0] == chans[0]  # LDM up[0] is full resolution
    assert f"decoder.up.{levels - 1}.upsample.conv.weight" in ldm and "decoder.up.0.upsample.conv.weight" not in ldm
    if PRESETS[name].config.get("mid_block_add_attention", True):
        assert ldm["encoder.mid.attn_1.q.weight"].shape == (chans[-1], chans[-1], 1, 1)
    # Independent oracle: diffusers' own LDM reader gives the same dict.
    config = infer_config_from_ldm(ldm)
    theirs = convert_ldm_vae_checkpoint(dict(ldm), config)
    assert theirs.keys() == sd.keys() and all(torch.equal(theirs[k], sd[k]) for k in sd)
    for key in ARCH_KEYS:
        assert _plain(config[key]) == _plain(vae.config[key]), key
    assert config["norm_num_groups"] == (8 if name == "test" else 32)


def test_old_diffusers_attention_names_accepted(test_vae: AutoencoderKL) -> None:
    sd = test_vae.state_dict()
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, tensor in sd.items():
        for new, legacy in old.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{legacy}.")
        renamed[key] = tensor
    assert any(".query." in k for k in renamed)
    back = ldm_to_diffusers(diffusers_to_ldm(renamed))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    both = {**sd, "encoder.mid_block.attentions.0.query.weight": sd["encoder.mid_block.attentions.0.to_q.weight"]}
    with pytest.raises(UserError, match=r"attentions\.0\.query\.weight"):
        diffusers_to_ldm(both)


def test_ldm_attention_as_linear_or_conv1d_accepted(test_vae: AutoencoderKL) -> None:
    ldm = diffusers_to_ldm(test_vae.state_dict())
    ldm["encoder.mid.attn_1.k.weight"] = ldm["encoder.mid.attn_1.k.weight"][:, :, 0, 0]
    ldm["decoder.mid.attn_1.proj_out.weight"] = ldm["decoder.mid.attn_1.proj_out.weight"][:, :, 0]
    back = ldm_to_diffusers(ldm)
    sd = test_vae.state_dict()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize(("direction", "edit", "named"), [
    ("diffusers", lambda sd: sd.update({"encoder.down_blocks.0.resnets.0.extra.weight": torch.zeros(1)}),
     "encoder.down_blocks.0.resnets.0.extra.weight"),
    ("diffusers", lambda sd: sd.update({"decoder.up_blocks.0.resnets.5.conv1.weight": torch.zeros(1)}),
     "decoder.up_blocks.0.resnets.5.conv1.weight"),
    ("diffusers", lambda sd: sd.pop("decoder.up_blocks.1.resnets.0.norm2.bias"),
     "decoder.up_blocks.1.resnets.0.norm2.bias"),
    ("diffusers", lambda sd: sd.update({"decoder.up_blocks.1.resnets.0.conv2.weight": torch.zeros(16, 16, 1, 1)}),
     "decoder.up_blocks.1.resnets.0.conv2.weight"),
    ("diffusers", lambda sd: sd.update({"encoder.mid_block.attentions.0.to_v.weight": torch.zeros(16, 16, 1, 1)}),
     "encoder.mid_block.attentions.0.to_v.weight"),
    ("ldm", lambda sd: sd.update({"model_ema.decay": torch.zeros(())}), "model_ema.decay"),
    ("ldm", lambda sd: sd.update({"encoder.down.0.block.0.extra.weight": torch.zeros(1)}),
     "encoder.down.0.block.0.extra.weight"),
    ("ldm", lambda sd: sd.pop("decoder.up.2.upsample.conv.bias"), "decoder.up.2.upsample.conv.bias"),
    ("ldm", lambda sd: sd.update({"decoder.up.2.block.1.conv1.bias": torch.zeros(3)}),
     "decoder.up.2.block.1.conv1.bias"),
    ("ldm", lambda sd: sd.update({"quant_conv.weight": torch.zeros(8, 8, 3, 3)}), "quant_conv.weight"),
])
def test_unmapped_missing_or_misshaped_key_is_named(test_vae: AutoencoderKL, direction: str, edit, named: str) -> None:
    sd = test_vae.state_dict() if direction == "diffusers" else diffusers_to_ldm(test_vae.state_dict())
    edit(sd)
    with pytest.raises(UserError) as err:
        (diffusers_to_ldm if direction == "diffusers" else ldm_to_diffusers)(sd)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_norm_groups_inference() -> None:
    base = diffusers_to_ldm(build_preset("test").state_dict())
    assert infer_config_from_ldm(base)["norm_num_groups"] == 8
    with torch.device("meta"):
        odd = AutoencoderKL(block_out_channels=[48, 96], down_block_types=["DownEncoderBlock2D"] * 2,
                            up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=24)
    assert infer_config_from_ldm(diffusers_to_ldm(odd.state_dict()))["norm_num_groups"] == 24


def test_write_ldm_loads_in_diffusers_from_single_file(test_vae: AutoencoderKL, tmp_path: Path) -> None:
    """Parity: diffusers' own single-file loader reads our LDM file into the identical model (offline)."""
    folder = save_diffusers(test_vae, tmp_path / "folder")
    path = write_ldm(test_vae, tmp_path / "vae.safetensors")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left
    (tmp_path / "plain").touch()
    assert path.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777  # umask, not 0600
    theirs = AutoencoderKL.from_single_file(str(path), config=str(folder)).eval()
    _assert_same_model(theirs, test_vae)
    keys = set(load_file(path))
    assert "decoder.up.3.upsample.conv.weight" in keys and "encoder.mid.attn_1.proj_out.weight" in keys
    # Our own reader restores even what shapes cannot tell (group count 4), from the file's metadata.
    _assert_same_model(load_vae(path), test_vae)
    assert load_vae(path).config.norm_num_groups == 4


def _ldm_file(vae: AutoencoderKL, path: Path, prefix: str = "", extra: dict | None = None) -> Path:
    tensors = {prefix + k: v for k, v in diffusers_to_ldm(vae.state_dict()).items()}
    save_file({**tensors, **(extra or {})}, path)
    return path


WAYS_IN = {
    "ldm": lambda v, d: _ldm_file(v, d / "vae.safetensors"),
    "full_sd_checkpoint": lambda v, d: _ldm_file(v, d / "sd.safetensors", "first_stage_model.", {
        "model.diffusion_model.input_blocks.0.0.weight": torch.ones(2, 2),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(3),
        "alphas_cumprod": torch.ones(10)}),
    "vae_prefix": lambda v, d: _ldm_file(v, d / "vae_prefix.safetensors", "vae.", {"text_encoder.w": torch.ones(1)}),
    "ldm_with_training_state": lambda v, d: _ldm_file(v, d / "train.safetensors", "", {
        "loss.logvar": torch.zeros(()), "model_ema.num_updates": torch.tensor(3)}),
    "ckpt": lambda v, d: _ckpt(v, d / "model.ckpt"),
    "diffusers_single_file": lambda v, d: _save(v.state_dict(), d / "diffusion_pytorch_model.safetensors"),
    "diffusers_bin": lambda v, d: _torch_save(v.state_dict(), d / "diffusion_pytorch_model.bin"),
}


def _save(tensors: dict, path: Path) -> Path:
    save_file(tensors, path)
    return path


def _torch_save(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path


def _ckpt(vae: AutoencoderKL, path: Path) -> Path:
    ldm = diffusers_to_ldm(vae.state_dict())
    state = {f"first_stage_model.{k}": v for k, v in ldm.items()}
    state["model.diffusion_model.out.0.weight"] = torch.ones(4)
    return _torch_save({"state_dict": state, "global_step": 10, "epoch": 1}, path)


@pytest.mark.parametrize("way", list(WAYS_IN))
def test_load_vae_single_files(plain_vae: AutoencoderKL, tmp_path: Path, way: str) -> None:
    """Every single-file form loads into the identical model (architecture inferred from shapes)."""
    path = WAYS_IN[way](plain_vae, tmp_path)
    loaded = load_vae(path)
    _assert_same_model(loaded, plain_vae)
    config, state = read_single_file(path)
    for key in ARCH_KEYS:
        assert _plain(config[key]) == _plain(plain_vae.config[key]), key
    assert list(state) == list(plain_vae.state_dict())


def test_test_preset_without_metadata_gets_inferred_groups(test_vae: AutoencoderKL, tmp_path: Path) -> None:
    """Files from other tools carry no group count: the weights load exactly, groups are inferred (8)."""
    config, state = read_single_file(_ldm_file(test_vae, tmp_path / "vae.safetensors"))
    assert config["norm_num_groups"] == 8
    sd = test_vae.state_dict()
    assert all(torch.equal(state[k], sd[k]) for k in sd)


class _Payload:
    """Unpickling this runs _leave_marker: proof that a loader executed code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_leave_marker, (str(self.marker),))


def _leave_marker(path: str) -> None:
    Path(path).write_text("code from the checkpoint ran")


def test_pickle_with_code_is_refused_not_run(plain_vae: AutoencoderKL, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    ldm = diffusers_to_ldm(plain_vae.state_dict())
    path = _torch_save({"state_dict": ldm, "callbacks": _Payload(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(UserError, match="refused") as err:
        load_vae(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()
    # The payload is real: the file's pickle calls _leave_marker on load (read as opcodes, never run).
    with zipfile.ZipFile(path) as archive:
        pkl = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(pkl)]
    assert any(name == "GLOBAL" and str(arg).endswith(" _leave_marker") for name, arg in ops)
    assert any(name == "REDUCE" for name, _ in ops)


def _truncated(tmp: Path, vae: AutoencoderKL, suffix: str) -> Path:
    good = write_ldm(vae, tmp / "good.safetensors") if suffix == ".safetensors" else _ckpt(vae, tmp / "good.ckpt")
    data = good.read_bytes()
    bad = tmp / f"truncated{suffix}"
    bad.write_bytes(data[: len(data) // 2])
    return bad


@pytest.mark.parametrize("case", ["truncated.safetensors", "truncated.ckpt", "garbage.safetensors", "garbage.ckpt",
                                  "garbage.pt", "empty.safetensors", "missing.safetensors", "no_vae.safetensors",
                                  "no_vae.pth", "weights.onnx", "header_only.safetensors"])
def test_unreadable_files_name_the_file(plain_vae: AutoencoderKL, tmp_path: Path, case: str) -> None:
    stem, suffix = case.split(".")
    path = tmp_path / case
    if stem == "truncated":
        path = _truncated(tmp_path, plain_vae, f".{suffix}")
    elif stem == "garbage":
        path.write_bytes(os.urandom(64) + b"not weights at all" * 20)
    elif stem == "empty":
        path.write_bytes(b"")
    elif stem == "no_vae" and suffix == "safetensors":
        save_file({"model.diffusion_model.w": torch.ones(2), "encoder_hidden.w": torch.ones(1)}, path)
    elif stem == "no_vae":
        torch.save({"state_dict": {"model.w": torch.ones(2)}}, path)
    elif stem == "weights":
        path.write_bytes(b"\0" * 16)
    elif stem == "header_only":
        header = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
        path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    with pytest.raises(UserError) as err:
        load_vae(path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message


def test_unused_key_in_file_is_named_with_the_file(plain_vae: AutoencoderKL, tmp_path: Path) -> None:
    path = _ldm_file(plain_vae, tmp_path / "odd.safetensors", extra={"encoder.mid.attn_2.q.weight": torch.ones(1)})
    with pytest.raises(UserError, match=r"odd\.safetensors: .*encoder\.mid\.attn_2\.q\.weight"):
        read_single_file(path)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_dtype_written_as_requested(test_vae: AutoencoderKL, tmp_path: Path, dtype: str) -> None:
    want = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    path = convert("test", tmp_path / f"vae_{dtype}.safetensors", to="ldm", dtype=dtype)
    with safe_open(path, framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict) == {dtype.upper().replace("FP", "F")}
    assert next(test_vae.parameters()).dtype == torch.float32  # the model itself is not cast
    loaded = load_vae(path)  # load_vae works in fp32: the stored values, upcast
    sd = test_vae.state_dict()
    assert all(torch.equal(v, sd[k].to(want).float()) for k, v in loaded.state_dict().items())
    folder = convert(path, tmp_path / "folder", to="diffusers", dtype=dtype)
    assert {t.dtype for t in load_file(folder / "diffusion_pytorch_model.safetensors").values()} == {want}


def test_convert_both_ways_is_exact(test_vae: AutoencoderKL, tmp_path: Path) -> None:
    folder = convert("test", tmp_path / "a", to="diffusers")
    ldm = convert(folder, tmp_path / "a.safetensors", to="ldm")
    back = convert(ldm, tmp_path / "b", to="diffusers")
    a, b = (load_file(f / "diffusion_pytorch_model.safetensors") for f in (folder, back))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _assert_same_model(load_vae(back), test_vae)
    with pytest.raises(UserError, match="--force"):
        convert("test", ldm, to="ldm")
    with pytest.raises(UserError, match=r"\.safetensors"):
        convert("test", tmp_path / "out.ckpt", to="ldm")
    with pytest.raises(UserError, match="ldm"):
        convert("test", tmp_path / "c", to="onnx")


def test_write_ldm_is_atomic(test_vae: AutoencoderKL, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_ldm(test_vae, tmp_path / "vae.safetensors")
    with pytest.raises(UserError, match="--force"):
        write_ldm(test_vae, path)
    write_ldm(test_vae, path, dtype="bf16", overwrite=True)
    assert {t.dtype for t in load_file(path).values()} == {torch.bfloat16}
    before = path.read_bytes()

    def failing_save(tensors: dict, filename: str | os.PathLike[str], metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_ldm(test_vae, path, dtype="fp16", overwrite=True)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae.safetensors"]
