"""Model presets, loading from every supported reference, and saving.

The model class is ``diffusers.AutoencoderKL``; this module only decides which config and which
weights go into it. Everything that can be loaded is listed in :func:`load_vae`.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdvae.errors import UserError

if TYPE_CHECKING:  # torch/diffusers load lazily so `import sdvae.model` stays cheap
    import torch
    from diffusers import AutoencoderKL

_SD_BLOCKS = {
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "in_channels": 3,
    "out_channels": 3,
}


@dataclass(frozen=True)
class Preset:
    """A named AutoencoderKL architecture with its latent scaling.

    Attributes:
        description: one line for ``sdvae info`` and ``--help``.
        config: keyword arguments for ``diffusers.AutoencoderKL``.
    """

    description: str
    config: dict[str, Any] = field(default_factory=dict)


# The one preset registry. CLI choices and tests iterate over it.
PRESETS: dict[str, Preset] = {
    "sd": Preset(
        "Stable Diffusion 1.x/2.x VAE (kl-f8, 4 latent channels)",
        {**_SD_BLOCKS, "latent_channels": 4, "sample_size": 512, "scaling_factor": 0.18215},
    ),
    "sdxl": Preset(
        "SDXL VAE (SD architecture, scaling 0.13025, runs in fp32 by default)",
        {**_SD_BLOCKS, "latent_channels": 4, "sample_size": 1024, "scaling_factor": 0.13025,
         "force_upcast": True},
    ),
    "sd3": Preset(
        "Stable Diffusion 3 VAE (16 latent channels, no quant convs)",
        {**_SD_BLOCKS, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 1.5305,
         "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False},
    ),
    "flux": Preset(
        "FLUX.1 VAE (16 latent channels, no quant convs)",
        {**_SD_BLOCKS, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 0.3611,
         "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False},
    ),
    "tiny": Preset(
        "small f8c4 VAE that trains on 2 CPU cores (the embedded checkpoint's architecture)",
        {**_SD_BLOCKS, "block_out_channels": [32, 64, 128, 128], "layers_per_block": 1, "latent_channels": 4,
         "sample_size": 256, "scaling_factor": 0.18215, "force_upcast": False,
         # Attention trained on 8x8 latents does not carry over to full-size images (measured).
         "mid_block_add_attention": False,
         # 4 to 16 channels per group, as SD's 128-512 channels in 32 groups. With 32 groups the
         # 32-channel layers normalise each channel on its own and remove its image-wide mean (an overall
         # colour): Kodak's red door (kodim02) came back at 20.4 dB with 32 groups, 27.3 dB after
         # regrouping and 1,000 steps (checkpoints/sdvae-tiny-f8c4/README.md).
         "norm_num_groups": 8},
    ),
    "test": Preset(
        "micro f8c4 VAE for unit tests (with mid-block attention)",
        {**_SD_BLOCKS, "block_out_channels": [8, 8, 16, 16], "layers_per_block": 1,
         "norm_num_groups": 4, "latent_channels": 4, "sample_size": 64, "scaling_factor": 0.5,
         "force_upcast": False},
    ),
}

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
DTYPES = ("fp32", "fp16", "bf16")
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def torch_dtype(name: str) -> torch.dtype:
    """Map 'fp32' | 'fp16' | 'bf16' to a torch dtype."""
    import torch

    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in table:
        raise UserError(f"unknown dtype '{name}': choose one of {', '.join(table)}")
    return table[name]


def build_preset(name: str, seed: int = 0) -> AutoencoderKL:
    """Build a preset with a seeded random initialisation (same seed, same weights, on any machine).

    Args:
        name: a key of :data:`PRESETS`.
        seed: seed for the weight initialisation.
    """
    import torch
    from diffusers import AutoencoderKL

    if name not in PRESETS:
        raise UserError(f"unknown preset '{name}': choose one of {', '.join(PRESETS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**PRESETS[name].config)
    return vae.eval()


def _is_diffusers_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def _load_diffusers_folder(path: Path) -> AutoencoderKL:
    from diffusers import AutoencoderKL

    folder = path if _is_diffusers_folder(path) else path / "vae"
    try:
        return AutoencoderKL.from_pretrained(folder).float().eval()
    except (OSError, ValueError, RuntimeError, KeyError, json.JSONDecodeError) as err:
        raise UserError(f"{folder}: not a loadable diffusers AutoencoderKL folder ({_first_line(err)})") from None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hub endpoint accepts a TCP connection (fails fast instead of retrying for a minute)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _load_hub(ref: str) -> AutoencoderKL:
    from diffusers import AutoencoderKL

    name = ref.split("/")[-1]
    # The local Hugging Face cache first: it works offline and costs no request.
    for subfolder in (None, "vae"):
        try:
            with warnings.catch_warnings():  # huggingface_hub deprecation chatter is not for our users
                warnings.simplefilter("ignore")
                return AutoencoderKL.from_pretrained(ref, subfolder=subfolder, local_files_only=True).eval()
        except Exception:  # not cached (or cached without this subfolder): try the next way
            pass
    if not _hub_reachable():
        raise UserError(
            f"cannot load '{ref}': not in the local Hugging Face cache and the Hub is unreachable; "
            f"download it where there is network and pass the folder, e.g. --model /path/to/{name}"
        )
    errors = []
    for subfolder in (None, "vae"):
        try:
            return AutoencoderKL.from_pretrained(ref, subfolder=subfolder).eval()
        except Exception as err:  # hub errors come in many types; all mean "not loadable"
            errors.append(_first_line(err))
    raise UserError(f"cannot load '{ref}' from the Hugging Face Hub ({errors[-1]}); "
                    f"pass a local folder instead, e.g. --model /path/to/{name}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]


def load_vae(ref: str | os.PathLike[str], *, preset_scaling: str | None = None,
             norm_num_groups: int = 0) -> AutoencoderKL:
    """Load an AutoencoderKL from any supported reference, in eval mode, fp32, on CPU.

    Args:
        ref: one of
            * a preset name (:data:`PRESETS`), built with a seeded random init;
            * a diffusers folder (``config.json`` + weights), or a pipeline folder with ``vae/``;
            * a single file: original LDM / A1111 checkpoint or diffusers-keyed weights
              (``.safetensors``; ``.ckpt``/``.pt``/``.pth``/``.bin`` are read with
              ``torch.load(weights_only=True)``), with or without a ``first_stage_model.``/``vae.``
              prefix; the architecture is inferred from tensor shapes;
            * a Hugging Face Hub id (``org/name``), through diffusers' own loading.
        preset_scaling: for single files: take scaling/shift from this preset (e.g. ``"sdxl"`` or
            ``"flux"``). Files written by ``sdvae convert`` record their own; for other files, which
            carry none, 4-channel files get ``sd``'s and 16-channel files ``sd3``'s.
        norm_num_groups: if positive, regroup every GroupNorm after loading (:func:`regroup_norms`);
            0 keeps the reference's own.

    Raises:
        UserError: the reference cannot be resolved or loaded; the message names it.
    """
    vae = _load(ref, preset_scaling)
    return regroup_norms(vae, norm_num_groups) if norm_num_groups else vae


def _load(ref: str | os.PathLike[str], preset_scaling: str | None) -> AutoencoderKL:
    ref_str = os.fspath(ref)
    if ref_str in PRESETS:
        return build_preset(ref_str)
    path = Path(ref_str).expanduser()
    if path.is_dir():
        if _is_diffusers_folder(path) or _is_diffusers_folder(path / "vae"):
            return _load_diffusers_folder(path)
        raise UserError(f"{path}: folder has no config.json (nor vae/config.json); not a diffusers model")
    if path.is_file():
        if path.name == "config.json":
            return _load_diffusers_folder(path.parent)
        return _load_single_file(path, preset_scaling)
    looks_like_path = (
        path.suffix.lower() in SINGLE_FILE_SUFFIXES
        or ref_str.startswith((".", "/", "~"))
        or ref_str.count("/") != 1
    )
    if looks_like_path:
        raise UserError(
            f"{ref_str}: no such file, folder or preset (presets: {', '.join(PRESETS)})"
        )
    return _load_hub(ref_str)


def _load_single_file(path: Path, preset_scaling: str | None) -> AutoencoderKL:
    from sdvae.convert import read_single_file

    config, state_dict = read_single_file(path)
    latent = config["latent_channels"]
    # Files we wrote record their scaling (sdvae metadata); other files get the family default.
    scaling_from = preset_scaling or (
        None if "scaling_factor" in config else "sd" if latent == 4 else "sd3" if latent == 16 else None)
    if scaling_from is not None:
        if scaling_from not in PRESETS:
            raise UserError(f"unknown preset '{scaling_from}' for scaling: choose one of {', '.join(PRESETS)}")
        for key in ("scaling_factor", "shift_factor", "force_upcast", "sample_size"):
            if key in PRESETS[scaling_from].config:
                config[key] = PRESETS[scaling_from].config[key]
    return _with_weights(config, state_dict).float().eval()


def _with_weights(config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> AutoencoderKL:
    """An AutoencoderKL of ``config`` holding exactly ``state_dict``'s tensors (no random init first)."""
    import torch
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    vae.load_state_dict(state_dict, strict=True, assign=True)
    return vae


