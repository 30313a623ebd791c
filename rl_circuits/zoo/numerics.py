"""The numeric environment a zoo build pins, so that every x86 machine trains the same zoo.

Vectorised CPU kernels (ATen's AVX2/AVX-512 paths, MKL, oneDNN) round differently, and
training amplifies last-bit differences into different models (issue 28). The build therefore
starts its training in a subprocess whose environment selects the AVX2 kernels of every
library, one thread and deterministic algorithms, whatever the user's shell sets. These
variables are read when torch loads, so they only take effect in a fresh process.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

X86 = ("x86_64", "amd64", "i386", "i686")
# Per kernel set: (ATEN_CPU_CAPABILITY, MKL_CBWR, ONEDNN_MAX_CPU_ISA); None leaves it unset.
KERNEL_SETS = {
    "default": ("default", "COMPATIBLE", "SSE41"),
    "avx2": ("avx2", "AVX2", "AVX2"),
    "avx512": ("avx512", "AVX512", "AVX512_CORE"),
}


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def is_x86(machine: str | None = None) -> bool:
    return (machine or platform.machine()).lower() in X86


def kernel_sets(machine: str | None = None, flags: frozenset[str] | None = None) -> list[str]:
    """The names in `KERNEL_SETS` this CPU can run (`default` everywhere)."""
    flags = cpu_flags() if flags is None else flags
    if not is_x86(machine):
        return ["default"]
    return ["default"] + [k for k, f in (("avx2", "avx2"), ("avx512", "avx512f")) if f in flags]


def pinned_environment(
    num_threads: int = 1,
    *,
    kernels: str | None = None,
    machine: str | None = None,
    flags: frozenset[str] | None = None,
    mkl: bool | None = None,
) -> dict[str, str]:
    """Environment variables of the build's training subprocess (all values strings).

    AVX2 kernels where the CPU has AVX2 (the widest set common to current x86 machines),
    else ATen's portable `default` kernels; MKL's AVX2 reproducibility mode when torch uses
    MKL; `num_threads` OpenMP/MKL threads. `kernels` (a `KERNEL_SETS` name) forces another
    set, for measuring how much the recipe depends on it (`bench/zoo_seeds.py`).
    """
    flags = cpu_flags() if flags is None else flags
    avx2 = is_x86(machine) and "avx2" in flags
    if kernels is not None and kernels not in KERNEL_SETS:
        raise ValueError(f"kernels={kernels!r}: choose one of {', '.join(KERNEL_SETS)}")
    if mkl is None:
        import torch

        mkl = torch.backends.mkl.is_available()
    env = {
        "ATEN_CPU_CAPABILITY": "avx2" if avx2 else "default",
        "OMP_NUM_THREADS": str(num_threads),
        "MKL_NUM_THREADS": str(num_threads),
        "CUBLAS_WORKSPACE_CONFIG": ":4096:8",  # what deterministic cuBLAS needs on a GPU
    }
    if kernels is not None:
        aten, cbwr, isa = KERNEL_SETS[kernels]
        env["ATEN_CPU_CAPABILITY"] = aten
        env["ONEDNN_MAX_CPU_ISA"] = isa
        if mkl:
            env["MKL_CBWR"] = cbwr
    elif avx2:
        env["ONEDNN_MAX_CPU_ISA"] = "AVX2"
        if mkl:
            env["MKL_CBWR"] = "AVX2"
    return env


def environment_digest(env: dict[str, str]) -> str:
    """Short sha256 of a pinned environment (part of the zoo's cache digest)."""
    return hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()[:16]


def bitwise_note(machine: str | None = None, flags: frozenset[str] | None = None) -> str | None:
    """One line saying why this machine cannot rebuild the reference zoo bit for bit, or None."""
    machine = machine or platform.machine()
    flags = cpu_flags() if flags is None else flags
    if not is_x86(machine):
        return (
            f"note: this {machine} CPU is not x86, so its zoo is not bit-identical to the "
            "reference build; its accuracies may differ from the README's"
        )
    if "avx2" not in flags:
        return (
            "note: this CPU shows no AVX2, so its zoo is not bit-identical to the reference "
            "build; its accuracies may differ from the README's"
        )
    return None


def apply_in_process(env: dict[str, str]) -> None:
    """Check that this fresh process runs in `env` and make torch deterministic.

    Called first thing in the training subprocess; raises if torch did not load under the
    pinned environment (it must be set before torch is imported).
    """
    import torch

    wrong = {k: os.environ.get(k) for k, v in env.items() if os.environ.get(k) != v}
    if wrong:
        raise RuntimeError(f"zoo training process started outside its pinned environment: {wrong}")
    torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    torch.use_deterministic_algorithms(True)
