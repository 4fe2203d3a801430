"""Regional (mask-restricted) reverse diffusion for artifact restoration, in latent or pixel space.

Two presets (see ``docs``/docs/METHOD.md sections 3-4):

``repaint`` (default, textbook)
    Max-pooled latent mask. Start ``x_T = m * noise + (1 - m) * q(z0, T)``; at every step the model's
    ``x_{t-1}`` is kept inside the mask and the known region is re-noised to the matching level,
    ``q(z0, t_prev)``, with fresh noise (RePaint, Lugmayr et al. 2022, Algorithm 1, lines 4-8). Optional RePaint
    resampling (jump length ``j``, ``n`` samples), partial strength (SDEdit, Meng et al. 2022: start from
    ``q(z0, t_start)`` everywhere) and a pixel paste-back that keeps every clean pixel bit-exact.
``reference`` (the authors' code as it behaves)
    Nearest (top-left) latent mask, start ``x_T = z0`` without noise, 50 DDPM steps with "leading" spacing
    (981, 961, ..., 1 for 1000 training steps), the known region overwritten with the CLEAN ``z0`` after every
    step, decode, global colour match, no paste-back.

The sampler takes the denoiser as an argument (``denoiser(x_t, t) -> model output``) and never imports Lightning.
Latent space (``4 x 32 x 32`` from a VAE) and pixel space (``3 x 256 x 256``, the ArtiFusion baseline) use the same
code; only ``restore``'s ``encode``/``decode``/``factor`` differ.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import Tensor

from lightning_modules.components.conditioning import condition_denoiser
from lightning_modules.components.crop import Window, group_by_size, plan_windows
from lightning_modules.components.masks import check_mask, to_latent_mask
from lightning_modules.components.masks import feather as feather_mask

log = logging.getLogger(__name__)

Denoiser = Callable[[Tensor, Tensor], Tensor]
StepCallback = Callable[[int, int, Tensor], None]

_PRESETS: dict[str, dict[str, Any]] = {
    "repaint": dict(
        mask_mode="maxpool",
        known="renoise",
        start="noise",
        paste_back=True,
        color_match=False,
        timestep_spacing="trailing",
        steps_offset=None,
    ),
    "reference": dict(
        mask_mode="nearest",
        known="clean",
        start="z0",
        paste_back=False,
        color_match=True,
        timestep_spacing="leading",
        steps_offset=1,
    ),
}
_CHOICES: dict[str, tuple[Any, ...]] = {
    "preset": tuple(_PRESETS),
    "mask_mode": ("maxpool", "nearest"),
    "known": ("renoise", "clean"),
    "start": ("noise", "z0"),
    "timestep_spacing": (None, "leading", "trailing", "linspace"),
    "decode": ("full", "delta", "od-delta", "adaptive"),
    "autoencoder": ("full", "tiny", "tiny-decoder"),
}
# Schedulers whose ``step`` is stateless, so RePaint's jumps may revisit timesteps.
_JUMP_SAFE = (DDPMScheduler, DDIMScheduler)


@dataclass
class SamplerConfig:
    """Settings of :class:`RegionalSampler` (defaults = the ``repaint`` preset).

    Attributes:
        preset: name of the preset these settings started from (``"repaint"`` or ``"reference"``).
        num_steps: inference steps of the scheduler's ``set_timesteps`` (before ``strength``).
        strength: in ``(0, 1]``; below 1 only the last ``int(num_steps * strength)`` steps run, starting from
            ``q(z0, t_start)`` everywhere (SDEdit).
        mask_mode: latent mask downsampling, ``"maxpool"`` (any artifact pixel) or ``"nearest"`` (top-left pixel).
        mask_dilate: dilate the latent mask by this many cells.
        jump_length: RePaint resampling jump length ``j`` (0 = no resampling).
        jump_n_sample: RePaint ``r``: each jump segment is run this many times in total (1 = no resampling).
        known: known-region update after each step, ``"renoise"`` (``q(z0, t_prev)``) or ``"clean"`` (``z0``).
        start: ``"noise"`` (``x_T`` = noise in the mask, ``q(z0, T)`` outside) or ``"z0"`` (``x_T = z0``).
        paste_back: in ``restore``, keep every pixel outside the pixel mask from the input.
        feather: seam width in pixels for the paste-back; grows into the artifact side only.
        color_match: in ``restore``, match the decoded image's global mean/std to the input's clean region.
        eta: DDIM's eta (0 = deterministic); ignored by other schedulers.
        timestep_spacing: override the scheduler's ``timestep_spacing`` (None = keep it); the repaint preset uses
            ``"trailing"`` so the first step is t = T - 1 (pure noise), as Lin et al. 2024 recommend.
        steps_offset: override the scheduler's ``steps_offset`` (None = keep it).
        decode: how the sampled latent becomes the pixels pasted into the mask (see :func:`decode_latents`):
            ``"full"`` (the decoded restoration), ``"delta"`` (the corrupted tile plus the decoded change,
            ``x + D(z) - D(z0)``), ``"od-delta"`` (the same change added in optical density, i.e. multiplied in
            transmitted light: Beer-Lambert, the physics of stains and inks) or ``"adaptive"`` (``"delta"`` where
            the artifact lets light through, ``"full"`` where it absorbs it).
        refine: in a pipeline that holds a pixel refiner (``components/refiner.py``), run it on the pasted-back
            restoration (False = the latent stage alone, e.g. to ablate the refiner); ignored elsewhere.
        crop: in ``RestorationPipeline.restore``, encode, sample and decode only a window around each tile's mask
            and paste it back (``components/crop.py``, docs/METHOD.md section 11). Tiles with an empty mask are
            returned unchanged without a model call. Ignored without ``paste_back`` (the ``reference`` preset), whose
            output outside the mask is the VAE's reconstruction of the whole tile.
        crop_margin: pixels of context around the mask's bounding box in the crop window (before rounding the
            window's sides up to the pipeline's unit).
        crop_max_fraction: in ``(0, 1]``; a crop window covering more of the tile than this restores the whole tile.
        crop_decode: in ``restore``, decode only a window of the sampled latent around each tile's mask (bounding
            box + ``crop_margin``, on the latent grid; :func:`decode_windows`); encoder
            and denoiser still see the whole tile. For denoisers whose downsampling makes ``crop`` fall back to the
            whole tile (the paper UNet needs 256 px windows), this is the part of the VAE work that can be cut.
            Ignored without ``paste_back``.
        autoencoder: in ``RestorationPipeline.restore``, which autoencoder encodes and decodes: ``"full"`` (the
            pipeline's VAE), ``"tiny"`` (its distilled tiny autoencoder, ``components/tiny_autoencoder.py``) or
            ``"tiny-decoder"`` (the VAE's encoder, the tiny decoder). The tiny modes need a pipeline that holds one.
    """

    preset: Literal["repaint", "reference"] = "repaint"
    num_steps: int = 50
    strength: float = 1.0
    mask_mode: Literal["maxpool", "nearest"] = "maxpool"
    mask_dilate: int = 0
    jump_length: int = 0
    jump_n_sample: int = 1
    known: Literal["renoise", "clean"] = "renoise"
    start: Literal["noise", "z0"] = "noise"
    paste_back: bool = True
    feather: int = 0
    color_match: bool = False
    eta: float = 0.0
    timestep_spacing: Literal["leading", "trailing", "linspace"] | None = "trailing"
    steps_offset: int | None = None
    decode: Literal["full", "delta", "od-delta", "adaptive"] = "full"
    refine: bool = True
    crop: bool = False
    crop_margin: int = 32
    crop_max_fraction: float = 0.6
    crop_decode: bool = False
    autoencoder: Literal["full", "tiny", "tiny-decoder"] = "full"

    def __post_init__(self) -> None:
        for key, choices in _CHOICES.items():
            if getattr(self, key) not in choices:
                raise ValueError(f"unknown {key} {getattr(self, key)!r}; expected one of {choices}")
        for key, low in (
            ("num_steps", 1),
            ("mask_dilate", 0),
            ("jump_length", 0),
            ("jump_n_sample", 1),
            ("feather", 0),
            ("crop_margin", 0),
        ):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{key} must be an int >= {low}, got {value!r}")
        if not (isinstance(self.strength, int | float) and 0.0 < self.strength <= 1.0):
            raise ValueError(f"strength must be in (0, 1], got {self.strength!r}")
        if int(self.num_steps * self.strength) < 1:
            raise ValueError(f"strength {self.strength} with num_steps {self.num_steps} runs no step")
        for key in ("refine", "crop", "crop_decode"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be true or false, got {getattr(self, key)!r}")
        fraction = self.crop_max_fraction
        if isinstance(fraction, bool) or not (isinstance(fraction, int | float) and 0.0 < fraction <= 1.0):
            raise ValueError(f"crop_max_fraction must be in (0, 1], got {fraction!r}")
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta!r}")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> SamplerConfig:
        """Settings of a named preset, with field overrides.

        Raises:
            ValueError: unknown preset name or override key.
        """
        if name not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {tuple(_PRESETS)}")
        return cls.from_dict({**_PRESETS[name], "preset": name, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SamplerConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown SamplerConfig key(s) {unknown}")
        return cls(**dict(data))


def resample_schedule(num_steps: int, jump_length: int = 0, jump_n_sample: int = 1) -> list[int]:
    """Sequence of levels visited by RePaint's jump schedule (Lugmayr et al. 2022, Sec. 4.2 / Algorithm 1).

    Level ``k`` means "after ``k`` reverse steps" (0 = start ``x_T``, ``num_steps`` = clean). A +1 transition is
    one reverse (model) step, a ``-jump_length`` transition a forward jump ``q(x_{t+j} | x_t)``. Jumps back happen
    at levels ``num_steps, num_steps - j, ...`` that are greater than ``j``, each ``jump_n_sample - 1`` times
    (the same points as RePaint's published time schedule), so the number of model calls is
    ``num_steps + len(jump levels) * (jump_n_sample - 1) * jump_length``: 250 + 24 * 9 * 10 = 2410 for the paper's
    250 steps, j = 10, r = 10.

    Args:
        num_steps: reverse steps actually run.
        jump_length: ``j``; 0 disables resampling.
        jump_n_sample: ``r``; 1 disables resampling.

    Returns:
        Levels, starting at 0 and ending at ``num_steps``.
    """
    remaining = {}
    if jump_length > 0 and jump_n_sample > 1:
        remaining = {lvl: jump_n_sample - 1 for lvl in range(num_steps, jump_length, -jump_length)}
    levels, level = [0], 0
    while level < num_steps:
        level += 1
        levels.append(level)
        if remaining.get(level, 0) > 0:
            remaining[level] -= 1
            level -= jump_length
            levels.append(level)
    return levels


def _count_model_steps(levels: list[int]) -> int:
    """Number of reverse (+1) transitions in a level sequence from :func:`resample_schedule`."""
    return sum(b == a + 1 for a, b in zip(levels, levels[1:], strict=False))


def _randn(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like ``like``, drawn on the generator's device, returned on ``like``'s."""
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


class RegionalSampler:
    """Mask-restricted reverse diffusion driven by a diffusers scheduler (``set_timesteps``, ``step``, ``add_noise``).

    Tested with ``DDPMScheduler``, ``DDIMScheduler`` and ``DPMSolverMultistepScheduler`` (dpmsolver++). Every call
    builds a fresh scheduler from the given one's config (plus the preset's spacing overrides), so multistep solver
    state never leaks between calls and the caller's scheduler is never modified.

    Attributes:
        config: the :class:`SamplerConfig`.
        nfe: network evaluations (denoiser calls) of the last :meth:`sample` call; one call covers the whole batch.
    """

    def __init__(self, scheduler: Any, config: SamplerConfig | None = None) -> None:
        """Store the scheduler's class and a copy of its config.

        Args:
            scheduler: a diffusers scheduler (only its class and ``.config`` are used).
            config: sampler settings; default ``SamplerConfig()`` (the ``repaint`` preset).

        Raises:
            ValueError: the scheduler lacks the needed methods, or resampling is requested with a multistep solver.
        """
        for attr in ("set_timesteps", "step", "add_noise", "config"):
            if not hasattr(scheduler, attr):
                raise ValueError(f"scheduler {type(scheduler).__name__} has no {attr!r}")
        self.config = config if config is not None else SamplerConfig()
        self._scheduler_cls = type(scheduler)
        self._scheduler_config = dict(scheduler.config)
        self.nfe = 0
        if self.resampling and not issubclass(self._scheduler_cls, _JUMP_SAFE):
            raise ValueError(
                f"RePaint resampling (jump_length={self.config.jump_length}, jump_n_sample="
                f"{self.config.jump_n_sample}) needs a stateless single-step scheduler (DDPM, DDIM); "
                f"{self._scheduler_cls.__name__} keeps multistep state"
            )

    @property
    def resampling(self) -> bool:
        """Whether RePaint jumps are enabled."""
        return self.config.jump_length > 0 and self.config.jump_n_sample > 1

    def make_scheduler(self, device: torch.device | str | None = None) -> Any:
        """A fresh scheduler with ``set_timesteps(num_steps)`` applied (spacing overrides of the config included)."""
        overrides = {k: getattr(self.config, k) for k in ("timestep_spacing", "steps_offset")}
        scheduler = self._scheduler_cls.from_config(
            self._scheduler_config, **{k: v for k, v in overrides.items() if v is not None}
        )
        scheduler.set_timesteps(self.config.num_steps, device=device)
        return scheduler

    def timesteps(self) -> list[int]:
        """Timesteps the reverse chain runs through, after ``strength`` truncation (first = ``t_start``)."""
        full = [int(t) for t in self.make_scheduler().timesteps]
        return full[len(full) - int(len(full) * self.config.strength) :]

    def expected_nfe(self) -> int:
        """Denoiser calls one :meth:`sample` call will make (counting jumps), without running it."""
        return _count_model_steps(
            resample_schedule(len(self.timesteps()), self.config.jump_length, self.config.jump_n_sample)
        )

    def _validate(self, z_known: Tensor, mask: Tensor) -> None:
        if not isinstance(z_known, Tensor) or z_known.ndim != 4:
            raise ValueError(f"z_known must be a (B, C, h, w) tensor, got {getattr(z_known, 'shape', z_known)!r}")
        check_mask(mask)
        b, _, h, w = z_known.shape
        if mask.shape[0] not in (1, b) or mask.shape[-2:] != (h, w):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match z_known {tuple(z_known.shape)}")

    def _epsilon(self, output: Tensor, x: Tensor, scheduler: Any) -> Tensor:
        """Model output for ``step``, (B, C, h, w) or (B, 2C, h, w).

        A 2C-channel (learned-variance) output keeps its variance half only for a DDPM scheduler configured with a
        learned variance type; otherwise the first C channels are the epsilon.
        """
        channels = x.shape[1]
        if output.shape[0] != x.shape[0] or output.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"denoiser output shape {tuple(output.shape)} does not match x_t {tuple(x.shape)}")
        if output.shape[1] == channels:
            return output
        if output.shape[1] == 2 * channels:
            learned = getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range")
            return output if isinstance(scheduler, DDPMScheduler) and learned else output[:, :channels]
        raise ValueError(f"denoiser returned {output.shape[1]} channels; expected {channels} or {2 * channels}")

    def _known(self, scheduler: Any, z0: Tensor, t: int | None, generator: torch.Generator | None) -> Tensor:
        """Known-region content at noise level ``t`` (None = clean): RePaint Alg. 1 line 5, ``q(z0, t)``."""
        if t is None or self.config.known == "clean":
            return z0
        t_batch = torch.full((z0.shape[0],), t, dtype=torch.long, device=z0.device)
        return scheduler.add_noise(z0, _randn(z0, generator), t_batch)

    @torch.no_grad()
    def sample(
        self,
        denoiser: Denoiser,
        z_known: Tensor,
        mask: Tensor,
        *,
        generator: torch.Generator | None = None,
        progress: bool = False,
        callback: StepCallback | None = None,
    ) -> Tensor:
        """Regenerate the masked region of ``z_known``.

        Args:
            denoiser: ``denoiser(x_t, t) -> output``; ``x_t`` ``(B, C, h, w)``, ``t`` a ``(B,)`` long tensor of
                training timesteps; output ``(B, C, h, w)`` in the scheduler's ``prediction_type`` (epsilon for
                this project), or ``(B, 2C, h, w)`` with a learned variance (see :meth:`_epsilon`).
            z_known: ``(B, C, h, w)`` float: the (scaled) latent of the corrupted image, or the image itself in
                pixel space (``[-1, 1]``).
            mask: ``(B, 1, h, w)`` (or ``(1, 1, h, w)``) float in ``{0, 1}`` at ``z_known``'s resolution,
                1 = regenerate.
            generator: seeds every random draw (start noise, re-noising, DDPM step noise, jumps); the same seed
                gives bitwise identical outputs on CPU.
            progress: show a tqdm bar.
            callback: ``callback(step, t, x)`` after each reverse step with the blended ``x_{t_prev}``; ``step``
                counts reverse steps of this call (jumps included), ``t`` is the timestep just denoised.

        Returns:
            ``(B, C, h, w)`` tensor, same dtype/device as ``z_known``; equal to ``z_known`` outside the mask.

        Raises:
            ValueError: bad shapes, a non-binary mask, or a denoiser output of the wrong shape.
        """
        self._validate(z_known, mask)
        cfg = self.config
        scheduler = self.make_scheduler(device=z_known.device)
        full = scheduler.timesteps
        timesteps = [int(t) for t in full[len(full) - int(len(full) * cfg.strength) :]]
        levels = resample_schedule(len(timesteps), cfg.jump_length, cfg.jump_n_sample)
        regen = mask.to(device=z_known.device).bool()
        z0 = z_known
        step_kwargs = {}
        params = inspect.signature(scheduler.step).parameters
        if "generator" in params:
            step_kwargs["generator"] = generator
        if "eta" in params:
            step_kwargs["eta"] = cfg.eta
        alphas_cumprod = scheduler.alphas_cumprod.to(device=z0.device, dtype=torch.float64)

        # Start state. repaint: x_T = m * noise + (1 - m) * q(z0, T); strength < 1: q(z0, t_start) everywhere
        # (SDEdit); reference: x_T = z0.
        t0 = timesteps[0]
        if cfg.start == "z0":
            x = z0.clone()
        else:
            noise = _randn(z0, generator)
            if len(timesteps) == len(full):
                x_in = noise * scheduler.init_noise_sigma
                x_out = self._known(scheduler, z0, t0, generator)
            else:
                t_batch = torch.full((z0.shape[0],), t0, dtype=torch.long, device=z0.device)
                x_in = scheduler.add_noise(z0, noise, t_batch)
                x_out = x_in if cfg.known == "renoise" else z0
            x = torch.where(regen, x_in, x_out)
        log.debug(
            "regional sampling: preset=%s scheduler=%s timesteps=%d..%d nfe=%d",
            cfg.preset,
            type(scheduler).__name__,
            timesteps[0],
            timesteps[-1],
            _count_model_steps(levels),
        )

        self.nfe = 0
        transitions = list(zip(levels, levels[1:], strict=False))
        if progress:
            from tqdm.auto import tqdm

            transitions = tqdm(transitions, desc="regional sampling")
        for level, nxt in transitions:
            if nxt == level + 1:
                # Reverse step (RePaint Alg. 1 lines 6-8): unknown part from the model, known part from q(z0, t_prev).
                t = timesteps[level]
                t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
                output = denoiser(scheduler.scale_model_input(x, t), t_batch)
                self.nfe += 1
                x_unknown = scheduler.step(self._epsilon(output, x, scheduler), t, x, **step_kwargs).prev_sample
                t_prev = timesteps[nxt] if nxt < len(timesteps) else None
                x = torch.where(regen, x_unknown, self._known(scheduler, z0, t_prev, generator))
                if callback is not None:
                    callback(self.nfe - 1, t, x)
            else:
                # Forward jump (RePaint Alg. 1 line 10, over j steps): x_t' ~ N(sqrt(a'/a) x_t, (1 - a'/a) I) with
                # a = alpha_bar of the current level (1 when clean) and a' = alpha_bar of the level jumped back to.
                clean = level == len(timesteps)
                a_from = alphas_cumprod.new_tensor(1.0) if clean else alphas_cumprod[timesteps[level]]
                ratio = alphas_cumprod[timesteps[nxt]] / a_from
                x = (ratio.sqrt() * x + (1 - ratio).sqrt() * _randn(x, generator)).to(z0.dtype)
        return x


def composite(restored_px: Tensor, original_px: Tensor, artifact_mask_px: Tensor, feather: int = 0) -> Tensor:
    """Paste the restored image into the original inside the artifact mask only.

    The optional feathered seam is placed INSIDE the artifact region (see :func:`masks.feather`): boundary artifact
    pixels get a ``1 / (feather + 1)`` share of the restoration, pixels ``feather + 1`` deep get all of it. Choosing
    the inward side means every pixel outside the mask is copied unchanged (bit-exact clean tissue), at the cost of
    letting a thin rim of the artifact bleed into the blend.

    Args:
        restored_px: ``(B, 3, H, W)`` float in ``[-1, 1]``.
        original_px: ``(B, 3, H, W)`` float in ``[-1, 1]`` (the corrupted input).
        artifact_mask_px: ``(B, 1, H, W)`` binary float, 1 = artifact.
        feather: seam width in pixels (non-negative int).

    Returns:
        ``(B, 3, H, W)`` tensor; bitwise equal to ``original_px`` wherever the mask is 0.

    Raises:
        ValueError: mismatched shapes or a non-binary mask.
    """
    check_mask(artifact_mask_px, "artifact_mask_px")
    if restored_px.shape != original_px.shape or artifact_mask_px.shape[-2:] != original_px.shape[-2:]:
        raise ValueError(
            f"shape mismatch: restored {tuple(restored_px.shape)}, original {tuple(original_px.shape)}, "
            f"mask {tuple(artifact_mask_px.shape)}"
        )
    weight = feather_mask(artifact_mask_px, feather).to(original_px.dtype)
    blended = weight * restored_px + (1 - weight) * original_px
    return torch.where(artifact_mask_px.bool(), blended, original_px)


def match_color(decoded: Tensor, reference: Tensor, known_mask: Tensor, eps: float = 1e-6) -> Tensor:
    """The authors' global colour match: scalar mean/std of the whole decoded image set to the reference's.

    Per image, the target mean and standard deviation are pooled over all channels and the pixels where
    ``known_mask`` is 1 (the clean region of the corrupted input); the source statistics are pooled over the whole
    decoded image; ``out = (decoded - mean_d) / std_d * std_r + mean_r``. Images without a known pixel are
    returned unchanged.

    Args:
        decoded: ``(B, C, H, W)`` float, e.g. the VAE decode in ``[-1, 1]``.
        reference: ``(B, C, H, W)`` float on the same scale (the corrupted input).
        known_mask: ``(B, 1, H, W)`` binary float, **1 = known/clean** (i.e. ``1 - artifact_mask``).
        eps: floor on the decoded standard deviation.

    Returns:
        ``(B, C, H, W)`` tensor, same dtype as ``decoded`` (not clamped).
    """
    check_mask(known_mask, "known_mask")
    if decoded.shape != reference.shape or known_mask.shape[-2:] != decoded.shape[-2:]:
        raise ValueError(
            f"shape mismatch: decoded {tuple(decoded.shape)}, reference {tuple(reference.shape)}, "
            f"known_mask {tuple(known_mask.shape)}"
        )
    weight = known_mask.to(reference.dtype).expand_as(reference)
    count = weight.sum(dim=(1, 2, 3), keepdim=True)
    safe = count.clamp_min(1)
    mean_r = (reference * weight).sum(dim=(1, 2, 3), keepdim=True) / safe
    std_r = (((reference - mean_r) ** 2 * weight).sum(dim=(1, 2, 3), keepdim=True) / safe).sqrt()
    mean_d = decoded.mean(dim=(1, 2, 3), keepdim=True)
    std_d = decoded.std(dim=(1, 2, 3), keepdim=True, unbiased=False).clamp_min(eps)
    matched = (decoded - mean_d) / std_d * std_r + mean_r
    return torch.where(count > 0, matched, decoded)


def _optical_density(x: Tensor) -> Tensor:
    """``[-1, 1]`` images -> optical density ``-ln((I + 1) / 256)`` of the 0-255 intensities (finite at I = 0)."""
    return -torch.log(((x.float() + 1) * 127.5 + 1) / 256)


def _from_optical_density(od: Tensor) -> Tensor:
    """Inverse of :func:`_optical_density`, clamped to ``[-1, 1]``."""
    return ((256 * torch.exp(-od) - 1) / 127.5 - 1).clamp(-1, 1)


ADAPTIVE_TRANSMISSION = (0.4, 0.7)
"""Transmission below which ``decode="adaptive"`` takes the full decode, and above which it takes the delta."""
ADAPTIVE_SIGMA = 2.0
"""Gaussian smoothing (px) of the transmission estimate: a property of the artifact layer, not of single pixels."""


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``(B, C, H, W)`` with reflect padding."""
    radius = max(1, int(3 * sigma))
    kernel = torch.exp(-(torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device) ** 2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    x = torch.nn.functional.pad(x, (radius,) * 4, mode="reflect")
    x = torch.nn.functional.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return torch.nn.functional.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def transmission(reconstructed: Tensor, restored: Tensor, sigma: float = ADAPTIVE_SIGMA) -> Tensor:
    """Estimated share of light the artifact lets through, per pixel: ``(B, 1, H, W)``.

    Beer-Lambert: under an absorbing layer the observed intensity is the tissue's times the layer's transmission, so
    ``D(z0) / D(z)`` (the decoded input over the decoded restoration, on the 0-255 scale plus one) estimates it in
    each channel; the smallest channel ratio, Gaussian-smoothed, is the layer's. Values above 1 (a bubble brightens)
    mean nothing is absorbed.
    """
    ratio = ((reconstructed.float() + 1) * 127.5 + 1) / ((restored.float() + 1) * 127.5 + 1)
    return _gaussian_blur(ratio.amin(dim=1, keepdim=True), sigma)


def decode_latents(
    decode: Callable[[Tensor], Tensor], z: Tensor, z0: Tensor, corrupted_px: Tensor, mode: str = "full"
) -> Tensor:
    """Turn sampled latents into the pixels that are pasted into the artifact mask.

    ``"full"`` decodes ``z``: every masked pixel is the autoencoder's rendering, so its reconstruction error caps the
    result. ``"delta"`` and ``"od-delta"`` decode the *change* instead: ``x + D(z) - D(z0)`` (in intensity) or
    ``exp(ln x + ln D(z) - ln D(z0))`` (additive in optical density, i.e. a multiplicative correction, the way
    absorbing stains and inks combine by the Beer-Lambert law). Where the change is smooth (a colour cast, a blur,
    a bubble's shading) the input's fine texture survives instead of being redrawn by the decoder, and the decoder's
    error on ``x`` largely cancels between ``D(z)`` and ``D(z0)`` (docs/METHOD.md section 9). Under an absorbing
    layer (marker ink, a thread) the input's residual ``x - D(z0)`` is the layer's own grain and only a fraction of
    the tissue's texture, so ``"adaptive"`` blends ``w * delta + (1 - w) * full`` with ``w`` rising linearly from 0
    to 1 as the estimated :func:`transmission` rises from 0.4 to 0.7 (:data:`ADAPTIVE_TRANSMISSION`).

    Args:
        decode: ``z -> (B, 3, H, W)`` images in ``[-1, 1]``.
        z: Restored latents ``(B, C, h, w)``.
        z0: Latents of the corrupted input ``(B, C, h, w)`` (only decoded for the delta modes; one batched call).
        corrupted_px: The corrupted input ``(B, 3, H, W)`` in ``[-1, 1]``.
        mode: ``"full"``, ``"delta"``, ``"od-delta"`` or ``"adaptive"``.

    Returns:
        ``(B, 3, H, W)``: in ``[-1, 1]`` for the delta modes; ``"full"`` returns the decoder's output unclamped.

    Raises:
        ValueError: For an unknown ``mode``.
    """
    if mode == "full":
        return decode(z).to(corrupted_px.dtype)
    if mode not in _CHOICES["decode"]:
        raise ValueError(f"unknown decode mode {mode!r}; expected one of {_CHOICES['decode']}")
    restored, reconstructed = decode(torch.cat([z, z0])).to(corrupted_px.dtype).chunk(2)
    if mode == "od-delta":
        od = _optical_density(corrupted_px) + _optical_density(restored) - _optical_density(reconstructed)
        return _from_optical_density(od).to(corrupted_px.dtype)
    delta = (corrupted_px + restored - reconstructed).clamp(-1, 1)
    if mode == "delta":
        return delta
    low, high = ADAPTIVE_TRANSMISSION
    weight = ((transmission(reconstructed, restored) - low) / (high - low)).clamp(0, 1).to(corrupted_px.dtype)
    return weight * delta + (1 - weight) * restored.clamp(-1, 1)


def decode_windows(
    decode: Callable[[Tensor], Tensor],
    z: Tensor,
    z0: Tensor,
    corrupted_px: Tensor,
    artifact_mask_px: Tensor,
    config: SamplerConfig,
    factor: int,
) -> Tensor:
    """:func:`decode_latents` (and the colour match) on a window around each tile's mask only.

    Each window is the mask's bounding box grown by ``config.crop_margin`` px and snapped to the latent grid
    (``components/crop.py``; the whole tile above ``crop_max_fraction``); tiles with equal window sizes are decoded
    in one call on ``(b, C, h / factor, w / factor)`` latent windows, so a tile's pixels do not depend on which
    tiles share its batch (``experiments.restore`` orders a folder so that equal sizes share batches). Pixels
    outside the windows are the input's (the paste-back keeps them anyway); tiles with an empty mask are not
    decoded. The decoder's receptive field makes a window's pixels near its border differ from the whole tile's
    decode, which the margin keeps away from the mask (docs/METHOD.md section 11 measures the difference).

    Args:
        decode: ``z -> (B, 3, H, W)`` images in ``[-1, 1]``.
        z: Restored latents ``(B, C, H / factor, W / factor)``.
        z0: Latents of the corrupted input, same shape.
        corrupted_px: ``(B, 3, H, W)`` in ``[-1, 1]``.
        artifact_mask_px: ``(B, 1, H, W)`` in ``{0, 1}``.
        config: Supplies ``crop_margin``, ``crop_max_fraction``, ``decode`` and ``color_match``.
        factor: Pixels per latent cell.

    Returns:
        ``(B, 3, H, W)``: the decoded windows inside them, the input elsewhere (not clamped, like ``"full"``).
    """
    windows = plan_windows(
        artifact_mask_px, margin=config.crop_margin, unit=factor, factor=factor, max_fraction=config.crop_max_fraction
    )
    out = corrupted_px.clone()

    def cells(w: Window, t: Tensor) -> Tensor:
        return t[..., w.top // factor : (w.top + w.height) // factor, w.left // factor : (w.left + w.width) // factor]

    for group in group_by_size(windows):
        x = torch.stack([windows[i].crop(corrupted_px[i]) for i in group])
        decoded = decode_latents(
            decode,
            torch.stack([cells(windows[i], z[i]) for i in group]),
            torch.stack([cells(windows[i], z0[i]) for i in group]),
            x,
            config.decode,
        )
        if config.color_match:
            keep = 1 - torch.stack([windows[i].crop(artifact_mask_px[i]) for i in group])
            decoded = match_color(decoded, x, keep)
        for i, tile in zip(group, decoded, strict=True):
            windows[i].crop(out[i]).copy_(tile.to(out.dtype))
    return out


def restore(
    encode: Callable[[Tensor], Tensor],
    decode: Callable[[Tensor], Tensor],
    sampler: RegionalSampler,
    denoiser: Denoiser,
    corrupted_px: Tensor,
    artifact_mask_px: Tensor,
    *,
    factor: int,
    generator: torch.Generator | None = None,
    conditional: bool = False,
    residual: bool = False,
) -> Tensor:
    """Full regional restoration: encode -> latent mask -> sample -> decode -> colour match -> paste-back.

    Args:
        encode: ``x (B, 3, H, W) in [-1, 1] -> z (B, C, H / factor, W / factor)`` (scaling included); identity
            in pixel space.
        decode: inverse of ``encode``, returning ``(B, 3, H, W)`` roughly in ``[-1, 1]``.
        sampler: the configured :class:`RegionalSampler` (its config picks mask mode, decode mode, colour match,
            paste-back).
        denoiser: ``denoiser(z_t, t) -> model output`` (see :meth:`RegionalSampler.sample`); with ``conditional``,
            ``denoiser(cat[z_t, latent_mask, z0], t)`` (see ``components/conditioning.py``).
        corrupted_px: ``(B, 3, H, W)`` float in ``[-1, 1]``.
        artifact_mask_px: ``(B, 1, H, W)`` binary float, 1 = artifact.
        factor: the autoencoder's downsampling factor (8 for kl-f8; 1 in pixel space).
        generator: seeds the sampler.
        conditional: the denoiser is a mask-conditioned restorer that also takes the corrupted latent and the mask.
        residual: the denoiser generates the change ``z - z0`` (0 outside the mask) rather than ``z`` itself; the
            sampler then holds the known region at 0 and the result is ``z0 + change``.

    Returns:
        ``(B, 3, H, W)`` float in ``[-1, 1]``. The decoded image is clamped before the paste-back, so with
        ``paste_back`` every pixel outside the mask equals ``corrupted_px`` bit for bit.
    """
    check_mask(artifact_mask_px, "artifact_mask_px")
    if (
        corrupted_px.ndim != 4
        or artifact_mask_px.shape[0] != corrupted_px.shape[0]
        or (artifact_mask_px.shape[-2:] != corrupted_px.shape[-2:])
    ):
        raise ValueError(
            f"artifact_mask_px {tuple(artifact_mask_px.shape)} does not match corrupted_px {tuple(corrupted_px.shape)}"
        )
    cfg = sampler.config
    z0 = encode(corrupted_px)
    latent_mask = to_latent_mask(artifact_mask_px, factor, cfg.mask_mode, cfg.mask_dilate).to(z0.dtype)
    if residual and not conditional:
        raise ValueError("residual sampling needs a conditional denoiser (it only sees the change, not the input)")
    if conditional:
        denoiser = condition_denoiser(denoiser, latent_mask, z0)
    if residual:
        z = z0 + sampler.sample(denoiser, torch.zeros_like(z0), latent_mask, generator=generator)
    else:
        z = sampler.sample(denoiser, z0, latent_mask, generator=generator)
    if cfg.crop_decode and cfg.paste_back:
        restored = decode_windows(decode, z, z0, corrupted_px, artifact_mask_px, cfg, factor)
    else:
        restored = decode_latents(decode, z, z0, corrupted_px, cfg.decode)
        if cfg.color_match:
            restored = match_color(restored, corrupted_px, 1 - artifact_mask_px)
    restored = restored.clamp(-1, 1)
    if cfg.paste_back:
        restored = composite(restored, corrupted_px, artifact_mask_px, cfg.feather)
    return restored


__all__ = [
    "RegionalSampler",
    "SamplerConfig",
    "composite",
    "decode_latents",
    "decode_windows",
    "transmission",
    "match_color",
    "resample_schedule",
    "restore",
]
