"""The AutoencoderKL state-dict key map, losslessly: diffusers ⇄ original LDM (CompVis) naming.

The key map is our own (diffusers' ``single_file_utils`` converters silently skip keys they do not
know, which hides a wrong architecture guess). Here the expected key set and every tensor shape are
generated from the config, and any missing, unused or mis-shaped tensor is a :class:`UserError`
naming the key. Converting diffusers → LDM → diffusers returns the very same tensors (views, no
copies, no dtype change). Reading and writing weight files is :mod:`sdvae.model.single_file`'s job.

Naming differences handled here:

* LDM ``encoder.down.{i}.block.{j}`` ↔ diffusers ``encoder.down_blocks.{i}.resnets.{j}``;
  ``nin_shortcut`` ↔ ``conv_shortcut``; ``downsample.conv`` ↔ ``downsamplers.0.conv``.
* LDM numbers decoder levels by resolution (``decoder.up.0`` is full resolution, run last),
  diffusers in execution order: ``decoder.up_blocks.{k}`` is LDM ``decoder.up.{n - 1 - k}``.
* ``mid.block_1/2`` ↔ ``mid_block.resnets.0/1``; ``mid.attn_1.norm/q/k/v/proj_out`` ↔
  ``mid_block.attentions.0.group_norm/to_q/to_k/to_v/to_out.0``. LDM stores the attention
  projections as 1×1 convolutions (C, C, 1, 1), diffusers as linear layers (C, C).
* ``norm_out`` ↔ ``conv_norm_out``.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

from sdvae.errors import UserError

if TYPE_CHECKING:  # torch loads lazily so importing this module stays cheap
    from torch import Tensor

_ATTN_LDM_TO_DIFFUSERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_PROJ = ("q", "k", "v", "proj_out")
# Older diffusers (< 0.14) attention parameter names, accepted on input only.
_OLD_ATTN_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_MAX_NAMED = 5  # keys named in one error message (the message stays one readable line)


# --------------------------------------------------------------------------------------------
# The key table: every (LDM key, diffusers key, LDM shape) of one config
# --------------------------------------------------------------------------------------------


def _key_table(config: dict[str, Any]) -> list[tuple[str, str, tuple[int, ...]]]:
    """All parameters of an AutoencoderKL config as (LDM key, diffusers key, LDM shape), in diffusers order.

    The diffusers shape equals the LDM shape except for attention projection weights, which are
    (C, C) in diffusers and (C, C, 1, 1) in LDM.
    """
    table: list[tuple[str, str, tuple[int, ...]]] = []
    chans = list(config["block_out_channels"])
    layers = int(config["layers_per_block"])
    latent = int(config["latent_channels"])
    attention = bool(config.get("mid_block_add_attention", True))

    def conv(ldm: str, diff: str, cout: int, cin: int, k: int) -> None:
        table.append((f"{ldm}.weight", f"{diff}.weight", (cout, cin, k, k)))
        table.append((f"{ldm}.bias", f"{diff}.bias", (cout,)))

    def norm(ldm: str, diff: str, c: int) -> None:
        table.append((f"{ldm}.weight", f"{diff}.weight", (c,)))
        table.append((f"{ldm}.bias", f"{diff}.bias", (c,)))

    def resnet(ldm: str, diff: str, cin: int, cout: int) -> None:
        norm(f"{ldm}.norm1", f"{diff}.norm1", cin)
        conv(f"{ldm}.conv1", f"{diff}.conv1", cout, cin, 3)
        norm(f"{ldm}.norm2", f"{diff}.norm2", cout)
        conv(f"{ldm}.conv2", f"{diff}.conv2", cout, cout, 3)
        if cin != cout:  # diffusers and LDM both add the 1×1 shortcut only when channels change
            conv(f"{ldm}.nin_shortcut", f"{diff}.conv_shortcut", cout, cin, 1)

    def mid(side: str, c: int) -> None:
        # diffusers registers the attention module list before the resnets; keep its order.
        if attention:
            for ldm_name, diff_name in _ATTN_LDM_TO_DIFFUSERS.items():
                ldm, diff = f"{side}.mid.attn_1.{ldm_name}", f"{side}.mid_block.attentions.0.{diff_name}"
                if ldm_name == "norm":
                    norm(ldm, diff, c)
                else:
                    conv(ldm, diff, c, c, 1)
        resnet(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", c, c)
        resnet(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", c, c)

    levels = len(chans)
    conv("encoder.conv_in", "encoder.conv_in", chans[0], int(config.get("in_channels", 3)), 3)
    cout = chans[0]
    for i, c in enumerate(chans):
        cin, cout = cout, c
        for j in range(layers):
            resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", cin if j == 0 else cout, cout)
        if i < levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv", cout, cout, 3)
    mid("encoder", chans[-1])
    norm("encoder.norm_out", "encoder.conv_norm_out", chans[-1])
    conv("encoder.conv_out", "encoder.conv_out", 2 * latent, chans[-1], 3)  # mean and log-variance

    conv("decoder.conv_in", "decoder.conv_in", chans[-1], latent, 3)
    cout = chans[-1]
    for k, c in enumerate(reversed(chans)):
        cin, cout = cout, c
        i = levels - 1 - k  # LDM numbers decoder levels from the full-resolution end
        for j in range(layers + 1):
            resnet(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{k}.resnets.{j}", cin if j == 0 else cout, cout)
        if k < levels - 1:
            conv(f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{k}.upsamplers.0.conv", cout, cout, 3)
    mid("decoder", chans[-1])  # diffusers' Decoder registers up_blocks before mid_block
    norm("decoder.norm_out", "decoder.conv_norm_out", chans[0])
    conv("decoder.conv_out", "decoder.conv_out", int(config.get("out_channels", 3)), chans[0], 3)

    if config.get("use_quant_conv", True):
        conv("quant_conv", "quant_conv", 2 * latent, 2 * latent, 1)
    if config.get("use_post_quant_conv", True):
        conv("post_quant_conv", "post_quant_conv", latent, latent, 1)
    return table


def _is_attn_proj_weight(ldm_key: str) -> bool:
    parts = ldm_key.split(".")
    return len(parts) == 5 and parts[1:3] == ["mid", "attn_1"] and parts[3] in _ATTN_PROJ and parts[4] == "weight"


def name_keys(keys: list[str]) -> str:
    """Keys for a one-line error message: sorted, the first few, then how many more."""
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_NAMED])
    return shown + (f" (+{len(keys) - _MAX_NAMED} more)" if len(keys) > _MAX_NAMED else "")


def _check_against_table(ldm: dict[str, Tensor], table: list[tuple[str, str, tuple[int, ...]]],
                         shown: dict[str, str] | None = None) -> None:
    """Raise UserError unless ``ldm`` has exactly the table's keys with the table's shapes.

    Args:
        ldm: LDM-keyed tensors (attention projections already 4-D).
        table: from :func:`_key_table`.
        shown: for input in diffusers naming: LDM key -> the caller's diffusers key, so that errors
            name the keys the caller actually has (missing keys are then named in diffusers naming).
    """
    expected = {ldm_key: shape for ldm_key, _, shape in table}
    diffusers_side = shown is not None
    shown = shown or {}
    missing = [diff if diffusers_side else ldm_key for ldm_key, diff, _ in table if ldm_key not in ldm]
    unused = [shown.get(k, k) for k in ldm if k not in expected]
    if unused:
        raise UserError(f"{len(unused)} unused key(s) that this AutoencoderKL layout has no place for: "
                        f"{name_keys(unused)}")
    if missing:
        raise UserError(f"{len(missing)} missing key(s) for the inferred AutoencoderKL layout: {name_keys(missing)}")
    for key, tensor in ldm.items():
        if tuple(tensor.shape) != expected[key]:
            got = tuple(tensor.shape)
            if diffusers_side and _is_attn_proj_weight(key):
                got, want = got[:2], expected[key][:2]  # report diffusers' own (C, C) layout
            else:
                want = expected[key]
            raise UserError(f"shape mismatch for {shown.get(key, key)}: got {list(got)}, expected {list(want)}")


# --------------------------------------------------------------------------------------------
# Public key map
# --------------------------------------------------------------------------------------------


def infer_config_from_ldm(state_dict: dict[str, Tensor]) -> dict[str, Any]:
    """AutoencoderKL keyword arguments read off the shapes of an LDM-keyed VAE state dict.

    Only the architecture is inferred; scaling/shift factors are not in the weights and are left to
    the caller. The GroupNorm group count is not in the weights either: it is 32 (every released SD
    family VAE) unless some channel count is not divisible by 32, then the largest count ≤ 32 that
    divides every channel count.

    Args:
        state_dict: LDM-keyed tensors (no prefix).

    Raises:
        UserError: a tensor needed to read the architecture is missing or oddly shaped.
    """

    def shape(key: str, ndim: int) -> tuple[int, ...]:
        if key not in state_dict:
            raise UserError(f"not an AutoencoderKL state dict in LDM naming: missing {key}")
        got = tuple(state_dict[key].shape)
        if len(got) != ndim:
            raise UserError(f"shape mismatch for {key}: got {list(got)}, expected {ndim} dimensions")
        return got

    chans: list[int] = []
    while f"encoder.down.{len(chans)}.block.0.conv1.weight" in state_dict:
        chans.append(shape(f"encoder.down.{len(chans)}.block.0.conv1.weight", 4)[0])
    if not chans:
        shape("encoder.down.0.block.0.conv1.weight", 4)  # raises, naming the key
    layers = 0
    while f"encoder.down.0.block.{layers}.conv1.weight" in state_dict:
        layers += 1
    in_channels = shape("encoder.conv_in.weight", 4)[1]
    latent = shape("decoder.conv_in.weight", 4)[1]
    out_channels = shape("decoder.conv_out.weight", 4)[0]
    # The GroupNorm group count must divide every normalised channel count.
    common = math.gcd(*chans)
    groups = 32 if common % 32 == 0 else max(g for g in range(1, 33) if common % g == 0)
    levels = len(chans)
    return {
        "in_channels": in_channels,
        "out_channels": out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": chans,
        "layers_per_block": layers,
        "act_fn": "silu",
        "latent_channels": latent,
        "norm_num_groups": groups,
        "use_quant_conv": "quant_conv.weight" in state_dict,
        "use_post_quant_conv": "post_quant_conv.weight" in state_dict,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in state_dict,
    }


def ldm_to_diffusers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename an LDM-keyed VAE state dict to diffusers' AutoencoderKL keys.

    Attention projections stored as 1×1 convs (C, C, 1, 1) or 1-D convs (C, C, 1) become linear
    (C, C) weights. Tensors are returned as views of the inputs (no copy, same dtype).

    Args:
        state_dict: LDM-keyed tensors without a ``first_stage_model.`` prefix.

    Raises:
        UserError: a key is missing or unused, or a shape does not fit the inferred architecture;
            the message names the key.
    """
    ldm = {}
    for key, tensor in state_dict.items():
        # Some exporters keep the projections as (C, C) or (C, C, 1): same numbers, canonical 4-D here.
        if _is_attn_proj_weight(key) and tensor.ndim in (2, 3) and all(s == 1 for s in tensor.shape[2:]):
            tensor = tensor.reshape(*tensor.shape[:2], 1, 1)
        ldm[key] = tensor
    table = _key_table(infer_config_from_ldm(ldm))
    _check_against_table(ldm, table)
    out = {}
    for ldm_key, diff_key, shape in table:
        tensor = ldm[ldm_key]
        out[diff_key] = tensor.reshape(shape[:2]) if _is_attn_proj_weight(ldm_key) else tensor
    return out