def regroup_norms(vae: AutoencoderKL, groups: int) -> AutoencoderKL:
    """The same weights with every GroupNorm using ``groups`` groups (a new model; ``vae`` is untouched).

    GroupNorm's affine parameters are per channel, so the weights fit any group count that divides
    every width. Fewer groups let a layer keep its channels' relative means: with one channel per
    group (the ``tiny`` preset's 32 groups on its 32-channel full-resolution layers) the decoder's last
    normalisation removes each channel's image-wide mean, and an image's overall colour survives only
    in the shape of the feature distributions. The function changes, so fine-tune after regrouping.

    Args:
        vae: any AutoencoderKL.
        groups: the new ``norm_num_groups``.

    Raises:
        UserError: ``groups`` does not divide every entry of ``block_out_channels``.
    """
    widths = list(vae.config.block_out_channels)
    if groups <= 0 or any(w % groups for w in widths):
        raise UserError(f"norm_num_groups={groups} must be positive and divide every block width {widths}")
    weights = {k: v.clone() for k, v in vae.state_dict().items()}  # clones: training `out` leaves `vae` as it is
    return _with_weights({**config_dict(vae), "norm_num_groups": groups}, weights).train(vae.training)


def config_dict(vae: AutoencoderKL) -> dict[str, Any]:
    """The model's config as plain JSON-able data, without diffusers' private ``_`` keys."""
    cfg = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    return json.loads(json.dumps(cfg, default=list))


