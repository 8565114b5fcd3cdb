"""Loading a VAE (AutoencoderKL or FLUX.2's AutoencoderKLFlux2) from every supported reference: preset,
folder, single file, Hub id."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from sdvae.errors import UserError, first_line
from sdvae.model.build import build_preset, deepen, regroup_norms, with_weights
from sdvae.model.family import is_flux2, vae_class
from sdvae.model.file_checks import check_safetensors
from sdvae.model.ldm_keys import name_keys
from sdvae.model.presets import PRESETS
from sdvae.model.save import WEIGHTS_NAME

if TYPE_CHECKING:  # torch/diffusers load lazily so importing this module stays cheap
    from sdvae.model.family import VAE

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def _is_diffusers_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def _folder_class(folder: Path) -> type:
    """The diffusers class a folder's config.json names (AutoencoderKL when it names none we know)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        config = {}  # diffusers' own loading below reports the problem
    return vae_class(config if isinstance(config, dict) else {})


def _load_diffusers_folder(path: Path) -> VAE:
    """Load a diffusers folder exactly: every weight present, none left over, every shape as config.json says.

    diffusers itself random-initialises missing weights and ignores unexpected ones with only a log
    warning; here either is an error, so a partial model is never used.
    """
    from diffusers.utils import logging as dlogging

    folder = path if _is_diffusers_folder(path) else path / "vae"
    cls = _folder_class(folder)
    weights = folder / WEIGHTS_NAME
    if weights.is_file():
        _check_folder_weights(folder, weights)
    verbosity = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # its missing/unexpected-key warnings become our one-line error below
    try:
        vae, info = cls.from_pretrained(folder, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, json.JSONDecodeError) as err:
        raise UserError(f"{folder}: not a loadable diffusers {cls.__name__} folder ({first_line(err)})") from None
    finally:
        dlogging.set_verbosity(verbosity)
    return _exact(vae, info, folder).float().eval()


def _exact(vae: VAE, info: dict, where: object) -> VAE:
    """``vae`` if diffusers' loading info reports no missing, unexpected or mis-shaped weight, else a UserError."""
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = [k if isinstance(k, str) else k[0] for k in info.get(kind) or []]
        if keys:
            raise UserError(f"{where}: weights do not match config.json: {kind.replace('_', ' ')} "
                            f"{name_keys(sorted(keys))}")
    return vae


def _check_folder_weights(folder: Path, weights: Path) -> None:
    """The weights file's structure, and its tensor shapes against the model config.json describes."""
    import torch

    header = check_safetensors(weights)
    cls = _folder_class(folder)
    try:
        with torch.device("meta"):
            expected = cls.from_config(cls.load_config(folder)).state_dict()
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, json.JSONDecodeError) as err:
        raise UserError(f"{folder}: config.json does not describe an {cls.__name__} ({first_line(err)})") from None
    for name, entry in header.items():
        if name in expected and list(expected[name].shape) != entry["shape"]:
            raise UserError(f"{weights}: tensor {name!r} has shape {entry['shape']} but config.json needs "
                            f"{list(expected[name].shape)} (e.g. latent_channels/block_out_channels differ)")


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


def _hub_class(ref: str, subfolder: str | None, **kwargs: object) -> type:
    """The class a Hub repository's (sub)folder config names: AutoencoderKLFlux2 or AutoencoderKL."""
    from diffusers import AutoencoderKL

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return vae_class(AutoencoderKL.load_config(ref, subfolder=subfolder, **kwargs))
    except Exception:  # no config there: AutoencoderKL's own loading gives the error
        return AutoencoderKL


