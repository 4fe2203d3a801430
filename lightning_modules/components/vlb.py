"""Variational-bound terms for a DDPM with a learned-range variance (Nichol & Dhariwal 2021, improved DDPM).

The denoiser returns ``2C`` channels: epsilon (first ``C``) and ``v`` (last ``C``), interpolating the reverse
process' log-variance between the two natural bounds (Nichol & Dhariwal 2021, Eq. 15)::

    log Sigma_theta(x_t, t) = frac * log(beta_t) + (1 - frac) * log(beta~_t),   frac = (v + 1) / 2

with ``beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)`` the true posterior variance, its log "clipped" at
``t = 0`` (where it is 0) to its value at ``t = 1``, as in the improved-diffusion code. This is the same
interpretation diffusers' ``DDPMScheduler(variance_type="learned_range")`` samples with (it differs only at ``t = 0``,
where no noise is added anyway).

The per-timestep VLB term ``L_t`` (Ho et al. 2020, Eq. 5) in bits per dimension:

- ``t > 0``: ``KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t))`` between two diagonal Gaussians.
- ``t = 0``: the decoder NLL ``-log p_theta(x_0 | x_1)`` of a Gaussian discretised to 256 bins per channel on
  ``[-1, 1]`` (Ho et al. 2020, Eq. 13), computed exactly here rather than approximated by a KL.

The hybrid objective (Nichol & Dhariwal 2021, Sec. 3.1) is ``L_simple + lambda * L_vlb`` with
``L_vlb = sum_t L_t``. With ``t`` drawn uniformly, ``T * L_t`` is an unbiased estimate of ``L_vlb``, so a sample's
loss is ``mse + lambda * T * L_t`` (``T / 1000 * L_t`` for ``lambda = 0.001``, the improved-diffusion code's
"rescaled" weighting). The mean that enters ``L_t`` uses a stop-gradient epsilon, so the VLB trains only the
variance and ``L_simple`` alone drives the mean.

Pure torch: no ``lightning`` import. All schedule tables are computed in float64 from ``alphas_cumprod``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _check_alphas(alphas_cumprod: Tensor) -> Tensor:
    if alphas_cumprod.ndim != 1 or len(alphas_cumprod) < 2:
        raise ValueError(f"alphas_cumprod must be a 1-D tensor of length >= 2, got {tuple(alphas_cumprod.shape)}")
    return alphas_cumprod.double()


def _gather(table: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """``table[t]`` as ``(B, 1, ..., 1)`` broadcastable against ``like``, in ``like``'s dtype and device."""
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"t must be ({like.shape[0]},), got {tuple(t.shape)}")
    values = table.to(t.device)[t.long()].to(dtype=like.dtype, device=like.device)
    return values.view(-1, *([1] * (like.ndim - 1)))


def schedule_tables(alphas_cumprod: Tensor) -> dict[str, Tensor]:
    """Per-timestep constants of the forward process and its posterior (float64, each of shape ``(T,)``).

    Args:
        alphas_cumprod: ``(T,)`` cumulative products ``abar_t`` (e.g. ``DDPMScheduler.alphas_cumprod``).

    Returns:
        ``betas``, ``alphas_cumprod``, ``alphas_cumprod_prev`` (``abar_{t-1}``, 1 at ``t = 0``),
        ``posterior_variance`` (``beta~_t``), ``posterior_log_variance_clipped``, ``posterior_mean_coef1``
        (multiplies ``x_0``) and ``posterior_mean_coef2`` (multiplies ``x_t``).

    Raises:
        ValueError: ``alphas_cumprod`` is not a 1-D tensor of length >= 2.
    """
    abar = _check_alphas(alphas_cumprod)
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    betas = 1.0 - abar / abar_prev
    variance = betas * (1.0 - abar_prev) / (1.0 - abar)
    log_variance = torch.log(torch.cat([variance[1:2], variance[1:]]))
    return {
        "betas": betas,
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": abar_prev,
        "posterior_variance": variance,
        "posterior_log_variance_clipped": log_variance,
        "posterior_mean_coef1": betas * abar_prev.sqrt() / (1.0 - abar),
        "posterior_mean_coef2": (1.0 - abar_prev) * (1.0 - betas).sqrt() / (1.0 - abar),
    }