_RESNET_PART = r"norm1|conv1|norm2|conv2|conv_shortcut"
_ATTN_PART = r"group_norm|to_q|to_k|to_v|to_out\.0|query|key|value|proj_attn"
_DIFFUSERS_PATTERNS = [
    re.compile(p) for p in (
        r"^(?P<side>encoder|decoder)\.(?P<name>conv_in|conv_out|conv_norm_out)\.(?P<param>weight|bias)$",
        rf"^encoder\.down_blocks\.(?P<i>\d+)\.resnets\.(?P<j>\d+)\.(?P<name>{_RESNET_PART})\.(?P<param>weight|bias)$",
        r"^encoder\.down_blocks\.(?P<i>\d+)\.downsamplers\.0\.conv\.(?P<param>weight|bias)$",
        rf"^decoder\.up_blocks\.(?P<k>\d+)\.resnets\.(?P<j>\d+)\.(?P<name>{_RESNET_PART})\.(?P<param>weight|bias)$",
        r"^decoder\.up_blocks\.(?P<k>\d+)\.upsamplers\.0\.conv\.(?P<param>weight|bias)$",
        rf"^(?P<side>encoder|decoder)\.mid_block\.resnets\.(?P<m>[01])\.(?P<name>{_RESNET_PART})\."
        r"(?P<param>weight|bias)$",
        rf"^(?P<side>encoder|decoder)\.mid_block\.attentions\.0\.(?P<attn>{_ATTN_PART})\.(?P<param>weight|bias)$",
        r"^(?P<name>quant_conv|post_quant_conv)\.(?P<param>weight|bias)$",
    )
]
_DIFFUSERS_ATTN_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                          **{old: {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}[new]
                             for old, new in _OLD_ATTN_NAMES.items()}}


