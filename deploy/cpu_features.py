"""The CPU features that decide how INT8 runs here, read from the operating system.

ONNX Runtime's int8 matrix products on x86-64 use VNNI instructions (``avx512_vnni``, or
``avx_vnni`` on AVX2-class cores) when the CPU has them. Without VNNI, the u8 x s8 product is
done with instructions whose 16-bit intermediate sums can saturate, which is why ORT suggests
``reduce_range`` (7-bit weights) or u8 x u8 there; with VNNI neither is needed. Which helps is
measured on the target (:mod:`deploy.quantize`), and these flags are recorded beside the
choice so a report says which kind of CPU the choice was made on.
"""

from __future__ import annotations

import platform
from pathlib import Path

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


def cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, object]:
    """The CPU's model name, its INT8-relevant flags, and whether it has VNNI (None: unknown)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {"cpu": name, "machine": platform.machine(), "flags": [], "vnni": None}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and value.strip():
            name = value.strip()
        elif key in ("flags", "features"):  # x86 and ARM spell it differently
            flags |= set(value.split())
    found = [f for f in FLAGS if f in flags]
    vnni = bool({"avx512_vnni", "avx_vnni"} & flags) if platform.machine() in ("x86_64", "AMD64") else None
    return {"cpu": name, "machine": platform.machine(), "flags": found, "vnni": vnni}
