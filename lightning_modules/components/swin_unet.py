"""Swin-UNet denoiser with a time token: the pixel-space network of ArtiFusion (MICCAI 2023, arXiv 2307.14262).

Architecture (docs/METHOD.md section 5):

- Swin-UNet (Cao et al. 2022): a 4x4 patch embedding, an encoder of Swin Transformer stages (Liu et al. 2021: window
  self-attention with a relative position bias, alternating regular and shifted windows) joined by patch merging, a
  symmetric decoder joined by patch expanding (a linear layer doubling the channels, then a 2x2 pixel shuffle), skip
  connections fused by a linear layer, and a final 4x expansion back to the pixel grid.
- Time token (ArtiFusion): the sinusoidal embedding of the timestep (128 dims) goes through an MLP to 512 dims; every
  Swin block projects it to its own width and appends it as ONE extra token to every attention window, so each
  window attends over its ``window**2`` tokens plus the time token. The time token's own output is discarded; the
  window tokens read the timestep through attention only. It gets no relative position bias (its bias row and
  column are zero) and is never masked by the shifted-window mask.
- Output: ``2 * in_channels`` channels, the epsilon prediction followed by the learned-range variance interpolation
  ``v`` in roughly ``[-1, 1]`` (Nichol & Dhariwal 2021), the layout diffusers' ``DDPMScheduler`` expects for
  ``variance_type="learned_range"``.

Design choices (ours; the authors' network definition was never published in a runnable form): the skip of a level is
the encoder stage's output before patch merging; the decoder mirrors the encoder (one stage per level, the bottleneck
being the deepest encoder stage); drop-path rates grow linearly to ``drop_path_rate`` over the encoder and are
mirrored in the decoder. The ``paper`` preset has 29,671,620 parameters, 0.1 % under the paper's "about 29.7 M".

No ``lightning`` import here: this is a pure torch/timm/diffusers component.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models.swin_transformer import PatchMerging, window_partition, window_reverse
from torch import Tensor, nn

from lightning_modules.components.denoisers import build_unet

log = logging.getLogger(__name__)

SwinSize = Literal["paper", "cpu", "tiny"]

_SWIN_PRESETS: dict[str, dict[str, Any]] = {
    # ArtiFusion / Swin-UNet on 256x256 tiles: 29,671,620 parameters.
    "paper": dict(
        sample_size=256,
        patch_size=4,
        embed_dim=96,
        depths=(2, 2, 2, 2),
        num_heads=(3, 6, 12, 24),
        window_size=8,
        mlp_ratio=4.0,
        drop_path_rate=0.1,
    ),
    # Trainable on 2 CPU cores at 256x256 (3 levels, narrower): 2.05 M parameters.
    "cpu": dict(
        sample_size=256,
        patch_size=4,
        embed_dim=48,
        depths=(2, 2, 2),
        num_heads=(2, 4, 8),
        window_size=8,
        mlp_ratio=4.0,
        drop_path_rate=0.1,
        time_embed_dim=256,
    ),
    # Unit tests and smoke runs on 64x64 (or 32x32) tiles.
    "tiny": dict(
        sample_size=64,
        patch_size=4,
        embed_dim=24,
        depths=(1, 1),
        num_heads=(2, 4),
        window_size=4,
        mlp_ratio=2.0,
        drop_path_rate=0.0,
        time_embed_dim=64,
        time_freq_dim=32,
    ),
}


def relative_position_index(window: int, table_window: int) -> Tensor:
    """Index into a relative-position bias table for every (query, key) pair of a square window (Liu et al. 2021).

    Args:
        window: Side of the window actually used (may be smaller than ``table_window`` on small feature maps).
        table_window: Side the bias table was built for; the table has ``(2 * table_window - 1) ** 2`` rows.

    Returns:
        Long tensor ``(window**2, window**2)`` with values in ``[0, (2 * table_window - 1) ** 2)``.
    """
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + table_window - 1
    dx = xs[:, None] - xs[None, :] + table_window - 1
    return dy * (2 * table_window - 1) + dx


def shifted_window_mask(height: int, width: int, window: int, shift: int, device: torch.device) -> Tensor:
    """Additive attention mask of shifted windows (Liu et al. 2021, Sec. 3.2, cyclic shift), time token included.

    After the cyclic shift a window can hold tokens from up to four image regions that are not neighbours; tokens of
    different regions must not attend to each other. The time token (last index) sees and is seen by every token.

    Args:
        height: Token rows of the feature map (a multiple of ``window``).
        width: Token columns (a multiple of ``window``).
        window: Window side.
        shift: Cyclic shift in tokens (0 gives an all-zero mask).
        device: Device of the mask.

    Returns:
        Float tensor ``(num_windows, window**2 + 1, window**2 + 1)``: 0 where attention is allowed, -100 elsewhere.
    """
    labels = torch.zeros(1, height, width, 1, device=device)
    if shift > 0:
        region = 0
        for rows in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            for cols in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
                labels[:, rows, cols, :] = region
                region += 1
    windows = window_partition(labels, (window, window)).flatten(1)  # (nW, window**2)
    time_label = torch.full((windows.shape[0], 1), -1.0, device=device)
    windows = torch.cat([windows, time_label], dim=1)
    different = windows[:, :, None] != windows[:, None, :]
    involves_time = (windows[:, :, None] < 0) | (windows[:, None, :] < 0)
    return torch.where(different & ~involves_time, -100.0, 0.0)


class TimeTokenWindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a relative position bias and one appended time token.

    Args:
        dim: Token width ``C``.
        num_heads: Attention heads (must divide ``dim``).
        window_size: Side of the (largest) window; sizes the relative position bias table.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.window_size = window_size
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer(
            "relative_position_index", relative_position_index(window_size, window_size), persistent=False
        )

    def bias(self, window: int) -> Tensor:
        """Relative position bias ``(heads, window**2 + 1, window**2 + 1)``, zero in the time token's row/column."""
        index = self.relative_position_index
        if window != self.window_size:
            index = relative_position_index(window, self.window_size).to(index.device)
        n = window * window
        table = self.relative_position_bias_table[index.flatten()].view(n, n, -1).permute(2, 0, 1)
        return F.pad(table, (0, 1, 0, 1))

    def forward(self, windows: Tensor, mask: Tensor) -> Tensor:
        """Attend within each window.

        Args:
            windows: ``(B, nW, N + 1, C)`` tokens, the last of each window being the time token.
            mask: ``(nW, N + 1, N + 1)`` additive mask (shifted windows; zeros otherwise).

        Returns:
            ``(B, nW, N + 1, C)``.
        """
        b, nw, length, c = windows.shape
        window = int(round((length - 1) ** 0.5))
        qkv = self.qkv(windows).view(b, nw, length, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # each (B, nW, heads, L, d)
        attn_bias = (self.bias(window)[None] + mask[:, None]).to(q.dtype)  # (nW, heads, L, L), broadcast over B
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)
        return self.proj(out.transpose(2, 3).reshape(b, nw, length, c))


