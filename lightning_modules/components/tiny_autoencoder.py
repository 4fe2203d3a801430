"""A TAESD-style tiny autoencoder distilled from the suite's VAE, and the codecs that use it in a pipeline.

TAESD (madebyollin, 2023) replaces Stable Diffusion's VAE by a plain conv net (no normalisation, no attention, ReLU,
nearest upsampling) trained to map images to *the same* scaled latents and back, so a denoiser trained on the big
VAE's latents runs unchanged. diffusers ships the architecture as ``AutoencoderTiny``; this module gives it presets
sized for this suite, and two codecs with :class:`~lightning_modules.components.autoencoders.LatentCodec`'s interface:

- ``"tiny"``: the tiny encoder and decoder (fastest; the denoiser sees the student's latents);
- ``"tiny-decoder"``: the full VAE's encoder and the tiny decoder (the denoiser sees the latents it was trained on;
  only the decode, the larger half of the VAE's work at the paper size, gets cheaper).

The student's latent space is the teacher's scaled one (``(z - shift) * scaling_factor``), so the codec applies no
scaling. Distillation itself is the training recipe ``lightning_modules/tiny_autoencoder_module.py``; the exported
folder records the teacher's fingerprint and a pipeline refuses a student distilled from another VAE
(docs/TINY_VAE.md).

No ``lightning`` import here.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Literal

import torch
from diffusers import AutoencoderTiny
from diffusers.utils import logging as diffusers_logging
from torch import Tensor, nn

from lightning_modules.components.autoencoders import LatentCodec

TinySize = Literal["taesd", "cpu", "tiny"]
AUTOENCODERS = ("full", "tiny", "tiny-decoder")
DISTILLATION_FILE = "distillation.json"

_TINY_PRESETS: dict[str, dict] = {
    # TAESD's own sizes (about 2.4 M parameters): the drop-in for the paper's kl-f8 VAE.
    "taesd": {
        "encoder_block_out_channels": (64, 64, 64, 64),
        "decoder_block_out_channels": (64, 64, 64, 64),
        "num_encoder_blocks": (1, 3, 3, 3),
        "num_decoder_blocks": (3, 3, 3, 1),
    },
    # Half the width and fewer blocks: cheaper than the suite's 1.2 M-parameter CPU VAE (docs/TINY_VAE.md).
    "cpu": {
        "encoder_block_out_channels": (32, 32, 32, 32),
        "decoder_block_out_channels": (32, 32, 32, 32),
        "num_encoder_blocks": (1, 2, 2, 2),
        "num_decoder_blocks": (2, 2, 2, 1),
    },
    # Unit tests.
    "tiny": {
        "encoder_block_out_channels": (8, 8, 8, 8),
        "decoder_block_out_channels": (8, 8, 8, 8),
        "num_encoder_blocks": (1, 1, 1, 1),
        "num_decoder_blocks": (1, 1, 1, 1),
    },
}


def build_tiny_autoencoder(size: TinySize = "cpu", *, latent_channels: int = 4) -> AutoencoderTiny:
    """A randomly initialised ``AutoencoderTiny`` with downsampling factor 8.

    Args:
        size: ``"taesd"`` (TAESD's sizes), ``"cpu"`` (for the suite's CPU VAE) or ``"tiny"`` (tests).
        latent_channels: Must equal the teacher VAE's latent channels.

    Returns:
        The autoencoder: ``encode(x).latents`` maps ``(B, 3, H, W)`` in ``[-1, 1]`` to ``(B, C, H/8, W/8)``,
        ``decode(z).sample`` maps back (unclamped).

    Raises:
        ValueError: Unknown size or ``latent_channels < 1``.
    """
    if size not in _TINY_PRESETS:
        raise ValueError(f"unknown tiny autoencoder size {size!r}; expected one of {sorted(_TINY_PRESETS)}")
    if latent_channels < 1:
        raise ValueError(f"latent_channels must be >= 1, got {latent_channels}")
    return AutoencoderTiny(latent_channels=latent_channels, **_TINY_PRESETS[size])


class TinyCodec(nn.Module):
    """A frozen tiny autoencoder (optionally with the full VAE's encoder) behind ``LatentCodec``'s interface.

    Args:
        tiny: The distilled ``AutoencoderTiny`` (its latents are the teacher's scaled latents).
        encoder: The full VAE's codec to encode with (``"tiny-decoder"`` mode); None encodes with the tiny encoder,
            which is deterministic (no posterior to sample).
    """

    def __init__(self, tiny: AutoencoderTiny, encoder: LatentCodec | None = None) -> None:
        super().__init__()
        self.tiny = tiny.eval().requires_grad_(False)
        self.encoder = encoder
        if encoder is not None and encoder.latent_channels != self.latent_channels:
            raise ValueError(
                f"the tiny autoencoder has {self.latent_channels} latent channels, the VAE {encoder.latent_channels}"
            )
        self.eval()

    def train(self, mode: bool = True) -> "TinyCodec":
        """Keep the frozen codec in eval mode."""
        return super().train(False)

    @property
    def factor(self) -> int:
        """Spatial downsampling factor (8)."""
        return 2 ** (len(self.tiny.config.encoder_block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        """Latent channels (the teacher's)."""
        return int(self.tiny.config.latent_channels)

    @torch.no_grad()
    def encode(self, x: Tensor, *, sample: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """Scaled latents ``(B, C, H/8, W/8)`` of images ``(B, 3, H, W)`` in ``[-1, 1]``.

        ``sample`` and ``generator`` reach the full encoder in ``"tiny-decoder"`` mode; the tiny encoder ignores them.
        """
        if self.encoder is not None:
            return self.encoder.encode(x, sample=sample, generator=generator)
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"expected images (B, 3, H, W) with H, W divisible by {self.factor}, got {tuple(x.shape)}")
        return self.tiny.encode(x).latents

    @torch.no_grad()
    def encode_dist(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, std)`` of the latents; the tiny encoder's std is 0."""
        if self.encoder is not None:
            return self.encoder.encode_dist(x)
        z = self.encode(x)
        return z, torch.zeros_like(z)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Images ``(B, 3, h*8, w*8)`` clamped to ``[-1, 1]`` from scaled latents ``(B, C, h, w)``."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"expected latents of shape (B, {self.latent_channels}, h, w), got {tuple(z.shape)}")
        return self.tiny.decode(z).sample.clamp(-1.0, 1.0)


def teacher_fingerprint(vae: nn.Module) -> str:
    """SHA-256 over a VAE's public config entries and weights.

    The same VAE gives the same value wherever it is loaded from: diffusers' private entries (``_name_or_path``,
    ...) are left out.
    """
    h = hashlib.sha256()
    config = {k: v for k, v in dict(getattr(vae, "config", {})).items() if not k.startswith("_")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_tiny_autoencoder(tiny: AutoencoderTiny, path: str | os.PathLike, distillation: dict) -> Path:
    """Write a diffusers folder plus ``distillation.json`` (teacher fingerprint, steps, ...), atomically.

    Args:
        tiny: The trained student.
        path: Output folder; replaced if it exists.
        distillation: Facts of the distillation; must hold ``teacher_fingerprint``.

    Raises:
        ValueError: ``distillation`` lacks ``teacher_fingerprint``.
    """
    if "teacher_fingerprint" not in distillation:
        raise ValueError("distillation facts need the teacher_fingerprint (teacher_fingerprint(teacher_vae))")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tiny.save_pretrained(tmp)
    (tmp / DISTILLATION_FILE).write_text(json.dumps(distillation, indent=2, sort_keys=True))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def load_tiny_autoencoder(path: str | os.PathLike) -> tuple[AutoencoderTiny, dict]:
    """Load a folder written by :func:`save_tiny_autoencoder`.

    Returns:
        ``(tiny in eval mode, distillation facts)``.

    Raises:
        FileNotFoundError: The folder, its config or its ``distillation.json`` is missing (the message names it).
        ValueError: The weights or the JSON cannot be read.
    """
    path = Path(path)
    facts_file = path / DISTILLATION_FILE
    for needed in (path / "config.json", facts_file):
        if not needed.is_file():
            raise FileNotFoundError(
                f"{needed} is missing: {path} is not a distilled tiny autoencoder; make one with "
                "`python -m experiments.train --config experiments/configs/model/tiny_vae_cpu.yaml ...` and "
                "`python -m experiments.export tiny-vae` (docs/TINY_VAE.md)"
            )
    try:
        facts = json.loads(facts_file.read_text())
        # diffusers writes block_out_channels into AutoencoderTiny's config but does not take it back: silence that
        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()
        try:
            tiny = AutoencoderTiny.from_pretrained(path, local_files_only=True, low_cpu_mem_usage=False)
        finally:
            diffusers_logging.set_verbosity(level)
    except Exception as err:  # diffusers/safetensors raise OSError, ValueError or their own types
        raise ValueError(f"{path}: cannot load the tiny autoencoder ({' '.join(str(err).split())[:300]})") from err
    return tiny.eval(), facts


def make_codec(
    mode: str, vae_codec: LatentCodec, tiny: AutoencoderTiny | None, where: str = "the pipeline"
) -> nn.Module:
    """The codec for an ``autoencoder`` setting (``"full"``, ``"tiny"`` or ``"tiny-decoder"``).

    Raises:
        ValueError: Unknown mode, or a tiny mode without a tiny autoencoder (the message says how to add one).
    """
    if mode not in AUTOENCODERS:
        raise ValueError(f"unknown autoencoder {mode!r}; expected one of {AUTOENCODERS}")
    if mode == "full":
        return vae_codec
    if tiny is None:
        raise ValueError(
            f"autoencoder={mode!r} needs a tiny autoencoder, and {where} has none; distil one from its VAE and add it "
            "with `python -m experiments.export tiny-vae --ckpt CKPT --out PIPELINE_DIR` (docs/TINY_VAE.md)"
        )
    return TinyCodec(tiny, encoder=vae_codec if mode == "tiny-decoder" else None)
