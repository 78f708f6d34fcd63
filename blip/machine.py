"""What machine a number was measured on: the CPU's name and whether it does bfloat16 natively.

Torch-free (the report stage reads it). bf16 autocast roughly doubles CPU training speed where the
CPU has AVX512-BF16 or AMX; without them it emulates bf16 and is slower than fp32, so ``bf16: auto``
uses it only there (``blip.dist.bf16_enabled``).
"""

from __future__ import annotations

import platform
from pathlib import Path


def _cpuinfo() -> dict[str, str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in out:
            out[key.strip()] = value.strip()
    return out


def cpu_name() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_bf16() -> list[str]:
    """The CPU's native bfloat16 features (``avx512_bf16``, ``amx_bf16``); empty: none."""
    flags = set(_cpuinfo().get("flags", "").split())
    return sorted(flags & {"avx512_bf16", "amx_bf16"})


def describe(cores: int | None = None) -> str:
    """One line: ``Intel Xeon ... (2 cores), bf16: avx512_bf16 amx_bf16``."""
    import os

    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    bf16 = cpu_bf16()
    return f"{cpu_name()} ({cores} cores), native bf16: {' '.join(bf16) if bf16 else 'none (bf16 autocast off)'}"
