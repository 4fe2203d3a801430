"""Latent denoisers: diffusers ``UNet2DModel`` presets, unconditional, conditioned only on the timestep.

``"paper"`` is the authors' network (docs/METHOD.md section 3): block_out_channels (128, 128, 256, 256, 512, 512), two
ResNet layers per block, self-attention only at the 2x2 level (one AttnDownBlock2D / AttnUpBlock2D pair) and in the
middle block; 113.68 M parameters for 4 in / 4 out channels. ``"cpu"`` keeps the same shape at a few M parameters for
2-core training, ``"tiny"`` is for unit tests.

No ``lightning`` import here: this is a pure torch/diffusers component.
"""

from typing import Literal

from diffusers import UNet2DModel
from torch import Tensor, nn

DenoiserSize = Literal["paper", "cpu", "tiny"]

_PRESETS: dict[str, dict] = {
    "paper": {
        "block_out_channels": (128, 128, 256, 256, 512, 512),
        "layers_per_block": 2,
        # Resolutions 32, 16, 8, 4, 2, 1 at sample_size 32: attention at the 2x2 level only.
        "down_block_types": ("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
        "norm_num_groups": 32,
        "attention_head_dim": 8,
    },
    "cpu": {
        "block_out_channels": (64, 128, 128, 128),
        "layers_per_block": 1,
        # Resolutions 32, 16, 8, 4: attention at the coarsest level and in the middle block, as in the paper.
        "down_block_types": ("DownBlock2D",) * 3 + ("AttnDownBlock2D",),
        "up_block_types": ("AttnUpBlock2D",) + ("UpBlock2D",) * 3,
        "norm_num_groups": 32,
        "attention_head_dim": 32,
    },
    "tiny": {
        "block_out_channels": (16, 32),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
        "norm_num_groups": 8,
        "attention_head_dim": 8,
    },
}


def build_unet(
    size: DenoiserSize = "cpu", *, sample_size: int = 32, in_channels: int = 4, out_channels: int | None = None
) -> UNet2DModel:
    """Build a randomly initialised unconditional ``UNet2DModel``.

    Args:
        size: ``"paper"`` (113.7 M parameters), ``"cpu"`` (about 6 M) or ``"tiny"`` (tests).
        sample_size: Spatial size of the latents it denoises (32 for 256x256 tiles with a factor-8 VAE).
        in_channels: Latent channels (4 for kl-f8; 3 in pixel space).
        out_channels: Output channels; ``None`` means ``in_channels`` (epsilon prediction).

    Returns:
        A UNet mapping ``(B, in_channels, S, S)`` and timesteps ``(B,)`` to ``.sample`` of shape
        ``(B, out_channels, S, S)``.

    Raises:
        ValueError: If ``size`` is unknown or ``sample_size`` cannot be halved once per downsampling block.
    """
    if size not in _PRESETS:
        raise ValueError(f"unknown denoiser size {size!r}; expected one of {sorted(_PRESETS)}")
    preset = _PRESETS[size]
    n_down = len(preset["block_out_channels"]) - 1
    if sample_size < 1 or sample_size % (2**n_down):
        raise ValueError(f"sample_size {sample_size} must be a positive multiple of {2**n_down} for size {size!r}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be positive, got {in_channels}")
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels if out_channels is None else out_channels,
        **preset,
    )


def predict(net: nn.Module, x_t: Tensor, t: Tensor) -> Tensor:
    """Call a denoiser ``net(x_t, t)`` and return its tensor output (diffusers models wrap it in ``.sample``)."""
    out = net(x_t, t)
    return out.sample if hasattr(out, "sample") else out
