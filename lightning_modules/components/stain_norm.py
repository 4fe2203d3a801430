"""Differentiable sRGB <-> CIE Lab conversion and the learnable Lab stain-normalisation layer of the classifier study.

The downstream classifier of LatentArtiFusion (docs/METHOD.md section 8) puts a learnable Lab stain normalisation in
front of the CNN: every image's per-channel Lab mean and standard deviation are standardised and mapped onto learnable
target statistics initialised to mean (54, 24, -21) and std (22, 8, 9), a Reinhard-style normalisation whose
targets are trained with the network.

Colour maths (sRGB, D65 white, 2-degree observer; the same constants as ``skimage.color.rgb2lab``):

- sRGB gamma: ``lin = c / 12.92`` for ``c <= 0.04045`` else ``((c + 0.055) / 1.055) ** 2.4`` (and the inverse);
- linear RGB -> XYZ with the sRGB primaries matrix, divided by the D65 white point;
- ``f(t) = t ** (1/3)`` above ``(6/29) ** 3`` else ``t * 841/108 + 4/29``; ``L = 116 f(Y) - 16``,
  ``a = 500 (f(X) - f(Y))``, ``b = 200 (f(Y) - f(Z))``.

Powers are evaluated on clamped inputs inside ``torch.where`` so gradients stay finite at 0. Pure torch, no Lightning.
"""

import torch
from torch import Tensor, nn

_XYZ_FROM_RGB = torch.tensor(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]],
    dtype=torch.float64,
)
_RGB_FROM_XYZ = torch.linalg.inv(_XYZ_FROM_RGB)
_WHITE_D65 = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)
_DELTA = 6.0 / 29.0
PAPER_LAB_MEAN = (54.0, 24.0, -21.0)
PAPER_LAB_STD = (22.0, 8.0, 9.0)


def _channel_matmul(matrix: Tensor, x: Tensor) -> Tensor:
    """Apply a (3, 3) matrix to the channel axis of (B, 3, H, W)."""
    return torch.einsum("ij,bjhw->bihw", matrix.to(dtype=x.dtype, device=x.device), x)


def _check_images(x: Tensor, what: str) -> None:
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{what} must be (B, 3, H, W), got {tuple(x.shape)}")


