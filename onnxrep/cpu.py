"""The CPU's int8-relevant ISA flags and model name, read from /proc/cpuinfo.

Int8 speed on x86 depends on these: without VNNI (AVX512_VNNI or AVX_VNNI) an int8 dot product
takes three instructions (vpmaddubsw, vpmaddwd, vpaddd) and barely beats fp32 FMA; AMX adds
tile int8/bf16 matrix units. Every speed figure onnxrep prints is a ratio measured in one run
and printed beside this line, because the CPU differs between machines.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

# label -> /proc/cpuinfo flag(s); any one present counts
ISA_FLAGS = {
    "AVX2": ("avx2",),
    "AVX512F": ("avx512f",),
    "AVX512_VNNI": ("avx512_vnni",),
    "AVX_VNNI": ("avx_vnni",),
    "AMX": ("amx_int8", "amx_tile"),
}
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: dict[str, bool] = field(default_factory=dict)  # ISA_FLAGS label -> present
    logical_cpus: int = 0

    @property
    def vnni(self) -> bool:
        return self.flags.get("AVX512_VNNI", False) or self.flags.get("AVX_VNNI", False)

    def line(self) -> str:
        """``AMD EPYC, 2 logical CPUs: AVX2 yes, AVX512F yes, AVX512_VNNI yes, ...``."""
        flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in self.flags.items())
        return f"{self.model}, {self.logical_cpus} logical CPUs: {flags or 'flags unknown'}"

    def as_dict(self) -> dict:
        return {"model": self.model, "logical_cpus": self.logical_cpus, "flags": dict(self.flags),
                "vnni": self.vnni}


def parse_cpuinfo(text: str) -> CpuInfo:
    """CpuInfo from the text of /proc/cpuinfo (the first processor's flags and model name)."""
    flags: set[str] = set()
    model = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and not flags:
            flags = set(value.split())
        elif key == "model name" and model is None:
            model = value.strip()
    found = {label: any(f in flags for f in names) for label, names in ISA_FLAGS.items()}
    return CpuInfo(model or platform.processor() or "unknown CPU", found if flags else {},
                   os.cpu_count() or 0)


def cpu_info(path: Path = CPUINFO) -> CpuInfo:
    """This machine's CpuInfo; flags empty when /proc/cpuinfo cannot be read (not Linux)."""
    try:
        return parse_cpuinfo(Path(path).read_text())
    except OSError:
        return CpuInfo(platform.processor() or "unknown CPU", {}, os.cpu_count() or 0)