class SwinTimeBlock(nn.Module):
    """Pre-norm Swin Transformer block (Liu et al. 2021) whose windows also attend to a time token (ArtiFusion).

    Args:
        dim: Token width ``C``.
        num_heads: Attention heads.
        window_size: Window side.
        shifted: Whether this block uses the cyclic shift of half a window (when the map is larger than a window).
        mlp_ratio: Hidden width of the MLP relative to ``dim``.
        drop_path: Stochastic depth rate of both residual branches.
        time_embed_dim: Width of the shared time embedding projected to ``dim`` by this block.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shifted: bool,
        mlp_ratio: float,
        drop_path: float,
        time_embed_dim: int,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shifted = shifted
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(time_embed_dim, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TimeTokenWindowAttention(dim, num_heads, window_size)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def window_and_shift(self, height: int, width: int) -> tuple[int, int]:
        """Effective window side and shift on a ``height x width`` token map (the whole map when it is smaller)."""
        if height <= self.window_size and width <= self.window_size:
            if height != width:
                raise ValueError(f"a {height}x{width} token map smaller than the window must be square")
            return height, 0
        if height % self.window_size or width % self.window_size:
            raise ValueError(f"token map {height}x{width} is not divisible by window {self.window_size}")
        return self.window_size, (self.window_size // 2 if self.shifted else 0)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        """Apply the block.

        Args:
            x: ``(B, H, W, C)`` tokens.
            temb: ``(B, time_embed_dim)`` time embedding.

        Returns:
            ``(B, H, W, C)``.
        """
        b, h, w, c = x.shape
        window, shift = self.window_and_shift(h, w)
        y = self.norm1(x)
        if shift:
            y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
        windows = window_partition(y, (window, window)).view(b, -1, window * window, c)
        time_token = self.norm1(self.time_proj(temb))[:, None, None, :].expand(-1, windows.shape[1], 1, -1)
        tokens = torch.cat([windows, time_token.to(windows.dtype)], dim=2)
        mask = shifted_window_mask(h, w, window, shift, x.device)
        attended = self.attn(tokens, mask)[:, :, :-1]  # drop the time token's output
        y = window_reverse(attended.reshape(-1, window, window, c), (window, window), h, w)
        if shift:
            y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchExpand(nn.Module):
    """Swin-UNet's patch expanding (Cao et al. 2022): linear to ``scale**2 * out_dim`` channels, pixel shuffle, norm.

    Args:
        dim: Input width.
        out_dim: Output width.
        scale: Upsampling factor (2 between levels, 4 for the final expansion to pixels).
    """

    def __init__(self, dim: int, out_dim: int, scale: int) -> None:
        super().__init__()
        self.scale = scale
        self.expand = nn.Linear(dim, scale * scale * out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, H, W, dim) -> (B, scale * H, scale * W, out_dim)``."""
        y = F.pixel_shuffle(self.expand(x).permute(0, 3, 1, 2), self.scale)
        return self.norm(y.permute(0, 2, 3, 1))


