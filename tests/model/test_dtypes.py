"""``--dtype auto``'s hardware rule, driven through the capabilities the real detector reads.

Nothing here stubs a function of ``sdvae.model.dtypes``: the tests replace what torch reports
(``torch.cpu.get_capabilities``, ``torch.cuda``) and check the precision ``resolve_dtype`` picks, so a
detector that ignored AVX512-BF16 or AMX (and made ``auto`` drop to fp32 on such CPUs) fails here.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from sdvae.errors import UserError
from sdvae.model.dtypes import DTYPES, resolve_dtype


def _report_cpu(monkeypatch: pytest.MonkeyPatch, *, avx512_bf16: bool, amx_bf16: bool) -> None:
    """Make torch report a CPU with (or without) each bf16 instruction set; other entries as on this host."""
    real = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    report: dict[str, Any] = {**real, "avx512_bf16": avx512_bf16, "amx_bf16": amx_bf16}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: dict(report), raising=False)


@pytest.mark.parametrize(("avx512_bf16", "amx_bf16", "expected"), [
    (True, False, "bf16"),  # e.g. Zen 4, Cooper Lake: AVX512-BF16 without AMX
    (False, True, "bf16"),  # AMX without the AVX512-BF16 flag
    (True, True, "bf16"),  # Sapphire Rapids and later
    (False, False, "fp32"),  # no native bf16: auto never picks an emulated precision
])
def test_auto_on_cpu_follows_the_reported_instruction_sets(monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool,
                                                           amx_bf16: bool, expected: str) -> None:
    """Each instruction set alone is enough for bf16; neither gives fp32 (the README's rule)."""
    _report_cpu(monkeypatch, avx512_bf16=avx512_bf16, amx_bf16=amx_bf16)
    assert resolve_dtype("auto", "cpu") == expected
    assert resolve_dtype("auto", torch.device("cpu")) == expected


def test_auto_on_cpu_without_a_capability_report_is_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch without ``torch.cpu.get_capabilities`` (nothing known about the CPU) gets fp32, not an error."""
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    assert resolve_dtype("auto", "cpu") == "fp32"


@pytest.mark.parametrize(("available", "bf16", "expected"), [
    (True, True, "bf16"), (True, False, "fp32"), (False, True, "fp32"), (False, False, "fp32")])
def test_auto_on_cuda_follows_the_reported_device(monkeypatch: pytest.MonkeyPatch, available: bool, bf16: bool,
                                                  expected: str) -> None:
    """CUDA: bf16 only with a device present that reports bf16 support; the CPU's flags play no part."""
    _report_cpu(monkeypatch, avx512_bf16=True, amx_bf16=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_dtype("auto", "cuda") == expected
    assert resolve_dtype("auto", "cuda:0") == expected


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_on_cuda_ignores_emulated_bf16(monkeypatch: pytest.MonkeyPatch, native: bool, expected: str) -> None:
    """A GPU that only emulates bf16 (torch counts it by default: T4, V100) gets fp32 under ``auto``."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native or including_emulation)
    assert resolve_dtype("auto", "cuda") == expected


@pytest.mark.parametrize("native", [True, False])
def test_explicit_choices_are_kept_whatever_the_hardware(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    """fp32/fp16/bf16 are used as asked (fp16 only on request); unknown names are refused."""
    _report_cpu(monkeypatch, avx512_bf16=native, amx_bf16=native)
    for name in DTYPES:
        assert resolve_dtype(name, "cpu") == name
    with pytest.raises(UserError, match="unknown dtype"):
        resolve_dtype("fp8", "cpu")
