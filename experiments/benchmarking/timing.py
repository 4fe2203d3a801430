"""Timing, FLOP counting, matmul peak and machine facts for the benchmark.

Every timing synchronises the device before reading the clock (CUDA kernels run asynchronously), runs ``warmup``
untimed calls first and then repeats the call until ``max_seconds`` are spent (at least once). FLOPs come from
``torch.utils.flop_counter.FlopCounterMode``, which counts matrix multiplications, convolutions and attention
(2 FLOPs per multiply-add) and nothing else, so utilisation figures are conservative for norm/activation-heavy nets.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast context of a precision name: ``"fp32"`` runs without autocast, ``"bf16"`` under bf16 autocast.

    Raises:
        ValueError: For an unknown precision name.
    """
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {sorted(DTYPES)}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Wall-clock seconds of repeated calls.

    Attributes:
        times: Seconds of every timed call (warm-up excluded).
    """

    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        """Median seconds per call."""
        return statistics.median(self.times)

    @property
    def reps(self) -> int:
        """Number of timed calls."""
        return len(self.times)


def measure(
    fn: Callable[[], object], device: torch.device, *, max_seconds: float, warmup: int = 1, max_reps: int = 1000
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then timed calls until ``max_seconds`` are spent (at least one).

    Args:
        fn: The work to time (its result is discarded).
        device: Device to synchronise before and after each call.
        max_seconds: Budget for the timed calls; the last call may overrun it.
        warmup: Untimed calls first (caches, allocator, oneDNN kernel selection).
        max_reps: Upper bound on timed calls.

    Returns:
        The per-call times.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    timing, spent = Timing(), 0.0
    while timing.reps < max(1, max_reps) and (timing.reps == 0 or spent < max_seconds):
        start = time.perf_counter()
        fn()
        synchronize(device)
        timing.times.append(time.perf_counter() - start)
        spent += timing.times[-1]
    return timing


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one ``fn()`` call as ``FlopCounterMode`` counts them (matmul, convolution, attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_peak(precision: str, device: torch.device, *, size: int, max_seconds: float = 1.0) -> float:
    """Measured matrix-multiplication throughput (FLOP/s) of square ``size`` matrices in one dtype.

    The best of several chunks of back-to-back matmuls is reported (the machine's reachable peak on these threads),
    so it is an upper reference for the utilisation of real networks measured in the same run.

    Args:
        precision: ``"fp32"`` or ``"bf16"`` (inputs in that dtype; fp32 matmuls use the default TF32 setting).
        device: Where to run.
        size: Matrix side (2048 is enough to saturate a CPU; use 8192 on a GPU).
        max_seconds: Time budget.

    Returns:
        FLOP/s (``2 * size**3`` per matmul).
    """
    a = torch.randn(size, size, device=device).to(DTYPES[precision])
    b = torch.randn(size, size, device=device).to(DTYPES[precision])
    out = torch.empty_like(a)
    torch.matmul(a, b, out=out)
    synchronize(device)
    start = time.perf_counter()
    torch.matmul(a, b, out=out)
    synchronize(device)
    one = max(time.perf_counter() - start, 1e-9)
    chunk = max(1, int(0.1 / one))
    best, spent, chunks = 0.0, 0.0, 0
    while chunks < 3 or spent < max_seconds:
        start = time.perf_counter()
        for _ in range(chunk):
            torch.matmul(a, b, out=out)
        synchronize(device)
        elapsed = time.perf_counter() - start
        spent += elapsed
        chunks += 1
        best = max(best, 2.0 * size**3 * chunk / elapsed)
        if chunks >= 50:
            break
    return best


def cpu_model() -> str:
    """CPU model name from ``/proc/cpuinfo`` (falls back to ``platform.processor()``)."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """Matrix-relevant CPU flags (AVX-512 bf16, AMX) present in ``/proc/cpuinfo``."""
    wanted = ("avx512_bf16", "amx_bf16", "amx_tile", "amx_int8", "avx512f", "avx2")
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in present]
    return []


def machine_info(device: torch.device) -> dict:
    """Facts about the machine a run measured: CPU model and flags, threads, versions, GPU name."""
    import diffusers

    info = {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    return info