def _diffusers_key_to_ldm(key: str, up_levels: int) -> str | None:
    """The LDM name of one diffusers key, or None when the key is not an AutoencoderKL parameter name."""
    for pattern in _DIFFUSERS_PATTERNS:
        m = pattern.match(key)
        if m is None:
            continue
        g = m.groupdict()
        param = g["param"]
        resnet = {"conv_shortcut": "nin_shortcut"}.get(g.get("name") or "", g.get("name"))
        if g.get("attn"):
            return f"{g['side']}.mid.attn_1.{_DIFFUSERS_ATTN_TO_LDM[g['attn']]}.{param}"
        if g.get("m") is not None:
            return f"{g['side']}.mid.block_{int(g['m']) + 1}.{resnet}.{param}"
        if g.get("i") is not None:
            level = f"encoder.down.{int(g['i'])}"
            return f"{level}.block.{g['j']}.{resnet}.{param}" if g.get("j") else f"{level}.downsample.conv.{param}"
        if g.get("k") is not None:
            k = int(g["k"])
            if k >= up_levels:
                return None
            level = f"decoder.up.{up_levels - 1 - k}"  # LDM counts decoder levels the other way round
            return f"{level}.block.{g['j']}.{resnet}.{param}" if g.get("j") else f"{level}.upsample.conv.{param}"
        if g.get("side"):
            return f"{g['side']}.{'norm_out' if g['name'] == 'conv_norm_out' else g['name']}.{param}"
        return f"{g['name']}.{param}"
    return None


