"""sdvae.heap: after keep_freed_memory(), a chain of large tensors (each layer's output from its input, the
input then freed) reuses freed memory (few new page faults); without it, turned off by
SDVAE_KEEP_FREED_MEMORY=0, or inside bounded_memory() (tiled work), every large tensor faults its pages in.
Each case runs in a fresh interpreter: the setting is per process and would outlive the test here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CHAIN_MIB = (48, 48, 64, 64, 40, 40, 80, 80)  # every one above glibc's 32 MiB mmap limit
CHAIN_PAGES = sum(CHAIN_MIB) * 2**20 // 4096

CHILD = f"""
import json, resource, sys
import torch
from sdvae.heap import bounded_memory, keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] in ("apply", "bounded") else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def chain():  # a layer chain: each output written, its input freed
    x = torch.ones(2**20)
    for mib in {CHAIN_MIB}:
        y = torch.empty(mib * 2**18)
        y.fill_(1.0)
        x = y
    del x, y
def pages(steps=3):
    start = faults()
    for _ in range(steps):
        chain()
    return faults() - start
chain()  # the heap grows to the chain's peak once
out = {{"applied": applied, "pages": pages()}}
if sys.argv[1] == "bounded":
    with bounded_memory():
        with bounded_memory():  # nested: still bounded after the inner one ends
            out["inside"] = pages(1)
        out["inside"] += pages(1)
    chain()  # the heap again: it grows once more
    out["after"] = pages()
print(json.dumps(out))
"""


def _run(mode: str, **env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")


@linux
def test_freed_tensors_are_reused_without_page_faults_once_applied():
    plain = _run("plain")
    kept = _run("apply")
    off = _run("apply", SDVAE_KEEP_FREED_MEMORY="0")
    assert plain["pages"] >= 3 * 0.9 * CHAIN_PAGES  # mapped afresh (and zeroed by the kernel) every time
    # glibc places some blocks past the holes (memalign's slack): 0-3 of the 24 tensors fault, not all
    assert kept["applied"] and kept["pages"] < 0.4 * plain["pages"]
    assert not off["applied"] and off["pages"] >= 3 * 0.9 * CHAIN_PAGES


@linux
def test_bounded_memory_maps_and_unmaps_again_then_keeps_freed_memory_after():
    r = _run("bounded")
    assert r["applied"] and r["pages"] < 0.4 * 3 * CHAIN_PAGES
    assert r["inside"] >= 1.25 * CHAIN_PAGES  # two chains: mostly mapped afresh again
    assert r["after"] < 0.4 * 3 * CHAIN_PAGES


def test_elsewhere_it_does_nothing(monkeypatch):
    from sdvae import heap

    monkeypatch.setattr(heap.sys, "platform", "darwin")
    assert heap.keep_freed_memory() is False
    with heap.bounded_memory():
        pass