class SwinStage(nn.Module):
    """``depth`` Swin blocks of one level, alternating regular and shifted windows."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        drop_paths: list[float],
        time_embed_dim: int,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinTimeBlock(dim, num_heads, window_size, i % 2 == 1, mlp_ratio, drop_paths[i], time_embed_dim)
            for i in range(depth)
        )

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        """``(B, H, W, C) -> (B, H, W, C)``."""
        for block in self.blocks:
            x = block(x, temb)
        return x


class SwinUNetDenoiser(ModelMixin, ConfigMixin):
    """Swin-UNet with a time token predicting epsilon and a learned-range variance (ArtiFusion's denoiser).

    Args:
        sample_size: Tile side the network is built for (documentation and export; other sizes work when every
            level's token map is divisible by the window or fits in one window).
        in_channels: Image channels (3 for RGB).
        out_channels: Output channels; ``None`` = ``2 * in_channels`` (epsilon and variance interpolation ``v``).
        patch_size: Side of the patch embedding (pixels per token at the first level).
        embed_dim: Token width of the first level; level ``i`` has ``embed_dim * 2**i``.
        depths: Swin blocks per encoder level; the decoder mirrors them (the last level is the bottleneck).
        num_heads: Attention heads per level.
        window_size: Attention window side (tokens).
        mlp_ratio: MLP hidden width relative to the token width.
        drop_path_rate: Largest stochastic-depth rate (linear from 0 over the encoder, mirrored in the decoder).
        time_freq_dim: Width of the sinusoidal timestep embedding.
        time_embed_dim: Width of the time MLP's output, projected per block to that block's width.

    Raises:
        ValueError: Inconsistent depths/heads, or non-positive sizes.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 256,
        in_channels: int = 3,
        out_channels: int | None = None,
        patch_size: int = 4,
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 2, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window_size: int = 8,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
        time_freq_dim: int = 128,
        time_embed_dim: int = 512,
    ) -> None:
        super().__init__()
        depths, num_heads = tuple(depths), tuple(num_heads)
        if len(depths) != len(num_heads) or not depths:
            raise ValueError(f"depths {depths} and num_heads {num_heads} must be non-empty and of equal length")
        if min(depths) < 1 or min(num_heads) < 1:
            raise ValueError(f"depths {depths} and num_heads {num_heads} must be positive")
        for name, value in (
            ("sample_size", sample_size),
            ("in_channels", in_channels),
            ("patch_size", patch_size),
            ("embed_dim", embed_dim),
            ("window_size", window_size),
        ):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        out_channels = 2 * in_channels if out_channels is None else out_channels
        levels = len(depths)
        dims = [embed_dim * 2**i for i in range(levels)]
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        starts = [sum(depths[:i]) for i in range(levels)]

        def stage(i: int) -> SwinStage:
            return SwinStage(
                dims[i],
                depths[i],
                num_heads[i],
                window_size,
                mlp_ratio,
                rates[starts[i] : starts[i] + depths[i]],
                time_embed_dim,
            )

        # Timestep -> sinusoidal (time_freq_dim) -> Linear, SiLU, Linear (time_embed_dim), shared by every block.
        self.time_proj = Timesteps(time_freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(time_freq_dim, time_embed_dim)
        self.patch_embed = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.patch_norm = nn.LayerNorm(embed_dim)
        self.encoder = nn.ModuleList(stage(i) for i in range(levels))
        self.merges = nn.ModuleList(PatchMerging(dims[i]) for i in range(levels - 1))
        self.bottleneck_norm = nn.LayerNorm(dims[-1])
        # Decoder level i (from levels - 2 down to 0): expand from level i + 1, fuse the skip, run a stage.
        self.expands = nn.ModuleList(PatchExpand(dims[i + 1], dims[i], 2) for i in range(levels - 1))
        self.fuse = nn.ModuleList(nn.Linear(2 * dims[i], dims[i]) for i in range(levels - 1))
        self.decoder = nn.ModuleList(stage(i) for i in range(levels - 1))
        self.out_norm = nn.LayerNorm(embed_dim)
        self.final_expand = PatchExpand(embed_dim, embed_dim, patch_size)
        self.out = nn.Conv2d(embed_dim, out_channels, kernel_size=1, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """Swin's initialisation: truncated normal (std 0.02) linear weights, zero biases, unit LayerNorms."""
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def _check_input(self, sample: Tensor) -> None:
        if sample.ndim != 4 or sample.shape[1] != self.config.in_channels:
            raise ValueError(f"sample must be (B, {self.config.in_channels}, H, W), got {tuple(sample.shape)}")
        unit = self.config.patch_size * 2 ** (len(self.config.depths) - 1)
        if sample.shape[-2] % unit or sample.shape[-1] % unit:
            raise ValueError(
                f"H and W must be multiples of patch_size * 2**(levels - 1) = {unit}, got {tuple(sample.shape[-2:])}"
            )

    def forward(
        self, sample: Tensor, timestep: Tensor | int | float, return_dict: bool = True
    ) -> UNet2DOutput | tuple[Tensor]:
        """Predict epsilon and the variance interpolation of a noisy image.

        Args:
            sample: ``(B, in_channels, H, W)`` noisy image ``x_t`` (pixels in ``[-1, 1]`` scale).
            timestep: Training timestep(s): an int, a 0-dim tensor or a ``(B,)`` tensor.
            return_dict: Return a ``UNet2DOutput`` (like diffusers' ``UNet2DModel``) rather than a tuple.

        Returns:
            ``.sample`` of shape ``(B, out_channels, H, W)``: channels ``[:in_channels]`` are epsilon, the rest the
            learned-range variance interpolation ``v`` (``frac = (v + 1) / 2``).

        Raises:
            ValueError: Wrong channel count, a size the levels cannot halve, or a timestep batch mismatch.
        """
        self._check_input(sample)
        timestep = torch.as_tensor(timestep, device=sample.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(sample.shape[0])
        if timestep.shape != (sample.shape[0],):
            raise ValueError(f"timestep must be a scalar or ({sample.shape[0]},), got {tuple(timestep.shape)}")
        temb = self.time_embedding(self.time_proj(timestep).to(dtype=self.patch_embed.weight.dtype))

        x = self.patch_norm(self.patch_embed(sample).permute(0, 2, 3, 1))  # (B, H/p, W/p, C)
        skips = []
        for i, stage in enumerate(self.encoder):
            x = stage(x, temb)
            if i < len(self.merges):
                skips.append(x)
                x = self.merges[i](x)
        x = self.bottleneck_norm(x)
        for i in reversed(range(len(self.decoder))):
            x = self.fuse[i](torch.cat([self.expands[i](x), skips[i]], dim=-1))
            x = self.decoder[i](x, temb)
        x = self.final_expand(self.out_norm(x)).permute(0, 3, 1, 2)
        out = self.out(x)
        return UNet2DOutput(sample=out) if return_dict else (out,)


def build_swin_unet(size: SwinSize = "paper", **overrides: Any) -> SwinUNetDenoiser:
    """Build a randomly initialised :class:`SwinUNetDenoiser` from a preset.

    Args:
        size: ``"paper"`` (ArtiFusion: embed 96, depths 2-2-2-2, heads 3-6-12-24, window 8, 256x256; 29.67 M
            parameters), ``"cpu"`` (3 levels of width 48, 256x256) or ``"tiny"`` (embed 24, depths 1-1, window 4,
            64x64; tests).
        **overrides: Any :class:`SwinUNetDenoiser` argument, e.g. ``sample_size=32``.

    Returns:
        The denoiser, mapping ``(B, 3, H, W)`` and ``(B,)`` timesteps to ``.sample`` ``(B, 6, H, W)``.

    Raises:
        ValueError: Unknown ``size``.
    """
    if size not in _SWIN_PRESETS:
        raise ValueError(f"unknown Swin-UNet size {size!r}; expected one of {sorted(_SWIN_PRESETS)}")
    return SwinUNetDenoiser(**{**_SWIN_PRESETS[size], **overrides})


def build_pixel_unet(size: Literal["paper", "cpu", "tiny"] = "cpu", *, sample_size: int | None = None) -> UNet2DModel:
    """A convolutional pixel-space denoiser (3 -> 6 channels), the ablation of the Swin-UNet.

    The ``UNet2DModel`` presets of :func:`denoisers.build_unet` (the latent network's shapes) with 3 input channels
    and 6 outputs (epsilon and the learned-range variance interpolation).

    Args:
        size: ``"paper"``, ``"cpu"`` or ``"tiny"`` (see :func:`denoisers.build_unet`).
        sample_size: Tile side; default 256 for ``paper``/``cpu`` and 64 for ``tiny``.

    Returns:
        A ``UNet2DModel`` mapping ``(B, 3, S, S)`` to ``.sample`` ``(B, 6, S, S)``.
    """
    if sample_size is None:
        sample_size = 64 if size == "tiny" else 256
    return build_unet(size, sample_size=sample_size, in_channels=3, out_channels=6)


__all__ = ["SwinUNetDenoiser", "build_pixel_unet", "build_swin_unet", "relative_position_index", "shifted_window_mask"]
