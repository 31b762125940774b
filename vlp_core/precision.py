"""Numeric precision: when to run under bf16 autocast (``model.precision`` for training,
``capfilt.precision`` for CapFilt's captioner and filter and the features stage's embeddings).

``auto`` turns bf16 autocast on for CUDA and for CPUs with native bf16 instructions
(AMX-BF16 or AVX512-BF16, read from ``/proc/cpuinfo``), and leaves fp32 elsewhere;
``fp32`` and ``bf16`` force either.  Measured (see README *Benchmarks*): on a CPU with
AMX-BF16, bf16 made a ``blip-base`` image encode 4.0x faster and a training step 2.5x; on
this project's AVX512-BF16 CI machine the ``tiny`` arch's training step was 1.3x faster.
Weights stay fp32 (autocast only lowers the matmuls), so checkpoints do not change format.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import TYPE_CHECKING

from vlp_core.errors import VlpError

if TYPE_CHECKING:  # torch loads when a model runs, not when vlp_core.images imports this
    import torch

PRECISIONS = ("auto", "fp32", "bf16")
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# the instruction sets that pick torch's CPU kernels (oneDNN, BLAS): two machines that differ in
# them round differently, and a long training run carries a last-bit difference into other weights
KERNEL_CPU_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2", "fma")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first CPU in ``/proc/cpuinfo``; ("", {}) where it cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", frozenset()
    name, flags = "", frozenset()
    for line in text.splitlines():
        if line.startswith("model name") and not name:
            name = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
            flags = frozenset(line.split(":", 1)[1].split())
        if name and flags:
            break
    return name, flags


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AMX-BF16 or AVX512-BF16)."""
    return any(f in _cpuinfo()[1] for f in BF16_CPU_FLAGS)


def arithmetic(device: torch.device | str) -> dict[str, object]:
    """What decides a run's rounding on ``device``, for a run's stats: the torch version, the
    thread count, and the CPU's model and kernel-picking instruction sets (or the GPU's name).
    Seeded runs are bit-identical where these agree; where they differ (another machine), the
    same seed gives a run that differs in the last bits and, after thousands of steps, in its
    numbers by about the seed spread."""
    import torch

    dev = torch.device(device)
    name, flags = _cpuinfo()
    out: dict[str, object] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                              "cpu": name, "cpu_flags": [f for f in KERNEL_CPU_FLAGS if f in flags]}
    if dev.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(dev)
    return out


class PrecisionError(VlpError, ValueError):
    """A precision that is not auto, fp32 or bf16."""


def use_bf16(precision: str, device: torch.device | str) -> bool:
    """Whether ``precision`` (auto | fp32 | bf16) means bf16 autocast on ``device``."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    import torch

    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and cpu_has_bf16())


def autocast_for(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` where ``precision`` says so (:func:`use_bf16`), else nothing."""
    import torch

    dev = torch.device(device)
    if use_bf16(precision, dev):
        return torch.autocast(dev.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolved(precision: str, device: torch.device | str) -> str:
    """``"bf16"`` or ``"fp32"``: what ``precision`` means on ``device`` (for fingerprints and stats)."""
    return "bf16" if use_bf16(precision, device) else "fp32"


__all__ = ["PRECISIONS", "PrecisionError", "arithmetic", "autocast_for", "cpu_has_bf16", "resolved", "use_bf16"]
