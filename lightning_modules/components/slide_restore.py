"""Restore the masked tiles of a slide and blend them back into the slide without seams.

1. :func:`plan_tiles` keeps the grid tiles whose mask window holds artifact pixels and flags (does not restore) those
   whose artifact fraction exceeds ``max_fraction``; restorable tiles are cut into fixed batches in tile order.
2. :func:`read_tiles` + :func:`restore_tiles` restore one batch. Its generator is seeded from ``(seed, first tile
   index)`` and batches are fixed by the plan, so the pixels do not depend on how many processes share the work or
   on which batches a resumed run still had to do.
3. :class:`SlideAssembler` composes any window of the output: outside the mask the input's pixels, exactly; inside,
   the restored tiles covering the pixel averaged with raised-cosine weights that fall from 1 to 0 across each
   overlap with a neighbour (the two weights of an overlap sum to 1), so content changes smoothly across tile
   borders. It also counts artifact / synthetic pixels, the Dice against a truth mask, and seam-band errors.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from datamodules.datasets import to_mask_tensor, to_tensor, to_uint8
from datamodules.slides import TileGrid
from lightning_modules.components.restorer import takes_sampler


@dataclass(frozen=True)
class TilePlan:
    """Which grid tiles are restored, flagged or left alone.

    Attributes:
        grid: The tile grid.
        restore: Indices of the tiles to restore, ascending.
        flagged: Indices of tiles with more artifact than allowed (left as the input).
        fractions: Artifact fraction of every tile whose window touches the mask.
        batch_size: Tiles per restoration batch.
    """

    grid: TileGrid
    restore: tuple[int, ...]
    flagged: tuple[int, ...]
    fractions: dict[int, float]
    batch_size: int

    def batches(self) -> list[tuple[int, ...]]:
        """The restorable tiles in fixed consecutive batches of ``batch_size``."""
        r, b = self.restore, self.batch_size
        return [r[i : i + b] for i in range(0, len(r), b)]


def plan_tiles(grid: TileGrid, mask, max_fraction: float, batch_size: int) -> TilePlan:
    """Classify every tile of ``grid`` by the artifact fraction of its ``mask`` window.

    Args:
        grid: Tile grid over the working level.
        mask: Object with ``maybe_any(x, y, w, h)`` and ``window(x, y, w, h) -> bool (h, w)``.
        max_fraction: Tiles with a larger artifact fraction are flagged, not restored.
        batch_size: Tiles per batch.
    """
    restore, flagged, fractions = [], [], {}
    for i in range(len(grid)):
        box = grid.box(i)
        if not mask.maybe_any(*box):
            continue
        frac = float(mask.window(*box).mean())
        if frac == 0.0:
            continue
        fractions[i] = frac
        (flagged if frac > max_fraction else restore).append(i)
    return TilePlan(grid, tuple(restore), tuple(flagged), fractions, batch_size)


def batch_seed(seed: int, first_index: int) -> int:
    """Seed of the batch whose first tile is ``first_index`` (independent streams via SeedSequence)."""
    return int(np.random.SeedSequence([seed, first_index]).generate_state(1, dtype=np.uint64)[0]) >> 1


def read_tiles(source, mask, grid: TileGrid, indices: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Read a batch of tiles and their masks; tiles smaller than ``grid.tile`` (tiny slides) are reflect-padded.

    Returns:
        ``{"image": float (B, 3, T, T) in [-1, 1], "mask": float (B, 1, T, T) in {0, 1}, "index": long (B,)}``.
    """
    t = grid.tile
    images, masks = [], []
    for i in indices:
        x, y, w, h = grid.box(i)
        rgb, m = source.read_region(x, y, w, h), mask.window(x, y, w, h)
        if (h, w) != (t, t):
            mode = "reflect" if min(h, w) > 1 else "edge"
            rgb = np.pad(rgb, ((0, t - h), (0, t - w), (0, 0)), mode=mode)
            m = np.pad(m, ((0, t - h), (0, t - w)))
        images.append(to_tensor(rgb))
        masks.append(to_mask_tensor(m))
    return {"image": torch.stack(images), "mask": torch.stack(masks), "index": torch.tensor(indices)}


