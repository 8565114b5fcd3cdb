"""A corpus of hostile weight files, each damaged in one way, made from the `test` preset.

:func:`write_corpus` writes them all under a folder and returns name → path; :data:`PROBLEMS` says, per
name, a word that the one-line error must contain (what the problem is). Used by
``tests/model/test_hostile_weights.py`` and documented in ``docs/reliability.md``.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file

# name → a fragment of the expected message (lower case), naming the problem.
PROBLEMS = {
    "header_too_long.safetensors": "header length",
    "header_not_json.safetensors": "header is not json",
    "offsets_overlap.safetensors": "overlap",
    "offsets_past_end.safetensors": "past the end",
    "unknown_dtype.safetensors": "dtype",
    "size_mismatch.safetensors": "bytes",
    "truncated.safetensors": "past the end",
    "empty.safetensors": "empty",
    "not_a_vae.safetensors": "no vae weights",
    "folder_config_channels": "config.json needs",
    "folder_missing_keys": "missing keys",
    "folder_extra_keys": "unexpected keys",
    "folder_bad_config": "config.json",
    "unsafe_global.ckpt": "unsafe unpickling",
    "zip_of_something_else.ckpt": "not a readable pytorch checkpoint",
    "truncated.ckpt": "not a readable pytorch checkpoint",
}


def _header(path: Path) -> tuple[dict, bytes]:
    """The parsed JSON header and the data section of a valid safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _with_header(path: Path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _tensor_names(header: dict) -> list[str]:
    """Tensor entries by data offset (largest first: shapes that are plainly wrong when moved)."""
    names = [k for k in header if k != "__metadata__"]
    return sorted(names, key=lambda k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0], reverse=True)


def _diffusers_folder(root: Path, name: str, weights: dict[str, torch.Tensor], config: dict) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file(weights, folder / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    return folder


def write_corpus(root: str | Path) -> dict[str, Path]:
    """Write every hostile input under ``root`` (created); name → path (a file or a diffusers folder)."""
    from sdvae.model.build import build_preset
    from sdvae.model.info import config_dict

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    vae = build_preset("test")
    weights = {k: v.contiguous() for k, v in vae.state_dict().items()}
    valid = root / "valid.safetensors"
    save_file(weights, valid, metadata={"format": "pt"})
    header, data = _header(valid)
    raw = valid.read_bytes()
    out: dict[str, Path] = {}

    def path(name: str) -> Path:
        out[name] = root / name
        return out[name]

    # Header length larger than the whole file.
    path("header_too_long.safetensors").write_bytes(struct.pack("<Q", len(raw) * 4) + raw[8:])
    # A header of the right length that is not JSON.
    n = struct.unpack("<Q", raw[:8])[0]
    path("header_not_json.safetensors").write_bytes(raw[:8] + b"{not json" + b" " * (n - 9) + data)
    big = _tensor_names(header)
    # Two tensors sharing bytes: the second-largest starts inside the largest.
    edited = json.loads(json.dumps(header))
    a, b = edited[big[0]], edited[big[1]]
    size_b = b["data_offsets"][1] - b["data_offsets"][0]
    b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + size_b]
    _with_header(path("offsets_overlap.safetensors"), edited, data)
    # A tensor whose end offset runs past the data section.
    edited = json.loads(json.dumps(header))
    last = max(_tensor_names(edited), key=lambda k: edited[k]["data_offsets"][1])
    edited[last]["data_offsets"][1] += 4096
    _with_header(path("offsets_past_end.safetensors"), edited, data)
    # A dtype string safetensors does not know.
    edited = json.loads(json.dumps(header))
    edited[big[0]]["dtype"] = "F17"
    _with_header(path("unknown_dtype.safetensors"), edited, data)
    # Byte size disagreeing with shape × dtype (the shape says twice as many elements).
    edited = json.loads(json.dumps(header))
    edited[big[0]]["shape"] = [edited[big[0]]["shape"][0] * 2, *edited[big[0]]["shape"][1:]]
    _with_header(path("size_mismatch.safetensors"), edited, data)
    path("truncated.safetensors").write_bytes(raw[: len(raw) * 2 // 3])
    path("empty.safetensors").write_bytes(b"")
    # A valid safetensors file that holds no VAE.
    save_file({"text_model.weight": torch.zeros(3, 3)}, path("not_a_vae.safetensors"))

    config = config_dict(vae)
    # config.json asks for 8 latent channels; the weights have 4.
    out["folder_config_channels"] = _diffusers_folder(root, "folder_config_channels", weights,
                                                      {**config, "latent_channels": 8})
    missing = {k: v for k, v in weights.items() if not k.startswith("decoder.conv_out.")}
    out["folder_missing_keys"] = _diffusers_folder(root, "folder_missing_keys", missing, config)
    out["folder_extra_keys"] = _diffusers_folder(root, "folder_extra_keys",
                                                 {**weights, "decoder.extra_head.weight": torch.zeros(4)}, config)
    bad = _diffusers_folder(root, "folder_bad_config", weights, config)
    (bad / "config.json").write_text('{"latent_channels": 4,')
    out["folder_bad_config"] = bad

    # A legacy pickle whose GLOBAL names a callable (os.system): weights_only=True refuses it.
    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo hostile-pickle-ran > " + str(root / "PWNED"),))

    torch.save({"state_dict": {**{k: v for k, v in list(weights.items())[:2]}, "x": Evil()}},
               path("unsafe_global.ckpt"), pickle_protocol=2)
    # A zip archive that is not a torch checkpoint.
    with zipfile.ZipFile(path("zip_of_something_else.ckpt"), "w") as z:
        z.writestr("readme.txt", "hello")
        z.writestr("data/pictures.json", json.dumps({"a": 1}))
    ckpt = root / "valid.ckpt"
    torch.save({"state_dict": weights}, ckpt)
    blob = ckpt.read_bytes()
    path("truncated.ckpt").write_bytes(blob[: len(blob) // 2])
    ckpt.unlink()
    valid.unlink()
    assert set(out) == set(PROBLEMS), sorted(set(out) ^ set(PROBLEMS))
    return out
