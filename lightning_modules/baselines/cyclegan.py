"""The CycleGAN baseline as a restorer: an exported generator G (artifact -> clean) applied to the WHOLE tile.

As in the paper's baseline (docs/METHOD.md section 6; Zhu et al. 2017 via Ke et al. TMI 2023) the translated image is
returned as it is, with no paste-back of the original pixels outside the artifact mask. Clean tissue is therefore
rewritten too, which is the colour/stain mistransfer that LatentArtiFusion's regional denoising avoids; the
``clean``-region metrics of the evaluation measure it. A mask-aware generator (4 input channels, trained with
``CycleGANModule(mask_channel=True)``) also receives the mask; a 3-channel one ignores it.

Build it with ``build_restorer("cyclegan", model=FOLDER, device="cuda", precision="bf16")`` where ``FOLDER`` was
written by ``CycleGANModule.export`` (``ResnetGenerator.save_pretrained``). One network evaluation per tile.
"""

import contextlib
from pathlib import Path

import torch

from lightning_modules.components.gan_networks import ResnetGenerator
from lightning_modules.components.hardware import resolve_precision
from lightning_modules.components.restorer import check_batch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class CycleGANRestorer:
    """Whole-image translation by a CycleGAN generator.

    Args:
        generator: The artifact -> clean :class:`ResnetGenerator` (3 or 4 input channels); put in eval mode, frozen.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` autocast.
        name: Method name used in reports.

    Raises:
        ValueError: For an unknown precision.
    """

    nfe = 1
    takes_sampler = False

    def __init__(self, generator: ResnetGenerator, *, precision: str = "fp32", name: str = "cyclegan") -> None:
        if precision not in (*PRECISIONS, "auto"):
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)} or 'auto', got {precision!r}")
        self.generator = generator.eval().requires_grad_(False)
        self.precision = precision
        self.name = name

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, device: str | torch.device = "cpu", precision: str = "fp32"
    ) -> "CycleGANRestorer":
        """Load a generator folder written by ``CycleGANModule.export``; a missing folder raises FileNotFoundError."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not an exported CycleGAN generator (no config.json)")
        generator = ResnetGenerator.from_pretrained(path, local_files_only=True, low_cpu_mem_usage=False)
        return cls(generator.to(device), precision=precision)

    @torch.no_grad()
    def restore(
        self, corrupted: torch.Tensor, artifact_mask: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Translate every tile as a whole (deterministic; ``generator`` is accepted for the interface and unused).

        Args:
            corrupted: (B, 3, H, W) in [-1, 1]; H and W divisible by 4.
            artifact_mask: (B, 1, H, W) in {0, 1}, 1 = artifact; used only by a mask-aware generator.
            generator: unused (the translation is deterministic); accepted for the restorer interface.

        Returns:
            (B, 3, H, W) in [-1, 1] on the input's device; pixels outside the mask are rewritten too.
        """
        check_batch(corrupted, artifact_mask)
        device = next(self.generator.parameters()).device
        dtype = PRECISIONS[resolve_precision(self.precision, device)]
        autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with autocast:
            out = self.generator(corrupted.to(device).float(), artifact_mask.to(device).float())
        return out.float().clamp(-1, 1).to(corrupted.device)


def _cyclegan(
    *, model: str | Path | None = None, device: str = "cpu", precision: str = "fp32", **_
) -> CycleGANRestorer:
    if model is None:
        raise ValueError("method 'cyclegan' needs --model GENERATOR_DIR (written by CycleGANModule.export)")
    return CycleGANRestorer.from_pretrained(model, device=device, precision=precision)
