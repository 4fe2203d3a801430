"""Which precision is fast on this device: bf16 only where the hardware computes it natively.

bf16 autocast pays off on CPUs whose oneDNN has native bf16 kernels (AVX-512 BF16, AMX: 2-2.7x faster than fp32
for this suite's convolutions) and on recent GPUs. On a CPU without them (AVX2 only) oneDNN emulates bf16 and the
same work is far slower than fp32: measured on an AVX2-only AMD EPYC, a CPU-VAE training step 20x slower and a
1024x1024 matmul 90x slower (README, "Precision"). So every entry point that defaults to bf16 resolves
``"auto"`` through :func:`resolve_precision`, and LightningCLI runs asked for ``bf16-mixed`` on such a CPU train in
``32-true`` (``experiments/train.py``), saying so in one line.

No ``lightning`` import here.
"""

import functools
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def _cpu_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        pass
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """True when ``device`` computes bf16 natively (a CPU with AVX-512 BF16 or AMX, a GPU with bf16 support)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return _cpu_native_bf16()
    return False


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """An autocast precision name with ``"auto"`` resolved: ``"bf16"`` where it is native, else ``"fp32"``.

    Args:
        precision: ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"``; names other than ``"auto"`` come back as given.
        device: The device the work runs on.
    """
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def trainer_precision(precision: str | int | None, accelerator: str | None) -> str | int | None:
    """A Lightning ``Trainer`` precision with bf16 on a CPU without native bf16 replaced by ``"32-true"``.

    Args:
        precision: The requested value (``"bf16-mixed"``, ``"bf16-true"``, ``"32-true"``, ...).
        accelerator: The trainer's accelerator (``"cpu"``, ``"gpu"``, ``"cuda"``, ``"auto"`` or None).

    Returns:
        ``"32-true"`` when the run would compute bf16 on such a CPU, else ``precision`` unchanged.
    """
    if not isinstance(precision, str) or not precision.startswith("bf16"):
        return precision
    on_cpu = accelerator == "cpu" or (accelerator in (None, "auto") and not torch.cuda.is_available())
    if on_cpu and not native_bf16("cpu"):
        return "32-true"
    return precision
