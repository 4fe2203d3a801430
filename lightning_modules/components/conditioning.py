"""Input contract of the mask-conditioned latent restorer (``latent-conditional``, docs/METHOD.md section 9).

The paper's denoiser sees only the noisy latent ``z_t`` and the timestep. The conditional restorer also sees the
evidence the paper throws away: the latent of the corrupted tile (tissue is still visible under ink, stain, blur and
bubbles) and which latent cells are to be regenerated. Its input is the channel concatenation

    ``[z_t (C), latent_mask (1), z_corrupted (C)]``  ->  ``(B, 2C + 1, h, w)``

in the order diffusers' inpainting UNet uses (noisy latents, mask, image latents; 9 channels for C = 4). Unlike
that UNet we pass the latent of the *corrupted* tile, not of a tile with the masked region blanked out, so that
semi-transparent artifacts keep their evidence. Training (``lightning_modules/conditional_latent.py``) and sampling
(:func:`condition_denoiser`, used by ``regional_sampler.restore``) build the input with the same function, so the
channel order cannot drift between them.

No ``lightning`` import here: this is a pure torch component.
"""

from collections.abc import Callable

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor], Tensor]


def conditional_channels(latent_channels: int) -> int:
    """Input channels of a conditional denoiser for ``latent_channels``-channel latents: ``2 * C + 1``."""
    if latent_channels < 1:
        raise ValueError(f"latent_channels must be >= 1, got {latent_channels}")
    return 2 * latent_channels + 1


def conditional_input(z_t: Tensor, latent_mask: Tensor, z_corrupted: Tensor) -> Tensor:
    """Concatenate the noisy latent, the latent mask and the corrupted latent along channels.

    Args:
        z_t: Noisy latents ``(B, C, h, w)``.
        latent_mask: ``(B, 1, h, w)`` or ``(1, 1, h, w)`` in ``{0, 1}``, 1 = regenerate.
        z_corrupted: Scaled latents of the corrupted tiles ``(B, C, h, w)``.

    Returns:
        ``(B, 2C + 1, h, w)`` in ``z_t``'s dtype.

    Raises:
        ValueError: If the shapes do not line up.
    """
    if z_t.ndim != 4 or z_corrupted.shape != z_t.shape:
        raise ValueError(
            f"z_t {tuple(z_t.shape)} and z_corrupted {tuple(z_corrupted.shape)} must be equal (B, C, h, w) shapes"
        )
    if latent_mask.ndim != 4 or latent_mask.shape[1] != 1 or latent_mask.shape[-2:] != z_t.shape[-2:]:
        raise ValueError(f"latent_mask {tuple(latent_mask.shape)} must be (B, 1, h, w) for z_t {tuple(z_t.shape)}")
    mask = latent_mask.to(z_t.dtype).expand(z_t.shape[0], -1, -1, -1)
    return torch.cat([z_t, mask, z_corrupted.to(z_t.dtype)], dim=1)


def condition_denoiser(denoiser: Denoiser, latent_mask: Tensor, z_corrupted: Tensor) -> Denoiser:
    """Bind the conditioning of one batch to a conditional network, giving the sampler's ``denoiser(x_t, t)``.

    Args:
        denoiser: ``fn(input (B, 2C + 1, h, w), t (B,)) -> output (B, C, h, w)``.
        latent_mask: ``(B, 1, h, w)`` in ``{0, 1}``, 1 = regenerate (the sampler's mask).
        z_corrupted: ``(B, C, h, w)``: the latent the sampler keeps in the known region.

    Returns:
        ``fn(x_t (B, C, h, w), t) -> output``.
    """

    def fn(x_t: Tensor, t: Tensor) -> Tensor:
        return denoiser(conditional_input(x_t, latent_mask, z_corrupted), t)

    return fn
