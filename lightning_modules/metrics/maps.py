"""Per-pixel similarity maps: SSIM (Wang et al. 2004) and FSIM/FSIMc (Zhang et al. 2011), batched in pure torch.

Both maps are returned *before* spatial pooling so that :mod:`lightning_modules.metrics.functional` can average them
under any region. Inputs are float images on the 0-255 scale (the constants of both indices are defined for it).

SSIM follows scikit-image's ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``:
an 11-tap Gaussian window (radius ``int(3.5 * sigma + 0.5) = 5``) and, to avoid edge effects, only the VALID part of the
map (``(win - 1) // 2`` pixels cropped from each side). We compute the valid map directly with an unpadded separable
convolution, which equals scikit-image's reflect-padded filter followed by its crop. (torchmetrics instead averages
the reflect-padded border too and differs by up to ~0.01 on H&E tiles.)

FSIM follows Zhang et al.'s ``FeatureSIM.m`` as mirrored by ``piq.fsim``: images whose shorter side exceeds 256 px are
first average-pooled by ``max(1, round(min(H, W) / 256))``; phase congruency (PC) is Kovesi's PC_2 measure from a
log-Gabor bank (4 scales x 4 orientations); gradient magnitude uses the Scharr operator. piq keeps its phase
congruency private, so it is re-implemented here from Kovesi (1999) "Image features from phase congruency", Videre
1(3); piq's *public* helpers are used for the frequency grid, YIQ conversion, Scharr gradients and the similarity
ratio so that the maps agree with ``piq.fsim`` to float precision.
"""

import functools
import math

import torch
import torch.nn.functional as F
from piq.functional import get_meshgrid, gradient_map, ifftshift, rgb2yiq, scharr_filter, similarity_map

# Zhang et al. 2011, section III: T1 (PC), T2 (gradient), T3/T4 (I/Q chrominance), lambda (chroma exponent).
FSIM_T1, FSIM_T2, FSIM_T3, FSIM_T4, FSIM_LAMBDA = 0.85, 160.0, 200.0, 200.0, 0.03


