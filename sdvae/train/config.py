"""Run configuration: YAML file → typed dataclasses → dotted command-line overrides.

``load_config("configs/x.yaml", ["--loss.kl_weight=1e-6"])`` returns a :class:`RunConfig`. Unknown
sections or keys, and values of the wrong type, are errors that name the key, so a typo never trains
silently with a default. The resolved config is written with the run (:func:`dump_config`).
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import keyword
import re
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sdvae.errors import UserError


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 booleans: only true/false are booleans, so ``no``/``yes``/``on``/``off``
    stay strings (``mixed_precision: no`` is the string "no"); bool keys accept them (see ``_coerce``)."""


_Loader.yaml_implicit_resolvers = {k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
                                   for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def _field_name(key: str) -> str:
    """YAML key -> dataclass attribute (``with`` is a Python keyword: stored as ``with_``)."""
    return f"{key}_" if keyword.iskeyword(key) else key


def _yaml_key(name: str) -> str:
    return name[:-1] if name.endswith("_") and keyword.iskeyword(name[:-1]) else name


@dataclass
class ModelConfig:
    """Which VAE to train and which parts of it."""

    init: str = "tiny"  # any sdvae.model.load.load_vae reference: preset, folder, single file, hub id
    train_encoder: bool = True  # False: decoder-only fine-tuning (the sd-vae-ft-mse recipe)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more time
    # > 0: regroup every GroupNorm of `init` to this many groups before training (sdvae.model.build.regroup_norms)
    norm_num_groups: int = 0
    # > 0: add ResNet layers to every block of `init` up to this many, each starting as the identity
    # (sdvae.model.build.deepen): more capacity for a trained model without starting from scratch
    layers_per_block: int = 0
    # image channels (sdvae.images.channels): 1 grayscale, 3 RGB, 4 RGBA (alpha kept). A preset `init` is
    # built with this many; a folder or file must already have them. 0: the init's own (presets: 3)
    image_channels: int = 0

    def __post_init__(self) -> None:
        """Checked on construction too (configs built in code never reach the YAML loader)."""
        if self.image_channels not in (0, 1, 3, 4):
            raise UserError(f"model.image_channels: must be 0 (the init's own), 1 (grayscale), 3 (RGB) or 4 (RGBA), "
                            f"got {self.image_channels}")


@dataclass
class DataConfig:
    """Where images come from and how they are cropped."""

    train: str = ""  # image folder (recursive), datasets name, local datasets folder, parquet file/glob or tar shards
    val: str = ""  # same kinds; empty: hold out `val_count` images of `train`
    image_column: str = "image"  # column holding the images (datasets / parquet sources)
    split: str = "train"  # datasets split to read
    resolution: int = 256  # square crop side in pixels (a multiple of the downsampling factor)
    resize: int = 0  # resize the shorter side to this before cropping; 0: no resize
    crop: Literal["random", "center"] = "random"  # training crop position
    flip: bool = True  # random horizontal flips
    mosaic: int = 1  # m > 1: train on m×m grids of (resolution/m)² crops of different images (see TrainDataset)
    # Non-empty: each training item draws its grid side from this list (repeats weight it), e.g.
    # [1, 2, 4, 4]; small images are upscaled to the tile side. Validation keeps `mosaic`.
    mosaic_grids: tuple[int, ...] = ()
    # Probability that a training item gets one random colour cast over all its pixels (saturation ×
    # [0.5, 2], per-channel offset ±0.4, see TrainDataset): teaches images dominated by one colour.
    color_cast: float = 0.0
    val_count: int = 8  # held-out images (a validation item is a mosaic of m² of them)
    num_workers: int = 2  # DataLoader worker processes per training process (0: load in the main process)


# The transforms tau of the EQ-VAE regulariser: the names of sdvae.images.transforms.TRANSFORMS (a test
# keeps the two equal; repeated here so that reading a config does not import torch).
EquivarianceTransform = Literal["scale_0.5", "scale_0.75", "rotate_90", "flip_horizontal"]


@dataclass
class LossConfig:
    """Weights of each ELBO / perceptual / adversarial term (see sdvae.train.losses)."""

    recon: Literal["l1", "mse"] = "l1"  # per-pixel reconstruction term
    recon_weight: float = 1.0  # weight of the reconstruction term
    lpips_weight: float = 0.0  # weight of the LPIPS perceptual term (LDM: 1.0); 0: LPIPS off
    lpips_net: Literal["vgg", "alex", "squeeze"] = "vgg"  # LPIPS backbone (LDM: vgg)
    lpips_weights: str = ""  # local path to LPIPS backbone+linear weights; empty: torch hub cache
    kl_weight: float = 1e-6  # KL weight in LDM's units (LDM kl-f8: 1e-6)
    learned_logvar: bool = False  # LDM's learned scalar log-variance NLL
    disc_weight: float = 0.0  # PatchGAN weight (LDM: 0.5); 0: no discriminator
    disc_start: int = 50001  # optimizer step from which the adversarial terms count (LDM: 50001)
    disc_loss: Literal["hinge", "vanilla"] = "hinge"  # discriminator loss
    disc_adaptive_weight: bool = True  # LDM's gradient-norm-balanced GAN weight
    disc_layers: int = 3  # PatchGAN stride-2 layers (3: 70x70 patches)
    # PatchGAN normalisation: batch (LDM; synchronised over processes under DDP, so any process count
    # gives the 1-process result), group or none (batch-statistics-free)
    disc_norm: Literal["batch", "group", "none"] = "batch"
    # EQ-VAE (Kouzelis et al. 2025) weight w: adds w x the reconstruction term (recon_weight x L1/MSE +
    # lpips_weight x LPIPS) of decode(tau(z)) against tau(x), z the sampled latent, one tau per micro-batch
    # drawn from equivariance_transforms by (train.seed, micro-batch count); 0: off
    equivariance: float = 0.0
    # the tau drawn from (uniformly; repeats weight one): box resampling to 1/2 or 3/4 of each side (latent
    # sides must be multiples of 2 or 4), counter-clockwise 90-degree rotation, left-right mirror
    equivariance_transforms: tuple[EquivarianceTransform, ...] = (
        "scale_0.5", "scale_0.75", "rotate_90", "flip_horizontal")
    # scale equivariance (Skorokhodov et al. 2025, "Improving the Diffusability of Autoencoders") weight w:
    # adds w x the reconstruction term of decode(down(z)) against down(x), down = 2x2 box average; 0: off
    scale_equivariance: float = 0.0
    # VA-VAE (Yao et al. 2025) weight w: adds w x VF(P(z), f), P a trained 1x1 projection of the sampled latent z,
    # f a frozen backbone's patch features of the image on the latent grid (sdvae.train.alignment); 0: off
    alignment: float = 0.0
    alignment_backbone: str = ""  # alignment_model's local .safetensors or its folder (never downloaded; extra align)
    alignment_model: str = "vit_large_patch14_dinov2"  # timm ViT name of the backbone (VA-VAE: DINOv2 ViT-L/14)
    alignment_cos_margin: float = 0.5  # m1: a position adds nothing once cos(P(z), f) >= 1 - m1 (VA-VAE: 0.5)
    alignment_distmat_margin: float = 0.25  # m2: a position pair adds nothing once its cosines differ by <= m2
    # VA-VAE's adaptive weight w x |grad nll| / |grad VF| at the encoder's last conv (2 more backward passes); false: w
    alignment_adaptive: bool = False

    def __post_init__(self) -> None:
        """Checked on construction too (configs built in code never reach the YAML loader)."""
        _check_choices(self, "loss")
        if self.disc_weight > 0 and self.disc_layers < 1:
            raise UserError(f"loss.disc_layers: must be >= 1, got {self.disc_layers}")
        for name in ("recon_weight", "lpips_weight", "kl_weight", "disc_weight", "equivariance",
                     "scale_equivariance", "alignment"):
            if getattr(self, name) < 0:
                raise UserError(f"loss.{name}: must be >= 0, got {getattr(self, name)}")
        choices = typing.get_args(EquivarianceTransform)
        for name in self.equivariance_transforms:
            if name not in choices:
                raise UserError(f"loss.equivariance_transforms: {name!r} is not one of {', '.join(choices)}")
        if self.equivariance > 0 and not self.equivariance_transforms:
            raise UserError("loss.equivariance_transforms: empty, but loss.equivariance > 0 needs at least one")
        if (self.equivariance > 0 or self.scale_equivariance > 0) and self.recon_weight == self.lpips_weight == 0:
            raise UserError("loss.equivariance / loss.scale_equivariance: the regularisers reuse the reconstruction "
                            "term, but loss.recon_weight and loss.lpips_weight are both 0")
        if bad := [n for n in ("alignment_cos_margin", "alignment_distmat_margin") if not 0 <= getattr(self, n) <= 2]:
            raise UserError(f"loss.{bad[0]}: must be in [0, 2] (cosines lie in [-1, 1]), got {getattr(self, bad[0])}")
        if self.alignment > 0 and not self.alignment_backbone:  # one line, naming the file to fetch
            raise UserError("loss.alignment_backbone: empty, but loss.alignment > 0 needs the backbone's local weights "
                            "(`hf download timm/vit_large_patch14_dinov2.lvd142m model.safetensors --local-dir DIR`)")


@dataclass
class OptimConfig:
    """Optimizer and schedule (AdamW for the VAE and the discriminator)."""

    lr: float = 4.5e-6  # learning rate (with scale_lr: per image, LDM's base_learning_rate)
    disc_lr: float = 0.0  # 0: same as lr (scaled like lr with scale_lr)
    # LDM's scale_lr: effective lr = lr x batch_size x processes x grad_accum (printed at start)
    scale_lr: bool = False
    betas: tuple[float, float] = (0.5, 0.9)  # AdamW betas (LDM: 0.5, 0.9)
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 0  # linear warmup steps
    schedule: Literal["constant", "cosine"] = "constant"  # lr schedule after warmup
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # 0: no clipping


@dataclass
class TrainConfig:
    """Length, batch, precision, checkpoints."""

    out: str = "runs/default"  # run folder (config.yaml, checkpoints/, samples/, final/, logs)
    steps: int = 1000  # optimizer steps
    batch_size: int = 12  # per process
    # micro-batches per optimizer step; null: accelerate's (launch --gradient_accumulation_steps / env), else 1
    grad_accum: int | None = None
    # no | bf16 | fp16; null: accelerate decides (launch --mixed_precision, accelerate config, env)
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None
    num_processes: int | None = None  # null: as launched; set: refuse to run under another process count
    seed: int = 0  # initial weights, data order, augmentation and posterior noise
    ema_decay: float = 0.999  # 0: no EMA
    checkpoint_every: int = 500  # optimizer steps between checkpoints
    keep_checkpoints: int = 2  # newest checkpoints kept; 0: keep all
    val_every: int = 500  # optimizer steps between validations (metrics + samples/step-N.png)
    # auto: continue the newest checkpoint of `out` (refused if a trajectory-changing key differs);
    # never: fresh run in `out` (old checkpoints moved aside); a path: resume from that checkpoint/run folder
    resume: str = "auto"
    allow_tf32: bool = False  # CUDA: TF32 matmuls/convolutions in fp32 (faster on Ampere+, ~1e-3 relative)
    compile: bool = False  # torch.compile the forward module (after DDP wrapping)
    channels_last: bool = False  # channels-last memory format for weights and images (faster convs on GPU)
    # stop (one error line, exit 2) after this many consecutive optimizer steps skipped for a non-finite
    # loss or gradient; the last checkpoint (written before the streak's end) is kept. 0: never stop
    max_bad_steps: int = 20

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "val_every"):
            if getattr(self, name) < 1:  # the step loop takes each as a modulus or a count
                raise UserError(f"train.{name}: must be >= 1, got {getattr(self, name)}")