def diffusers_to_ldm(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a diffusers AutoencoderKL state dict to the original LDM (CompVis) keys.

    Linear attention weights (C, C) become 1×1 conv weights (C, C, 1, 1). The older diffusers
    attention names (``query``/``key``/``value``/``proj_attn``) are accepted. Tensors are returned
    as views of the inputs (no copy, same dtype), so :func:`ldm_to_diffusers` of the result gives back
    the exact input tensors.

    Args:
        state_dict: diffusers-keyed tensors (``vae.state_dict()``).

    Raises:
        UserError: a key is not an AutoencoderKL parameter, is missing, is given twice (old and new
            attention name), or has the wrong shape; the message names the key.
    """
    # The number of decoder levels is needed before renaming, since LDM numbers them in reverse.
    up_idx = [int(m.group(1)) for k in state_dict if (m := re.match(r"^decoder\.up_blocks\.(\d+)\.", k))]
    up_levels = max(up_idx, default=-1) + 1
    ldm: dict[str, Tensor] = {}
    shown: dict[str, str] = {}
    unmapped = []
    for key, tensor in state_dict.items():
        new = _diffusers_key_to_ldm(key, up_levels)
        if new is None:
            unmapped.append(key)
            continue
        if new in ldm:
            raise UserError(f"{key} and {shown[new]} are the same parameter (old and new diffusers names); keep one")
        if _is_attn_proj_weight(new):
            if tensor.ndim != 2:
                raise UserError(f"shape mismatch for {key}: got {list(tensor.shape)}, expected a 2-D linear weight")
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        ldm[new], shown[new] = tensor, key
    if unmapped:
        raise UserError(f"{len(unmapped)} unmapped key(s), not part of a diffusers AutoencoderKL: "
                        f"{name_keys(unmapped)}")
    if "encoder.down.0.block.0.conv1.weight" not in ldm:
        raise UserError("not an AutoencoderKL state dict in diffusers naming: "
                        "missing encoder.down_blocks.0.resnets.0.conv1.weight")
    _check_against_table(ldm, _key_table(infer_config_from_ldm(ldm)), shown)
    return ldm