def gaussian_window(window_size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Normalised 1-D Gaussian window of odd length ``window_size`` (as scipy.ndimage builds it)."""
    half = (window_size - 1) / 2
    coords = torch.arange(window_size, dtype=dtype, device=device) - half
    g = torch.exp(-0.5 * (coords / sigma) ** 2)
    return g / g.sum()


def _band_matrix(n: int, window: torch.Tensor) -> torch.Tensor:
    """``(n, n - k + 1)`` matrix ``M`` with ``M[j + i, j] = window[i]``: ``v @ M`` is the valid 1-D correlation."""
    k = window.numel()
    offset = torch.arange(n, device=window.device)[:, None] - torch.arange(n - k + 1, device=window.device)[None, :]
    inside = (offset >= 0) & (offset < k)
    return torch.where(inside, window[offset.clamp(0, k - 1)], torch.zeros((), dtype=window.dtype))


def _valid_filter(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable filtering without padding: ``(..., H, W)`` -> ``(..., H - k + 1, W - k + 1)``.

    Written as two banded matrix products, which on CPU is ~3x faster than a float64 depthwise ``conv2d``.
    """
    rows = _band_matrix(x.shape[-2], window)
    cols = _band_matrix(x.shape[-1], window)
    return rows.T @ (x @ cols)


def ssim_map(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 255.0,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Per-pixel, per-channel SSIM over the valid window positions (Wang et al. 2004, eq. 13, population moments).

    Args:
        x: ``(B, C, H, W)`` float image (any scale; ``data_range`` must match it). float64 recommended.
        y: same shape and dtype as ``x``.
        data_range: dynamic range ``L`` of the pixel values; ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2``.
        window_size: odd Gaussian window length.
        sigma: Gaussian standard deviation in pixels.
        k1: SSIM constant K1.
        k2: SSIM constant K2.

    Returns:
        ``(B, C, H - window_size + 1, W - window_size + 1)`` SSIM map in ``[-1, 1]``, same dtype as ``x``. Map pixel
        ``(i, j)`` belongs to image pixel ``(i + p, j + p)`` with ``p = (window_size - 1) // 2``.

    Raises:
        ValueError: if the window is even or larger than the image.
    """
    if window_size % 2 != 1:
        raise ValueError(f"window_size must be odd, got {window_size}")
    if min(x.shape[-2:]) < window_size:
        raise ValueError(f"images of size {tuple(x.shape[-2:])} are smaller than the SSIM window {window_size}")
    window = gaussian_window(window_size, sigma, x.dtype, x.device)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    # One batched filtering pass over the five moments: mu_x, mu_y, E[x^2], E[y^2], E[xy].
    moments = _valid_filter(torch.cat([x, y, x * x, y * y, x * y], dim=1), window)
    mu_x, mu_y, e_xx, e_yy, e_xy = moments.chunk(5, dim=1)
    var_x = e_xx - mu_x**2
    var_y = e_yy - mu_y**2
    cov = e_xy - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return num / den


def fsim_downsample_factor(height: int, width: int) -> int:
    """FSIM's pre-pooling factor ``max(1, round(min(H, W) / 256))`` (FeatureSIM.m; piq uses it too)."""
    return max(1, round(min(height, width) / 256))


@functools.lru_cache(maxsize=8)
def _log_gabor_bank(
    height: int,
    width: int,
    scales: int,
    orientations: int,
    min_wavelength: float,
    mult: float,
    sigma_on_f: float,
    d_theta_on_sigma: float,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frequency-domain log-Gabor bank (Kovesi 1999; Field 1987) and its spatial-domain even parts.

    Returns:
        ``bank``: ``(orientations, scales, H, W)`` real transfer functions, zero frequency at ``[0, 0]``;
        ``spatial``: ``(orientations, scales, H, W)`` real parts of their inverse FFTs scaled by ``sqrt(H W)``,
        used for the noise-energy estimate. Cached per size/device/dtype; never modify in place.
    """
    row, col = get_meshgrid((height, width), device=device, dtype=dtype)
    radius = torch.sqrt(row**2 + col**2)
    theta = torch.atan2(-row, col)
    # Butterworth low-pass (cut-off 0.45, order 15) so no filter reaches the FFT corners.
    lowpass = ifftshift(1.0 / (1.0 + (radius / 0.45) ** 30))
    radius = ifftshift(radius)
    theta = ifftshift(theta)
    radius[0, 0] = 1.0  # avoid log(0); the DC term of every filter is zeroed below
    radial = []
    for s in range(scales):
        centre = 1.0 / (min_wavelength * mult**s)
        g = torch.exp(-(torch.log(radius / centre) ** 2) / (2 * math.log(sigma_on_f) ** 2)) * lowpass
        g[0, 0] = 0.0
        radial.append(g)
    theta_sigma = math.pi / orientations / d_theta_on_sigma
    angular = []
    for o in range(orientations):
        angle = o * math.pi / orientations
        # Angular distance via atan2 of sine/cosine differences (no wrap-around problem).
        d_sin = torch.sin(theta) * math.cos(angle) - torch.cos(theta) * math.sin(angle)
        d_cos = torch.cos(theta) * math.cos(angle) + torch.sin(theta) * math.sin(angle)
        angular.append(torch.exp(-(torch.atan2(d_sin, d_cos) ** 2) / (2 * theta_sigma**2)))
    bank = torch.stack(angular)[:, None] * torch.stack(radial)[None]
    spatial = torch.fft.ifft2(bank).real * math.sqrt(height * width)
    return bank, spatial


def phase_congruency(
    lum: torch.Tensor,
    scales: int = 4,
    orientations: int = 4,
    min_wavelength: float = 6.0,
    mult: float = 2.0,
    sigma_on_f: float = 0.55,
    d_theta_on_sigma: float = 1.2,
    k: float = 2.0,
) -> torch.Tensor:
    """Kovesi's phase congruency PC_2 (phasecong2, as used by FeatureSIM.m) for a batch of grey images.

    Args:
        lum: ``(B, 1, H, W)`` float grey image on the 0-255 scale.
        scales: number of log-Gabor scales.
        orientations: number of filter orientations.
        min_wavelength: wavelength of the smallest-scale filter in pixels.
        mult: wavelength ratio between successive scales.
        sigma_on_f: radial bandwidth (sigma over centre frequency).
        d_theta_on_sigma: orientation spacing over angular sigma.
        k: noise threshold in standard deviations of the noise energy.

    Returns:
        ``(B, 1, H, W)`` phase congruency in ``[0, 1]``, dtype of ``lum``.
    """
    b, _, h, w = lum.shape
    eps = torch.finfo(lum.dtype).eps
    bank, spatial = _log_gabor_bank(
        h, w, scales, orientations, min_wavelength, mult, sigma_on_f, d_theta_on_sigma, lum.device, lum.dtype
    )
    response = torch.fft.ifft2(torch.fft.fft2(lum)[:, :, None] * bank)  # (B, O, S, H, W) complex
    even, odd = response.real, response.imag
    amplitude = response.abs()
    # Weighted mean phase direction per orientation, then energy = sum_s A_s (cos dphi - |sin dphi|).
    sum_even, sum_odd = even.sum(dim=2, keepdim=True), odd.sum(dim=2, keepdim=True)
    norm = torch.sqrt(sum_even**2 + sum_odd**2) + eps
    mean_even, mean_odd = sum_even / norm, sum_odd / norm
    energy = (even * mean_even + odd * mean_odd - (even * mean_odd - odd * mean_even).abs()).sum(dim=2)
    # Noise compensation: the smallest-scale energy^2 is Rayleigh/chi^2(2) for Gaussian noise, so its median gives
    # the mean (median / ln 2); divided by the filter's mean squared value this is the noise power.
    median_e2 = (amplitude[:, :, 0] ** 2).flatten(2).median(dim=-1).values  # (B, O)
    noise_power = (median_e2 / math.log(2.0)) / (bank[:, 0] ** 2).sum(dim=(-2, -1))
    # Expected noise energy^2: sum_s A_s^2 + 2 sum_{i<j} A_i A_j, with sum_{i<j} = ((sum A)^2 - sum A^2) / 2.
    sum_a2 = (spatial**2).sum(dim=(1, 2, 3))
    sum_ai_aj = ((spatial.sum(dim=1) ** 2).sum(dim=(-2, -1)) - sum_a2) / 2
    noise_energy2 = 2 * noise_power * sum_a2 + 4 * noise_power * sum_ai_aj
    tau = torch.sqrt(noise_energy2 / 2)  # Rayleigh parameter
    threshold = (tau * math.sqrt(math.pi / 2) + k * tau * math.sqrt(2 - math.pi / 2)) / 1.7  # Kovesi's PC_2 rescale
    energy = (energy - threshold[:, :, None, None]).clamp_min(0)
    return (energy.sum(dim=1) / (amplitude.sum(dim=(1, 2)) + eps)).unsqueeze(1)


def fsim_maps(x: torch.Tensor, y: torch.Tensor, chromatic: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel FSIM similarity and its pooling weight (Zhang et al. 2011, eqs. 5-8 and 10).

    FSIM = sum(S_L * S_C^lambda * PC_m) / sum(PC_m), with ``S_L = S_PC * S_G`` and ``S_C = S_I * S_Q``.

    Args:
        x: ``(B, 3, H, W)`` RGB (or ``(B, 1, H, W)`` grey with ``chromatic=False``), float on the 0-255 scale.
        y: same shape and dtype as ``x``.
        chromatic: FSIMc (YIQ chrominance term) when True; grey FSIM on the luminance (Y, or the only channel).

    Returns:
        ``similarity``: ``(B, 1, h, w)`` per-pixel ``S_L * S_C^lambda``; ``weight``: ``(B, 1, h, w)`` ``PC_m =
        max(PC_x, PC_y)``. ``(h, w) = (H, W) // f`` with ``f = fsim_downsample_factor(H, W)`` (average pooling).

    Raises:
        ValueError: for chromatic FSIM on non-RGB input.
    """
    if chromatic and x.shape[1] != 3:
        raise ValueError(f"chromatic FSIM needs 3-channel RGB input, got {x.shape[1]} channels")
    factor = fsim_downsample_factor(*x.shape[-2:])
    if factor > 1:
        x, y = F.avg_pool2d(x, factor), F.avg_pool2d(y, factor)
    if x.shape[1] == 3:
        x, y = rgb2yiq(x), rgb2yiq(y)
    lum_x, lum_y = x[:, :1], y[:, :1]
    pc = phase_congruency(torch.cat([lum_x, lum_y]))
    pc_x, pc_y = pc.chunk(2)
    kernels = torch.stack([scharr_filter(device=x.device, dtype=x.dtype)[0]] * 2)
    kernels[1] = kernels[0].T
    grad = gradient_map(torch.cat([lum_x, lum_y]), kernels.unsqueeze(1))
    grad_x, grad_y = grad.chunk(2)
    similarity = similarity_map(pc_x, pc_y, FSIM_T1) * similarity_map(grad_x, grad_y, FSIM_T2)
    if chromatic:
        s_i = similarity_map(x[:, 1:2], y[:, 1:2], FSIM_T3)
        s_q = similarity_map(x[:, 2:3], y[:, 2:3], FSIM_T4)
        # S_C can be negative. Like piq we raise its magnitude to lambda; FeatureSIM.m takes the real part of the
        # complex power instead, which is smaller by cos(pi * lambda) ~ 0.996 at such pixels.
        similarity = similarity * (s_i * s_q).abs() ** FSIM_LAMBDA
    return similarity, torch.maximum(pc_x, pc_y)