def srgb_to_linear(c: Tensor) -> Tensor:
    """sRGB-encoded values in [0, 1] -> linear light (same shape)."""
    high = ((c.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4
    return torch.where(c > 0.04045, high, c / 12.92)


def linear_to_srgb(c: Tensor) -> Tensor:
    """Linear light -> sRGB-encoded values (same shape; not clamped)."""
    high = 1.055 * c.clamp_min(0.0031308) ** (1.0 / 2.4) - 0.055
    return torch.where(c > 0.0031308, high, c * 12.92)


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """SRGB to CIE Lab (D65).

    Args:
        rgb: float (B, 3, H, W) sRGB in [0, 1].

    Returns:
        float (B, 3, H, W): L in [0, 100], a and b roughly in [-128, 127].
    """
    _check_images(rgb, "rgb")
    xyz = _channel_matmul(_XYZ_FROM_RGB, srgb_to_linear(rgb))
    t = xyz / _WHITE_D65.to(dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    f = torch.where(t > _DELTA**3, t.clamp_min(_DELTA**3) ** (1.0 / 3.0), t / (3 * _DELTA**2) + 4.0 / 29.0)
    fx, fy, fz = f.unbind(1)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)


def lab_to_rgb(lab: Tensor) -> Tensor:
    """CIE Lab (D65) to sRGB; colours outside the sRGB gamut come back outside [0, 1] (clamp if needed).

    Args:
        lab: float (B, 3, H, W) Lab.

    Returns:
        float (B, 3, H, W) sRGB, in [0, 1] for in-gamut colours.
    """
    _check_images(lab, "lab")
    light, a, b = lab.unbind(1)
    fy = (light + 16.0) / 116.0
    f = torch.stack([fy + a / 500.0, fy, fy - b / 200.0], dim=1)
    t = torch.where(f > _DELTA, f**3, 3 * _DELTA**2 * (f - 4.0 / 29.0))
    xyz = t * _WHITE_D65.to(dtype=lab.dtype, device=lab.device).view(1, 3, 1, 1)
    return linear_to_srgb(_channel_matmul(_RGB_FROM_XYZ, xyz))


class InputNormalize(nn.Module):
    """Map suite images in [-1, 1] to the backbone's input normalisation ``(rgb01 - mean) / std``.

    Args:
        mean: Per-channel mean of the backbone's pretraining normalisation (RGB, [0, 1] scale).
        std: Per-channel standard deviation of that normalisation.
    """

    def __init__(self, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def normalize01(self, rgb01: Tensor) -> Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> backbone-normalised (B, 3, H, W)."""
        return (rgb01 - self.mean) / self.std

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) RGB in [-1, 1] -> backbone-normalised (B, 3, H, W)."""
        _check_images(x, "input")
        return self.normalize01((x + 1.0) / 2.0)


class LabStainNorm(InputNormalize):
    """Learnable per-image Lab standardisation in front of a classifier.

    For every image and Lab channel ``c``: ``lab'_c = (lab_c - mu_c) / s_c * target_std_c + target_mean_c`` with
    ``mu_c`` the image's mean and ``s_c = sqrt(var_c + eps)`` its (floored) standard deviation over all pixels. The
    result goes back to sRGB, is clamped to [0, 1] and normalised for the backbone. ``eps`` (Lab units squared) keeps
    flat images (a white glass tile has a, b std near 0) from being amplified into noise. The targets are learnable;
    the standard deviation is stored as its logarithm so it stays positive under any optimiser step.

    Args:
        target_mean: Initial Lab target mean (the paper's (54, 24, -21)).
        target_std: Initial Lab target standard deviation (the paper's (22, 8, 9)), all > 0.
        mean: Backbone input mean (RGB, [0, 1] scale), as :class:`InputNormalize`.
        std: Backbone input standard deviation.
        eps: Variance floor in Lab units squared.
        learnable: Train the targets (False freezes them: plain Reinhard normalisation).
    """

    def __init__(
        self,
        target_mean=PAPER_LAB_MEAN,
        target_std=PAPER_LAB_STD,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        eps: float = 1.0,
        learnable: bool = True,
    ) -> None:
        super().__init__(mean, std)
        target_std = torch.as_tensor(target_std, dtype=torch.float32)
        if target_std.shape != (3,) or torch.any(target_std <= 0):
            raise ValueError(f"target_std must be 3 positive numbers, got {target_std.tolist()}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.eps = float(eps)
        self.target_mean = nn.Parameter(torch.as_tensor(target_mean, dtype=torch.float32).clone(), learnable)
        self.log_target_std = nn.Parameter(target_std.log(), learnable)

    @property
    def target_std(self) -> Tensor:
        """(3,) learnable Lab target standard deviation."""
        return self.log_target_std.exp()

    @torch.no_grad()
    def set_targets(self, mean: Tensor, std: Tensor) -> None:
        """Overwrite the targets with (3,) Lab mean and (3,) positive std (e.g. a reference image's statistics)."""
        self.target_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.log_target_std.copy_(torch.as_tensor(std, dtype=torch.float32).log())

    def image_stats(self, lab: Tensor) -> tuple[Tensor, Tensor]:
        """Per-image Lab statistics used by the layer.

        Args:
            lab: (B, 3, H, W) Lab.

        Returns:
            ``(mu, s)``, each (B, 3, 1, 1): mean and ``sqrt(var + eps)`` (population variance) per channel.
        """
        mu = lab.mean(dim=(2, 3), keepdim=True)
        var = lab.var(dim=(2, 3), keepdim=True, unbiased=False)
        return mu, (var + self.eps).sqrt()

    def normalize_lab(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) RGB in [-1, 1] -> stain-normalised RGB in [0, 1] (before the backbone normalisation)."""
        _check_images(x, "input")
        dtype = x.dtype
        with torch.autocast(device_type=x.device.type, enabled=False):  # colour maths in float32 under AMP
            lab = rgb_to_lab(((x.float() + 1.0) / 2.0).clamp(0.0, 1.0))
            mu, s = self.image_stats(lab)
            lab = (lab - mu) / s * self.target_std.view(1, 3, 1, 1) + self.target_mean.view(1, 3, 1, 1)
            rgb = lab_to_rgb(lab).clamp(0.0, 1.0)
        return rgb.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) RGB in [-1, 1] -> stain-normalised, backbone-normalised (B, 3, H, W)."""
        return self.normalize01(self.normalize_lab(x))

    def extra_repr(self) -> str:
        """Module repr details: the Lab target mean and std (rounded to 2 decimals) and ``eps``."""
        mean = [round(v, 2) for v in self.target_mean.tolist()]
        std = [round(v, 2) for v in self.target_std.tolist()]
        return f"target_mean={mean}, target_std={std}, eps={self.eps}"
