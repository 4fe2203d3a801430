"""Latent autoencoders: build, load and wrap a diffusers ``AutoencoderKL`` for latent diffusion.

The paper encodes 256x256 RGB tiles with Stable Diffusion 1.5's kl-f8 VAE into 4x32x32 latents scaled by 0.18215 and
takes a random posterior sample, not the mean (docs/METHOD.md section 3). No SD weights exist offline, so this module
builds the same architecture (``"kl-f8"``) or smaller ones for CPU training and tests, loads any diffusers-format VAE
from a local folder (or a hub id when the user is online), and estimates the scaling factor of a newly trained VAE
once, offline, at export time (ldm's ``scale_by_std`` recomputes it on rank 0 inside training instead).

No ``lightning`` import here: this is a pure torch/diffusers component.
"""

import logging
import os
from collections.abc import Iterable
from typing import Literal

import torch
from diffusers import AutoencoderKL
from torch import Tensor, nn

log = logging.getLogger(__name__)

AutoencoderSize = Literal["kl-f8", "cpu", "cpu-wide", "tiny"]

# Every preset has 4 blocks (downsampling factor 2**3 = 8); the latent channels are an argument of build_autoencoder.
_PRESETS: dict[str, dict] = {
    # Stable Diffusion 1.5 kl-f8 sizes (about 83.7 M parameters).
    "kl-f8": {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32},
    # Small enough to train on 2 CPU cores in minutes at 256x256 (about 1.4 M parameters).
    "cpu": {"block_out_channels": (32, 64, 64, 64), "layers_per_block": 1, "norm_num_groups": 32},
    # Twice the width (about 5 M parameters): the "width" lever of docs/VAE.md.
    "cpu-wide": {"block_out_channels": (64, 128, 128, 128), "layers_per_block": 1, "norm_num_groups": 32},
    # For unit tests on 64x64 images (a few thousand parameters).
    "tiny": {"block_out_channels": (8, 8, 8, 8), "layers_per_block": 1, "norm_num_groups": 4},
}
SD_SCALING_FACTOR = 0.18215


def build_autoencoder(
    size: AutoencoderSize = "cpu",
    *,
    latent_channels: int = 4,
    mid_block_attention: bool = True,
    logvar_init: float | None = None,
    scaling_factor: float = SD_SCALING_FACTOR,
) -> AutoencoderKL:
    """Build a randomly initialised ``AutoencoderKL`` with downsampling factor 8.

    Args:
        size: ``"kl-f8"`` (SD 1.5 architecture), ``"cpu"`` (trainable on 2 cores), ``"cpu-wide"`` (twice its width)
            or ``"tiny"`` (tests).
        latent_channels: Channels of the latent (4 in SD 1.5 and the paper; 8 or 16 reconstruct better, see
            docs/VAE.md).
        mid_block_attention: Self-attention in the encoder's and decoder's middle blocks (SD has it; at CPU scale it
            costs about a third of the training step and was not measurably useful, docs/VAE.md).
        logvar_init: Start value of the posterior log-variance (the bias of the log-variance half of
            ``quant_conv``). None keeps diffusers' init (log-variance about 0, i.e. posterior noise as large as the
            latents themselves, which slows early training); -8 starts from a standard deviation of 0.018.
        scaling_factor: Latent scaling written into ``vae.config``; re-estimate it after training with
            :func:`estimate_scaling_factor`.

    Returns:
        The autoencoder, mapping ``(B, 3, H, W)`` images in ``[-1, 1]`` to ``(B, latent_channels, H/8, W/8)``.

    Raises:
        ValueError: If ``size`` is not a known preset or ``latent_channels`` is below 1.
    """
    if size not in _PRESETS:
        raise ValueError(f"unknown autoencoder size {size!r}; expected one of {sorted(_PRESETS)}")
    if latent_channels < 1:
        raise ValueError(f"latent_channels must be >= 1, got {latent_channels}")
    preset = _PRESETS[size]
    n_blocks = len(preset["block_out_channels"])
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n_blocks,
        up_block_types=("UpDecoderBlock2D",) * n_blocks,
        latent_channels=latent_channels,
        scaling_factor=scaling_factor,
        mid_block_add_attention=mid_block_attention,
        **preset,
    )
    if logvar_init is not None:
        with torch.no_grad():
            vae.quant_conv.bias[latent_channels:].fill_(logvar_init)
    return vae


def load_autoencoder(
    name_or_path: str | os.PathLike, subfolder: str | None = None, local_files_only: bool = True
) -> AutoencoderKL:
    """Load a diffusers-format ``AutoencoderKL`` from a local folder or (online only) a hub id.

    Args:
        name_or_path: A folder written by ``save_pretrained`` (``config.json`` + weights), or a hub id such as
            ``"stabilityai/sd-vae-ft-mse"`` when ``local_files_only`` is False and the network is reachable.
        subfolder: Folder inside ``name_or_path`` holding the VAE (``"vae"`` for a full SD pipeline folder).
        local_files_only: Never touch the network (the default; the project runs offline).

    Returns:
        The autoencoder in eval mode.

    Raises:
        FileNotFoundError: If nothing loadable is found at ``name_or_path`` (the message names the path).
    """
    name_or_path = os.fspath(name_or_path)
    folder = os.path.join(name_or_path, subfolder) if subfolder else name_or_path
    is_local = os.path.isdir(folder)
    if local_files_only and not is_local:
        raise FileNotFoundError(
            f"no autoencoder folder at {folder!r}: expected a diffusers save_pretrained folder with config.json "
            "(pass local_files_only=False to fetch a hub id when online)"
        )
    try:
        vae = AutoencoderKL.from_pretrained(
            name_or_path, subfolder=subfolder, local_files_only=local_files_only, low_cpu_mem_usage=False
        )
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"could not load an AutoencoderKL from {folder!r}: {err}") from err
    log.info("loaded AutoencoderKL from %s (scaling_factor %.5f)", folder, vae.config.scaling_factor)
    return vae.eval()