def restorer_device(restorer) -> torch.device:
    """Device of a restorer's parameters (CPU for classical methods)."""
    if isinstance(restorer, torch.nn.Module):
        param = next(restorer.parameters(), None)
        if param is not None:
            return param.device
    return torch.device("cpu")


def restore_tiles(restorer, batch: dict[str, torch.Tensor], seed: int, overrides: dict | None = None) -> np.ndarray:
    """Restore one batch from :func:`read_tiles`.

    Args:
        restorer: Any :class:`~lightning_modules.components.restorer.Restorer`.
        batch: Output of :func:`read_tiles` (possibly moved to a device).
        seed: Run seed; the batch generator is ``batch_seed(seed, batch["index"][0])``.
        overrides: Sampler overrides (``num_steps``...) for restorers that take them (``takes_sampler``); ignored
            by others.

    Returns:
        uint8 (B, T, T, 3) restored tiles.
    """
    device = restorer_device(restorer)
    generator = torch.Generator(device=device).manual_seed(batch_seed(seed, int(batch["index"][0])))
    kwargs = (overrides or {}) if takes_sampler(restorer) else {}
    out = restorer.restore(batch["image"], batch["mask"], generator=generator, **kwargs)
    return to_uint8(out)


def _raised_cosine(n: int, lead: int, trail: int) -> np.ndarray:
    """Float (n,) weights: 1 inside, rising over the first ``lead`` and falling over the last ``trail`` pixels."""
    w = np.ones(n)
    for length, sl in ((lead, slice(0, lead)), (trail, slice(n - trail, n))):
        if length:
            ramp = 0.5 - 0.5 * np.cos(math.pi * (np.arange(length) + 0.5) / length)
            w[sl] = np.minimum(w[sl], ramp if sl.start == 0 else ramp[::-1])
    return w