def q_posterior(x0: Tensor, x_t: Tensor, t: Tensor, alphas_cumprod: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and clipped log-variance of the true posterior ``q(x_{t-1} | x_t, x_0)`` (Ho et al. 2020, Eq. 6-7).

    Args:
        x0: ``(B, C, H, W)`` clean image.
        x_t: ``(B, C, H, W)`` noised image.
        t: ``(B,)`` long timesteps.
        alphas_cumprod: ``(T,)`` cumulative alphas.

    Returns:
        ``mean (B, C, H, W)`` and ``log_variance (B, 1, 1, 1)``.
    """
    tables = schedule_tables(alphas_cumprod)
    mean = _gather(tables["posterior_mean_coef1"], t, x_t) * x0 + _gather(tables["posterior_mean_coef2"], t, x_t) * x_t
    return mean, _gather(tables["posterior_log_variance_clipped"], t, x_t)


def p_mean_log_variance(model_output: Tensor, x_t: Tensor, t: Tensor, alphas_cumprod: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and log-variance of ``p_theta(x_{t-1} | x_t)`` from an epsilon + learned-range output.

    The mean is the posterior mean at the predicted ``x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``
    (not clipped, as in improved-diffusion's training loss).

    Args:
        model_output: ``(B, 2C, H, W)``: epsilon, then ``v`` (``frac = (v + 1) / 2``).
        x_t: ``(B, C, H, W)``.
        t: ``(B,)`` long timesteps.
        alphas_cumprod: ``(T,)`` cumulative alphas.

    Returns:
        ``mean (B, C, H, W)`` and ``log_variance (B, C, H, W)``.

    Raises:
        ValueError: ``model_output`` does not have ``2C`` channels.
    """
    channels = x_t.shape[1]
    if model_output.shape != (x_t.shape[0], 2 * channels, *x_t.shape[2:]):
        raise ValueError(
            f"model_output must be (B, 2C, H, W) = {(x_t.shape[0], 2 * channels, *x_t.shape[2:])}, "
            f"got {tuple(model_output.shape)}"
        )
    eps, v = model_output.split(channels, dim=1)
    tables = schedule_tables(alphas_cumprod)
    abar = _gather(tables["alphas_cumprod"], t, x_t)
    x0_pred = (x_t - (1.0 - abar).sqrt() * eps) / abar.sqrt()
    mean, min_log = q_posterior(x0_pred, x_t, t, alphas_cumprod)
    max_log = torch.log(_gather(tables["betas"], t, x_t))
    frac = (v + 1.0) / 2.0
    return mean, frac * max_log + (1.0 - frac) * min_log


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise ``KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)))`` in nats (broadcasting)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Standard normal CDF by the tanh approximation ``0.5 (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))``."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """Log-probability of 8-bit data under a Gaussian discretised to 256 bins on ``[-1, 1]`` (Ho et al. 2020, Eq. 13).

    Bin ``k`` covers ``x +- 1/255``; the first and last bins extend to ``-inf`` and ``+inf``.

    Args:
        x: Data in ``[-1, 1]`` (8-bit values mapped by ``v / 127.5 - 1``).
        mean: Gaussian means (broadcastable to ``x``).
        log_scale: Log standard deviations (broadcastable to ``x``).

    Returns:
        Elementwise log-probabilities in nats (``<= 0``), shaped like ``x``.
    """
    centred = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centred + 1.0 / 255.0))
    cdf_minus = approx_standard_normal_cdf(inv_std * (centred - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_minus = torch.log((1.0 - cdf_minus).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))
    inner = torch.where(x > 0.999, log_one_minus_cdf_minus, log_delta)
    return torch.where(x < -0.999, log_cdf_plus, inner)


def vlb_term(
    model_output: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, alphas_cumprod: Tensor, *, detach_mean: bool = True
) -> Tensor:
    """Per-sample VLB term ``L_t`` in bits per dimension (KL for ``t > 0``, decoder NLL for ``t = 0``).

    Args:
        model_output: ``(B, 2C, H, W)``: epsilon, then the variance interpolation ``v``.
        x0: ``(B, C, H, W)`` clean image in ``[-1, 1]``.
        x_t: ``(B, C, H, W)`` noised image.
        t: ``(B,)`` long timesteps in ``[0, T)``.
        alphas_cumprod: ``(T,)`` cumulative alphas of the training schedule.
        detach_mean: Stop the gradient through epsilon (Nichol & Dhariwal 2021, Sec. 3.1), so this term trains
            only the variance.

    Returns:
        ``(B,)`` float tensor, ``>= 0`` (up to rounding), mean over the ``C * H * W`` dimensions divided by ``ln 2``.
    """
    model_output = model_output.float()
    x0, x_t = x0.float(), x_t.float()
    if detach_mean:
        channels = x_t.shape[1]
        model_output = torch.cat([model_output[:, :channels].detach(), model_output[:, channels:]], dim=1)
    true_mean, true_log_var = q_posterior(x0, x_t, t, alphas_cumprod)
    mean, log_var = p_mean_log_variance(model_output, x_t, t, alphas_cumprod)
    kl = normal_kl(true_mean, true_log_var, mean, log_var).flatten(1).mean(1) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).flatten(1).mean(1) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


def hybrid_loss(
    model_output: Tensor,
    noise: Tensor,
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
    alphas_cumprod: Tensor,
    *,
    lambda_vlb: float = 1e-3,
) -> dict[str, Tensor]:
    """``L_hybrid = L_simple + lambda * T * L_t`` (Nichol & Dhariwal 2021, Sec. 3.1; see the module docstring).

    Args:
        model_output: ``(B, 2C, H, W)`` epsilon and variance interpolation.
        noise: ``(B, C, H, W)`` the epsilon used to make ``x_t``.
        x0: ``(B, C, H, W)`` clean image in ``[-1, 1]``.
        x_t: ``(B, C, H, W)`` noised image.
        t: ``(B,)`` long timesteps.
        alphas_cumprod: ``(T,)`` cumulative alphas.
        lambda_vlb: ``lambda`` (0.001 in the paper); 0 gives plain epsilon MSE (the variance is then untrained).

    Returns:
        ``loss`` (scalar), ``mse`` (scalar epsilon MSE), ``vlb`` (scalar batch mean of ``L_t``, bits/dim).

    Raises:
        ValueError: Negative ``lambda_vlb`` or mismatched shapes.
    """
    if lambda_vlb < 0:
        raise ValueError(f"lambda_vlb must be >= 0, got {lambda_vlb}")
    if noise.shape != x_t.shape or x0.shape != x_t.shape:
        raise ValueError(f"noise {tuple(noise.shape)}, x0 {tuple(x0.shape)} and x_t {tuple(x_t.shape)} must match")
    eps = model_output[:, : x_t.shape[1]].float()
    mse = (eps - noise.float()).pow(2).flatten(1).mean(1)
    vlb = vlb_term(model_output, x0, x_t, t, alphas_cumprod)
    loss = mse + lambda_vlb * len(alphas_cumprod) * vlb
    return {"loss": loss.mean(), "mse": mse.mean(), "vlb": vlb.mean()}


__all__ = [
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "hybrid_loss",
    "normal_kl",
    "p_mean_log_variance",
    "q_posterior",
    "schedule_tables",
    "vlb_term",
]