def _load_hub(ref: str) -> VAE:
    name = ref.split("/")[-1]
    # The local Hugging Face cache first: it works offline and costs no request.
    for subfolder in (None, "vae"):
        try:
            with warnings.catch_warnings():  # huggingface_hub deprecation chatter is not for our users
                warnings.simplefilter("ignore")
                cls = _hub_class(ref, subfolder, local_files_only=True)
                vae, info = cls.from_pretrained(ref, subfolder=subfolder, local_files_only=True,
                                                output_loading_info=True)
        except Exception:  # not cached (or cached without this subfolder): try the next way
            continue
        return _exact(vae, info, ref).eval()
    if not _hub_reachable():
        raise UserError(
            f"cannot load '{ref}': not in the local Hugging Face cache and the Hub is unreachable; "
            f"download it where there is network and pass the folder, e.g. --model /path/to/{name}"
        )
    errors = []
    for subfolder in (None, "vae"):
        try:
            cls = _hub_class(ref, subfolder)
            vae, info = cls.from_pretrained(ref, subfolder=subfolder, output_loading_info=True)
        except Exception as err:  # hub errors come in many types; all mean "not loadable"
            errors.append(first_line(err))
            continue
        return _exact(vae, info, ref).eval()
    raise UserError(f"cannot load '{ref}' from the Hugging Face Hub ({errors[-1]}); "
                    f"pass a local folder instead, e.g. --model /path/to/{name}")


def load_vae(ref: str | os.PathLike[str], *, preset_scaling: str | None = None,
             norm_num_groups: int = 0, layers_per_block: int = 0, image_channels: int = 0) -> VAE:
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
            carry none, 4-channel files get ``sd``'s and 16-channel files ``sd3``'s. FLUX.2 files (recognised
            by their BatchNorm ``bn.*``) carry their normalisation in the weights and take no preset's.
        norm_num_groups: if positive, regroup every GroupNorm after loading (:func:`regroup_norms`);
            0 keeps the reference's own.
        layers_per_block: if positive, then add identity-initialised ResNet layers up to this many per
            block (:func:`deepen`); 0 keeps the reference's own.
        image_channels: if positive, a preset is built with this many image channels (``in_channels`` =
            ``out_channels``, :func:`build_preset`); any other reference must already have them. 0 keeps
            the reference's own.

    Raises:
        UserError: the reference cannot be resolved or loaded, or (with ``image_channels``) is a trained
            model with another channel count; the message names it.
    """
    if image_channels and os.fspath(ref) in PRESETS:
        vae = build_preset(os.fspath(ref), image_channels=image_channels)
    else:
        vae = _load(ref, preset_scaling)
        has = (vae.config.in_channels, vae.config.out_channels)
        if image_channels and has != (image_channels, image_channels):
            count = has[0] if has[0] == has[1] else f"{has[0]} (in) / {has[1]} (out)"
            raise UserError(f"{os.fspath(ref)}: the model has {count} image channels, not {image_channels}; "
                            "a trained model's image channels cannot be changed")
    vae = regroup_norms(vae, norm_num_groups) if norm_num_groups else vae
    return deepen(vae, layers_per_block) if layers_per_block else vae


def _load(ref: str | os.PathLike[str], preset_scaling: str | None) -> VAE:
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


def _load_single_file(path: Path, preset_scaling: str | None) -> VAE:
    from sdvae.model.single_file import read_single_file

    config, state_dict = read_single_file(path)
    latent = config["latent_channels"]
    if is_flux2(config) or preset_scaling == "flux2":
        if not is_flux2(config):
            raise UserError(f"{path}: preset_scaling='flux2' needs a FLUX.2 VAE (32-channel latents with BatchNorm "
                            f"statistics bn.*); this file has {latent} latent channels and no BatchNorm")
        if preset_scaling not in (None, "flux2"):
            raise UserError(f"{path}: is a FLUX.2 VAE; its normalisation is its BatchNorm statistics, not "
                            f"the '{preset_scaling}' preset's scaling")
        return with_weights(config, state_dict).float().eval()
    # Files we wrote record their scaling (sdvae metadata); other files get the family default.
    scaling_from = preset_scaling or (
        None if "scaling_factor" in config else "sd" if latent == 4 else "sd3" if latent == 16 else None)
    if scaling_from is not None:
        if scaling_from not in PRESETS:
            raise UserError(f"unknown preset '{scaling_from}' for scaling: choose one of {', '.join(PRESETS)}")
        for key in ("scaling_factor", "shift_factor", "force_upcast", "sample_size"):
            if key in PRESETS[scaling_from].config:
                config[key] = PRESETS[scaling_from].config[key]
    return with_weights(config, state_dict).float().eval()