def tile_weights(grid: TileGrid, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Separable blend weights (wy (h,), wx (w,)) of tile ``index``; ramps only where a neighbour overlaps."""
    _, _, w, h = grid.box(index)
    left, right, top, bottom = grid.ramps(index)
    return _raised_cosine(h, top, bottom), _raised_cosine(w, left, right)


def seam_bands(grid: TileGrid, band: int) -> tuple[np.ndarray, np.ndarray]:
    """Bool (H,) rows and (W,) columns within ``band`` px of an internal tile border (either edge of an overlap)."""
    out = []
    for starts, length in ((grid.ys, grid.shape[0]), (grid.xs, grid.shape[1])):
        edges = [s for s in starts[1:]] + [s + grid.tile for s in starts[:-1]]
        centre = np.arange(length) + 0.5
        near = np.zeros(length, bool)
        for e in edges:
            near |= np.abs(centre - e) < band
        out.append(near)
    return out[0], out[1]


def _edge_starts(grid: TileGrid) -> tuple[np.ndarray, np.ndarray]:
    """Bool (H,) and (W,): True at index j when a tile border lies between pixels j - 1 and j."""
    out = []
    for starts, length in ((grid.ys, grid.shape[0]), (grid.xs, grid.shape[1])):
        edge = np.zeros(length, bool)
        for e in [s for s in starts[1:]] + [s + grid.tile for s in starts[:-1]]:
            if 0 < e < length:
                edge[e] = True
        out.append(edge)
    return out[0], out[1]


@dataclass
class _Error:
    """Running squared error (uint8 units) over some pixels."""

    sse: float = 0.0
    n: int = 0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        d = a.astype(np.float64) - b.astype(np.float64)
        self.sse, self.n = self.sse + float((d * d).sum()), self.n + d.size

    def psnr(self) -> float | None:
        if not self.n:
            return None
        mse = self.sse / self.n
        return float("inf") if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


@dataclass
class AssemblyStats:
    """What :class:`SlideAssembler` counted while composing the output."""

    artifact_px: int = 0
    synthetic_px: int = 0
    dice_inter: int = 0
    dice_truth_px: int = 0
    steps: dict[str, list[float]] = field(default_factory=lambda: {"border": [0.0, 0], "inner": [0.0, 0]})
    errors: dict[str, _Error] = field(
        default_factory=lambda: {
            k: _Error()
            for k in (
                "input_artifact",
                "output_artifact",
                "output_band",
                "output_interior",
                "input_band",
                "input_interior",
            )
        }
    )

    def dice(self) -> float:
        """Dice of the used mask against the truth mask (1 when both are empty)."""
        total = self.artifact_px + self.dice_truth_px
        return 2 * self.dice_inter / total if total else 1.0

    def seam_step_ratio(self) -> float | None:
        """Mean |difference| of neighbouring synthetic pixels straddling a tile border over the same elsewhere.

        About 1 when restored content is continuous across tile borders; well above 1 when borders show as steps.
        Needs no truth image. None when no synthetic pixel pair straddles a border.
        """
        (b, nb), (i, ni) = self.steps["border"], self.steps["inner"]
        return None if not nb or not ni or i == 0 else (b / nb) / (i / ni)

    def truth_report(self) -> dict:
        """PSNR (dB, against the truth image) per region for the input and the output, and the region sizes."""
        out = {f"psnr_{k}": v.psnr() for k, v in self.errors.items()}
        out["pixels_band"] = self.errors["output_band"].n // 3
        out["pixels_interior"] = self.errors["output_interior"].n // 3
        return out


class SlideAssembler:
    """Composes windows of the restored working level from the input slide and the stored tiles.

    Args:
        source: The input slide (``read_region``).
        mask: The artifact mask used (``window``).
        plan: The tile plan; every tile in ``plan.restore`` must be readable through ``read_tile``.
        read_tile: ``index -> uint8 (h, w, 3)`` restored tile (the tile store's ``read``).
        truth_mask: Optional mask to compute the Dice of ``mask`` against.
        truth: Optional clean slide on the same grid (``read_region``) for PSNR and the seam-band metric.
        seam_band: Half-width in pixels of the band around internal tile borders.
        mask_scale: Power-of-two reduction of the provenance mask collected in ``mask_rows``.
        cache_tiles: Decoded tiles kept in memory (an LRU).
    """

    def __init__(
        self,
        source,
        mask,
        plan: TilePlan,
        read_tile: Callable[[int], np.ndarray],
        *,
        truth_mask=None,
        truth=None,
        seam_band: int = 8,
        mask_scale: int = 1,
        cache_tiles: int = 256,
    ) -> None:
        self.source, self.mask, self.plan, self.grid = source, mask, plan, plan.grid
        self.restored = frozenset(plan.restore)
        self.read_tile = lru_cache(maxsize=cache_tiles)(read_tile)
        self.truth_mask, self.truth = truth_mask, truth
        self.band_rows, self.band_cols = seam_bands(self.grid, seam_band)
        self.edge_rows, self.edge_cols = _edge_starts(self.grid)
        self._prev: tuple[np.ndarray, np.ndarray] | None = None  # last row (rgb, synthetic) of the previous strip
        self.mask_scale = mask_scale
        self.mask_rows: list[np.ndarray] = []
        self.stats = AssemblyStats()

    def compose(self, x: int, y: int, w: int, h: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Output pixels of one window.

        Returns:
            uint8 (h, w, 3) input RGB, uint8 (h, w, 3) output RGB (the input outside ``synthetic``), bool (h, w)
            synthetic (restored) pixels, bool (h, w) artifact mask.
        """
        rgb = self.source.read_region(x, y, w, h)
        artifact = self.mask.window(x, y, w, h)
        synthetic = np.zeros((h, w), bool)
        if not artifact.any():
            return rgb, rgb, synthetic, artifact
        acc, wsum = np.zeros((h, w, 3)), np.zeros((h, w))
        for i in self.grid.overlapping(x, y, x + w, y + h):
            if i not in self.restored:
                continue
            tx, ty, tw, th = self.grid.box(i)
            x0, y0, x1, y1 = max(x, tx), max(y, ty), min(x + w, tx + tw), min(y + h, ty + th)
            wy, wx = tile_weights(self.grid, i)
            weight = wy[y0 - ty : y1 - ty, None] * wx[None, x0 - tx : x1 - tx]
            tile = self.read_tile(i)[y0 - ty : y1 - ty, x0 - tx : x1 - tx]
            acc[y0 - y : y1 - y, x0 - x : x1 - x] += weight[..., None] * tile
            wsum[y0 - y : y1 - y, x0 - x : x1 - x] += weight
        synthetic = artifact & (wsum > 0)
        out = rgb.copy()
        out[synthetic] = np.clip(np.round(acc[synthetic] / wsum[synthetic, None]), 0, 255).astype(np.uint8)
        return rgb, out, synthetic, artifact

    def _measure(
        self,
        x: int,
        y: int,
        w: int,
        h: int,
        inp: np.ndarray,
        out: np.ndarray,
        synthetic: np.ndarray,
        artifact: np.ndarray,
    ) -> None:
        s = self.stats
        s.artifact_px += int(artifact.sum())
        s.synthetic_px += int(synthetic.sum())
        if self.truth_mask is not None:
            t = self.truth_mask.window(x, y, w, h)
            s.dice_inter += int((t & artifact).sum())
            s.dice_truth_px += int(t.sum())
        if self.truth is not None and artifact.any():
            clean = self.truth.read_region(x, y, w, h)
            s.errors["input_artifact"].add(inp[artifact], clean[artifact])
            s.errors["output_artifact"].add(out[artifact], clean[artifact])
            band = (self.band_rows[y : y + h, None] | self.band_cols[None, x : x + w]) & synthetic
            inner = synthetic & ~band
            for name, region in (("band", band), ("interior", inner)):
                s.errors[f"output_{name}"].add(out[region], clean[region])
                s.errors[f"input_{name}"].add(inp[region], clean[region])

    def strip(self, y0: int, y1: int, *, step: int = 256) -> np.ndarray:
        """uint8 (y1 - y0, W, 3) rows of the output, composed ``step`` columns at a time; updates the stats.

        Strips must be requested top to bottom, each starting at a multiple of ``mask_scale``.
        """
        width = self.grid.shape[1]
        rows, syn_rows = np.empty((y1 - y0, width, 3), np.uint8), np.zeros((y1 - y0, width), bool)
        for x0 in range(0, width, step):
            w = min(step, width - x0)
            inp, out, synthetic, artifact = self.compose(x0, y0, w, y1 - y0)
            self._measure(x0, y0, w, y1 - y0, inp, out, synthetic, artifact)
            rows[:, x0 : x0 + w], syn_rows[:, x0 : x0 + w] = out, synthetic
        self._steps(y0, rows, syn_rows)
        s = self.mask_scale
        if s > 1:
            hh, ww = -(-syn_rows.shape[0] // s) * s, -(-width // s) * s
            padded = np.zeros((hh, ww), bool)
            padded[: syn_rows.shape[0], :width] = syn_rows
            syn_rows = padded.reshape(hh // s, s, ww // s, s).any(axis=(1, 3))
        self.mask_rows.append(syn_rows)
        return rows

    def _steps(self, y0: int, rows: np.ndarray, syn: np.ndarray) -> None:
        """Accumulate neighbour differences across tile borders vs elsewhere (both pixels synthetic)."""
        if self._prev is not None:
            first = y0 - 1
            rows_ext, syn_ext = np.concatenate([self._prev[0], rows]), np.concatenate([self._prev[1], syn])
        else:
            rows_ext, syn_ext, first = rows, syn, y0
        self._prev = (rows[-1:], syn[-1:])
        img = rows_ext.astype(np.int16)
        pairs = (  # (absolute differences, both-synthetic mask, is-border mask) for vertical and horizontal pairs
            (np.abs(img[:, 1:] - img[:, :-1]).mean(-1), syn_ext[:, 1:] & syn_ext[:, :-1], self.edge_cols[None, 1:]),
            (
                np.abs(img[1:] - img[:-1]).mean(-1),
                syn_ext[1:] & syn_ext[:-1],
                self.edge_rows[first + 1 : first + rows_ext.shape[0], None],
            ),
        )
        for diff, both, border in pairs:
            border = np.broadcast_to(border, both.shape)
            for key, sel in (("border", both & border), ("inner", both & ~border)):
                self.stats.steps[key][0] += float(diff[sel].sum())
                self.stats.steps[key][1] += int(sel.sum())

    def provenance_mask(self) -> np.ndarray:
        """Bool synthetic-pixel mask collected so far (at ``1 / mask_scale``), rows stacked."""
        return np.concatenate(self.mask_rows) if self.mask_rows else np.zeros((0, 0), bool)
