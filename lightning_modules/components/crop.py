"""Crop-only VAE passes: restore a window around each tile's artifact mask instead of the whole tile.

With paste-back every pixel outside the artifact mask is copied from the input, so encoding and decoding the clean
tissue far from the mask is wasted work. :func:`plan_windows` picks one window per tile: the mask's bounding box,
grown by ``margin`` pixels on every side (context for the VAE and the denoiser), its sides rounded up to a multiple
of ``unit`` (the VAE factor times the denoiser's total downsampling, so the latent UNet can halve the window's
latent as often as it needs), its corners on the VAE's 8-pixel latent grid (so the window's latent cells are the
full tile's cells), centred on the grown box and clamped to the tile. A window covering more than ``max_fraction``
of the tile becomes the whole tile; a tile with an empty mask gets no window. :func:`restore_windows` restores the
windows in groups of equal size (one batched call per group) and pastes them back into the input.

The window's restoration is not the full tile's restoration cut out: GroupNorm statistics and self-attention span
the whole input of every network, so the context changes the result a little even far from the window's border.
docs/METHOD.md section 11 measures how much (artifact-region PSNR, demo evaluation sets).

No ``lightning`` import here: this is a pure torch component.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

RestoreFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Window:
    """A rectangle of a tile, in pixels: rows ``top:top + height``, columns ``left:left + width``."""

    top: int
    left: int
    height: int
    width: int

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)``."""
        return self.height, self.width

    @property
    def area(self) -> int:
        """Pixels covered."""
        return self.height * self.width

    def crop(self, x: Tensor) -> Tensor:
        """The window of ``(..., H, W)`` tensors."""
        return x[..., self.top : self.top + self.height, self.left : self.left + self.width]


def _span(lo: int, hi: int, size: int, margin: int, unit: int, factor: int) -> tuple[int, int]:
    """``(start, length)`` of one axis of a window around the mask's extent ``[lo, hi)`` on an axis of ``size`` px.

    The grown extent is snapped outward to the ``factor`` grid, its length rounded up to a multiple of ``unit`` (the
    whole axis when that exceeds it), and the result centred on the grown extent (start on the ``factor`` grid) and
    shifted inside ``[0, size)``.
    """
    lo = max(0, lo - margin) // factor * factor
    hi = min(size, -(-(hi + margin) // factor) * factor)
    length = -(-(hi - lo) // unit) * unit
    if length >= size:
        return 0, size
    start = lo - (length - (hi - lo)) // 2 // factor * factor
    return min(max(0, start), size - length), length


def mask_window(mask: Tensor, *, margin: int, unit: int, factor: int, max_fraction: float) -> Window | None:
    """The window to restore for one tile's artifact mask.

    Args:
        mask: ``(H, W)`` or ``(1, H, W)`` in ``{0, 1}`` (or bool), 1 = artifact; ``H`` and ``W`` multiples of
            ``factor``.
        margin: Pixels of context added on every side of the mask's bounding box (>= 0).
        unit: Window sides are multiples of this (VAE factor times the denoiser's downsampling), unless a side is
            the whole tile side.
        factor: Window corners lie on this grid (the VAE factor; 1 in pixel space).
        max_fraction: A window covering more than this share of the tile becomes the whole tile.

    Returns:
        The window, the whole tile (fallback), or None for an empty mask.

    Raises:
        ValueError: Bad ``margin``, ``unit``, ``factor`` or ``max_fraction``, or a tile side not a multiple of
            ``factor``.
    """
    if margin < 0 or unit < 1 or factor < 1 or unit % factor or not 0 < max_fraction <= 1:
        raise ValueError(
            f"bad window settings: margin {margin}, unit {unit}, factor {factor}, max_fraction "
            f"{max_fraction} (need margin >= 0, unit a multiple of factor, 0 < max_fraction <= 1)"
        )
    mask = mask.reshape(mask.shape[-2:]).bool()
    height, width = mask.shape
    if height % factor or width % factor:
        raise ValueError(f"tile {height}x{width} is not a multiple of the factor {factor}")
    rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
    if rows.numel() == 0:
        return None
    top, h = _span(int(rows[0]), int(rows[-1]) + 1, height, margin, unit, factor)
    left, w = _span(int(cols[0]), int(cols[-1]) + 1, width, margin, unit, factor)
    if h * w > max_fraction * height * width:
        return Window(0, 0, height, width)
    return Window(top, left, h, w)


def plan_windows(masks: Tensor, *, margin: int, unit: int, factor: int, max_fraction: float) -> list[Window | None]:
    """:func:`mask_window` of every tile of a ``(B, 1, H, W)`` mask batch (None = empty mask)."""
    return [mask_window(m, margin=margin, unit=unit, factor=factor, max_fraction=max_fraction) for m in masks]


def group_by_size(windows: list[Window | None]) -> list[list[int]]:
    """Indices of the tiles with a window, grouped by window size, groups in order of first appearance."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, window in enumerate(windows):
        if window is not None:
            groups.setdefault(window.size, []).append(i)
    return list(groups.values())


def restore_windows(restore_fn: RestoreFn, corrupted: Tensor, mask: Tensor, windows: list[Window | None]) -> Tensor:
    """Restore each tile's window and paste it back into the tile; tiles without a window are returned as they are.

    Args:
        restore_fn: ``(corrupted (b, 3, h, w), mask (b, 1, h, w)) -> restored (b, 3, h, w)``, e.g.
            ``regional_sampler.restore`` with its models bound; called once per group of equal-size windows, in
            :func:`group_by_size` order (so a shared random generator is used in a fixed order).
        corrupted: ``(B, 3, H, W)`` in ``[-1, 1]``.
        mask: ``(B, 1, H, W)`` in ``{0, 1}``, 1 = artifact.
        windows: One window (or None) per tile, from :func:`plan_windows`.

    Returns:
        ``(B, 3, H, W)``: the input outside the windows (bit-exact), the restored windows inside them. When every
        tile's window is the whole tile this is ``restore_fn(corrupted, mask)`` itself.
    """
    if len(windows) != corrupted.shape[0]:
        raise ValueError(f"{len(windows)} windows for {corrupted.shape[0]} tiles")
    groups = group_by_size(windows)
    full = corrupted.shape[-2:]
    if len(groups) == 1 and len(groups[0]) == len(windows) and windows[0].size == tuple(full):
        return restore_fn(corrupted, mask)
    out = corrupted.clone()
    for group in groups:
        x = torch.stack([windows[i].crop(corrupted[i]) for i in group])
        m = torch.stack([windows[i].crop(mask[i]) for i in group])
        restored = restore_fn(x, m).to(out.dtype)
        for i, tile in zip(group, restored, strict=True):
            windows[i].crop(out[i]).copy_(tile)
    return out


__all__ = ["Window", "group_by_size", "mask_window", "plan_windows", "restore_windows"]