def config_hash(vae: AutoencoderKL) -> str:
    """A short stable hash of the architecture + scaling config (identifies compatible latents)."""
    blob = json.dumps(config_dict(vae), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def downsample_factor(vae: AutoencoderKL) -> int:
    """Spatial downsampling factor between pixels and latents (8 for SD-style VAEs)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def describe(vae: AutoencoderKL) -> dict[str, Any]:
    """Facts for ``sdvae info``: architecture, parameter counts, latent shape and scaling."""
    cfg = vae.config

    def count(module: torch.nn.Module | None) -> int:
        return sum(p.numel() for p in module.parameters()) if module is not None else 0

    return {
        "block_out_channels": list(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block,
        "norm_num_groups": cfg.norm_num_groups,
        "mid_block_attention": bool(cfg.get("mid_block_add_attention", True)),
        "latent_channels": cfg.latent_channels,
        "downsampling_factor": downsample_factor(vae),
        "quant_convs": [bool(cfg.get("use_quant_conv", True)), bool(cfg.get("use_post_quant_conv", True))],
        "scaling_factor": cfg.scaling_factor,
        "shift_factor": cfg.get("shift_factor"),
        "latents_mean": cfg.get("latents_mean"),
        "latents_std": cfg.get("latents_std"),
        "force_upcast": bool(cfg.get("force_upcast", True)),
        "parameters": {
            "total": count(vae),
            "encoder": count(vae.encoder) + count(vae.quant_conv),
            "decoder": count(vae.decoder) + count(vae.post_quant_conv),
        },
        "dtype": str(next(vae.parameters()).dtype).replace("torch.", ""),
        "config_hash": config_hash(vae),
    }


def save_diffusers(vae: AutoencoderKL, out: str | os.PathLike[str], dtype: str = "fp32",
                   overwrite: bool = False) -> Path:
    """Write a diffusers folder (config.json + diffusion_pytorch_model.safetensors) atomically.

    The folder is written under a temporary name beside ``out`` and renamed into place
    (:func:`sdvae.atomic.atomic_dir`), so ``out`` is never half-written.

    Args:
        vae: the model to save (not modified: a cast copy is written).
        out: destination folder.
        dtype: 'fp32' | 'fp16' | 'bf16' for the stored weights.
        overwrite: replace an existing ``out``; otherwise an existing non-empty ``out`` is an error.
    """
    out_path = Path(out)
    if out_path.exists() and not (out_path.is_dir() and not any(out_path.iterdir())) and not overwrite:
        raise UserError(f"{out_path}: already exists (pass --force to replace it)")
    target = torch_dtype(dtype)
    from safetensors.torch import save_file

    from sdvae.atomic import atomic_dir

    with atomic_dir(out_path) as tmp:
        # Written by hand rather than with save_pretrained so the model is not cast in place; this is
        # exactly the layout from_pretrained reads.
        vae.save_config(tmp)
        weights = {k: v.detach().to("cpu", target).contiguous() for k, v in vae.state_dict().items()}
        save_file(weights, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
    return out_path