def _check_images(x: Tensor, factor: int) -> None:
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
    if x.shape[-2] % factor or x.shape[-1] % factor:
        raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by the autoencoder factor {factor}")


class LatentCodec(nn.Module):
    """A frozen ``AutoencoderKL`` that maps images to scaled latents and back.

    The wrapped VAE is put in eval mode with gradients off, and :meth:`train` keeps it there: a frozen codec has no
    training mode, so a parent's ``.train()`` (which Lightning calls at the start of fit) cannot switch on dropout or
    other train-time behaviour inside it.

    Args:
        vae: The autoencoder; its ``config.scaling_factor`` (and ``shift_factor`` when set) scale the latents.
    """

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.eval()

    def train(self, mode: bool = True) -> "LatentCodec":
        """Keep the frozen codec in eval mode whatever ``mode`` is asked for."""
        return super().train(False)

    @property
    def factor(self) -> int:
        """Spatial downsampling factor (8 for every preset)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        """Number of latent channels (the VAE's ``latent_channels``: 4 in SD, 8 in the suite's CPU VAE)."""
        return int(self.vae.config.latent_channels)

    def _scale(self, z: Tensor) -> Tensor:
        return (z - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def encode_dist(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Scaled mean and standard deviation of the diagonal Gaussian posterior.

        Args:
            x: Images ``(B, 3, H, W)`` in ``[-1, 1]``, ``H`` and ``W`` divisible by :attr:`factor`.

        Returns:
            ``(mean, std)``, each ``(B, C, H/8, W/8)`` in the scaled latent space.
        """
        _check_images(x, self.factor)
        dist = self.vae.encode(x).latent_dist
        return self._scale(dist.mean), dist.std * self.scaling_factor

    @torch.no_grad()
    def encode(self, x: Tensor, *, sample: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """Encode images to scaled latents.

        Args:
            x: Images ``(B, 3, H, W)`` in ``[-1, 1]``, ``H`` and ``W`` divisible by :attr:`factor`.
            sample: Draw a posterior sample as the authors do; False returns the posterior mean (deterministic).
            generator: Random generator for the posterior sample (must live on ``x.device``).

        Returns:
            Latents ``(B, C, H/8, W/8)`` multiplied by the scaling factor (roughly unit variance).
        """
        _check_images(x, self.factor)
        dist = self.vae.encode(x).latent_dist
        z = dist.sample(generator) if sample else dist.mean
        return self._scale(z)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Decode scaled latents to images.

        Args:
            z: Scaled latents ``(B, C, h, w)``.

        Returns:
            Images ``(B, 3, h*8, w*8)`` clamped to ``[-1, 1]``.
        """
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"expected latents of shape (B, {self.latent_channels}, h, w), got {tuple(z.shape)}")
        x = self.vae.decode(z / self.scaling_factor + self.shift_factor).sample
        return x.clamp(-1.0, 1.0)


@torch.no_grad()
def estimate_scaling_factor(vae: AutoencoderKL, images: Tensor | Iterable[Tensor], *, sample: bool = True) -> float:
    """Estimate the latent scaling factor ``1 / std(z)`` of an autoencoder on a set of images.

    Computed once, offline, at export time and written into ``vae.config`` by the caller, so every rank and every
    later run read the same value (unlike ldm's ``scale_by_std``, which recomputes it on rank 0 in training).

    Args:
        vae: The autoencoder (its current ``scaling_factor`` is ignored).
        images: One tensor ``(B, 3, H, W)`` in ``[-1, 1]`` or an iterable of such batches.
        sample: Use posterior samples (what training sees) rather than means.

    Returns:
        ``1 / std`` over all latent values (unshifted).

    Raises:
        ValueError: If no images are given or the latents are constant.
    """
    batches = [images] if isinstance(images, Tensor) else images
    was_training = vae.training
    vae.eval()
    total, total_sq, count = 0.0, 0.0, 0
    device = next(vae.parameters()).device
    for x in batches:
        _check_images(x, 2 ** (len(vae.config.block_out_channels) - 1))
        dist = vae.encode(x.to(device)).latent_dist
        z = (dist.sample() if sample else dist.mean).double()
        total += z.sum().item()
        total_sq += z.square().sum().item()
        count += z.numel()
    vae.train(was_training)
    if count == 0:
        raise ValueError("estimate_scaling_factor got no images")
    var = total_sq / count - (total / count) ** 2
    if var <= 0:
        raise ValueError(f"latents have non-positive variance {var}; cannot estimate a scaling factor")
    return float(var**-0.5)
