"""Run configuration: YAML file → typed dataclasses → dotted command-line overrides.

``load_config("configs/x.yaml", ["--loss.kl_weight=1e-6"])`` returns a :class:`RunConfig`. Unknown
sections or keys, and values of the wrong type, are errors that name the key, so a typo never trains
silently with a default. The resolved config is written with the run (:func:`dump_config`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sdvae.errors import UserError


@dataclass
class ModelConfig:
    """Which VAE to train and which parts of it."""

    init: str = "tiny"  # any sdvae.model.load.load_vae reference: preset, folder, single file, hub id
    train_encoder: bool = True  # False: decoder-only fine-tuning (the sd-vae-ft-mse recipe)
    gradient_checkpointing: bool = False
    # > 0: regroup every GroupNorm of `init` to this many groups before training (sdvae.model.build.regroup_norms)
    norm_num_groups: int = 0


@dataclass
class DataConfig:
    """Where images come from and how they are cropped."""

    train: str = ""  # image folder (recursive), datasets name, local datasets folder or parquet file/glob
    val: str = ""  # same kinds; empty: hold out `val_count` images of `train`
    image_column: str = "image"
    split: str = "train"
    resolution: int = 256  # square crop side in pixels (a multiple of the downsampling factor)
    resize: int = 0  # resize the shorter side to this before cropping; 0: no resize
    crop: Literal["random", "center"] = "random"
    flip: bool = True
    mosaic: int = 1  # m > 1: train on m×m grids of (resolution/m)² crops of different images (see TrainDataset)
    # Non-empty: each training item draws its grid side from this list (repeats weight it), e.g.
    # [1, 2, 4, 4]; small images are upscaled to the tile side. Validation keeps `mosaic`.
    mosaic_grids: tuple[int, ...] = ()
    # Probability that a training item gets one random colour cast over all its pixels (saturation ×
    # [0.5, 2], per-channel offset ±0.4, see TrainDataset): teaches images dominated by one colour.
    color_cast: float = 0.0
    val_count: int = 8  # held-out images (a validation item is a mosaic of m² of them)
    num_workers: int = 2


@dataclass
class LossConfig:
    """Weights of each ELBO / perceptual / adversarial term (see sdvae.train.losses)."""

    recon: Literal["l1", "mse"] = "l1"
    recon_weight: float = 1.0
    lpips_weight: float = 0.0
    lpips_net: Literal["vgg", "alex", "squeeze"] = "vgg"
    lpips_weights: str = ""  # local path to LPIPS backbone+linear weights; empty: torch hub cache
    kl_weight: float = 1e-6
    learned_logvar: bool = False  # LDM's learned scalar log-variance NLL
    disc_weight: float = 0.0
    disc_start: int = 50001
    disc_loss: Literal["hinge", "vanilla"] = "hinge"
    disc_adaptive_weight: bool = True
    disc_layers: int = 3


@dataclass
class OptimConfig:
    """Optimizer and schedule (AdamW for the VAE and the discriminator)."""

    lr: float = 4.5e-6
    disc_lr: float = 0.0  # 0: same as lr
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # 0: no clipping


@dataclass
class TrainConfig:
    """Length, batch, precision, checkpoints."""

    out: str = "runs/default"
    steps: int = 1000
    batch_size: int = 12  # per process
    grad_accum: int = 1
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 0
    ema_decay: float = 0.999  # 0: no EMA
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    val_every: int = 500


@dataclass
class LogConfig:
    """Progress and TensorBoard."""

    every: int = 10
    tensorboard: bool = True


@dataclass
class RunConfig:
    """A whole training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check/convert one YAML value against a dataclass field type."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise UserError(f"{where}: {value!r} is not one of {', '.join(map(str, typing.get_args(hint)))}")
        return value
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: any length
            if not isinstance(value, (list, tuple)):
                raise UserError(f"{where}: expected a list, got {value!r}")
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise UserError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin in (typing.Union, types.UnionType):
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "1e-6" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise UserError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        what = f"{where}: unknown key(s)" if where else "unknown section(s)"
        raise UserError(f"{what} {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn ``["--loss.kl_weight=1e-6", "--train.steps", "10"]`` into a nested dict (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: overrides look like --section.key=value")
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise UserError(f"{arg}: missing value")
            raw, i = args[i + 1], i + 1
        if "." not in key:
            raise UserError(f"{arg}: overrides look like --section.key=value")
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
        i += 1
    return nested


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply dotted overrides, and validate everything.

    Args:
        path: YAML file (None: all defaults).
        overrides: command-line style ``--section.key=value`` strings.

    Raises:
        UserError: missing/invalid file, unknown key, or a value of the wrong type (naming the key).
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{p}: config file not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(f"{p}: invalid YAML ({str(err).splitlines()[0]})") from None
    data = _merge(data, parse_overrides(overrides or []))
    return _build(RunConfig, data, "")


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), as written to ``config.yaml`` in the run folder."""
    return yaml.safe_load(yaml.safe_dump(_plain(dataclasses.asdict(cfg))))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML text; ``load_config`` of it gives back an equal config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