@dataclass
class LogConfig:
    """Progress and trackers."""

    every: int = 10  # optimizer steps between logged training scalars
    # accelerate tracker(s): tensorboard | wandb | all | none (samples/step-N.png are written whatever this is)
    with_: Literal["tensorboard", "wandb", "all", "none"] = "tensorboard"
    project: str = "sdvae"  # tracker project name (wandb)

    def __post_init__(self) -> None:
        if self.every < 1:
            raise UserError(f"log.every: must be >= 1, got {self.every}")


@dataclass
class RunConfig:
    """A whole training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:  # checks across sections
        if self.loss.alignment > 0 and not self.model.train_encoder:
            raise UserError("loss.alignment: aligns the encoder's latents, but model.train_encoder is false")


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
    if origin in (typing.Union, types.UnionType):  # X | None: null, or an X
        if value is None and type(None) in typing.get_args(hint):
            return None
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return _coerce(value, inner[0], where) if len(inner) == 1 else value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "1e-6" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, str, bool) and type(value) is hint:
        return value
    if hint is bool and isinstance(value, str) and value.lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.lower()]
    raise UserError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def _check_choices(obj: Any, section: str) -> None:
    """Every ``Literal`` field of a config dataclass holds one of its choices."""
    for name, hint in typing.get_type_hints(type(obj)).items():
        if typing.get_origin(hint) is Literal and getattr(obj, name) not in typing.get_args(hint):
            raise UserError(f"{section}.{name}: {getattr(obj, name)!r} is not one of "
                            f"{', '.join(map(str, typing.get_args(hint)))}")


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {_yaml_key(f.name) for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        what = f"{where}: unknown key(s)" if where else "unknown section(s)"
        raise UserError(f"{what} {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    kwargs = {_field_name(k): _coerce(v, hints[_field_name(k)], f"{where}.{k}" if where else k)
              for k, v in data.items()}
    return cls(**kwargs)


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn ``["--loss.kl_weight=1e-6", "--train.steps", "10"]`` into a nested dict.

    Values are parsed as YAML 1.2 (``no``/``off`` stay strings; bool keys accept them, see ``_Loader``).
    """
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
        node[leaf] = _load_yaml(raw)
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
            data = _load_yaml(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(f"{p}: invalid YAML ({str(err).splitlines()[0]})") from None
    data = _merge(data, parse_overrides(overrides or []))
    return _build(RunConfig, data, "")


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), as written to ``config.yaml`` in the run folder."""
    return yaml.safe_load(yaml.safe_dump(_plain(dataclasses.asdict(cfg))))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {_yaml_key(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML text; ``load_config`` of it gives back an equal config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


# --------------------------------------------------------------------------------------------------
# --help: every key with its type, default and comment, read from the dataclasses above
# --------------------------------------------------------------------------------------------------


def _comments(cls: type) -> dict[str, str]:
    """Field name -> its comment in the source: the trailing ``# ...`` or the ``#`` lines just above."""
    source = inspect.getsource(cls)
    found: dict[str, str] = {}
    above: list[str] = []
    lines = source.splitlines()
    trailing = {tok.start[0]: tok.string.lstrip("# ").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# ").strip())
            continue
        match = re.match(r"^\s+(\w+)\s*:", line)
        if match and not stripped.startswith(('"""', "def ")):
            found[match.group(1)] = trailing.get(number) or " ".join(above)
        above = []
    return found


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "|".join(map(str, typing.get_args(hint)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(hint))
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return "[" + ", ".join(_type_name(a) for a in args) + "]"
    return getattr(hint, "__name__", str(hint))


def config_keys() -> list[tuple[str, str, Any, str]]:
    """``(section.key, type, default, comment)`` for every key of :class:`RunConfig`."""
    rows = []
    defaults = config_to_dict(RunConfig())
    for section in dataclasses.fields(RunConfig):
        cls = typing.get_type_hints(RunConfig)[section.name]
        hints, comments = typing.get_type_hints(cls), _comments(cls)
        for f in dataclasses.fields(cls):
            key = _yaml_key(f.name)
            rows.append((f"{section.name}.{key}", _type_name(hints[f.name]), defaults[section.name][key],
                         comments.get(f.name, "")))
    return rows


def config_help() -> str:
    """The text of ``tools/train.py --help``: usage, then one line per key."""
    lines = ["usage: tools/train.py CONFIG.yaml [--section.key=value ...] [--print-config] [--help]",
             "",
             "Keys (YAML sections; override any with --section.key=value, values parsed as YAML;",
             "no/yes/on/off are strings for string keys and booleans for bool keys; null unsets):", ""]
    width = max(len(k) for k, *_ in config_keys())
    section = ""
    for key, type_name, default, comment in config_keys():
        if key.split(".")[0] != section:
            section = key.split(".")[0]
            lines.append(f"{section}:")
        shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        lines.append(f"  --{key:<{width}}  {type_name} (default {shown}): {comment}")
    return "\n".join(lines) + "\n"
