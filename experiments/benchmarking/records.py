"""Benchmark records: one restore measurement, the latent/pixel ratios and the batch speed-ups.

Every record is a flat JSON-serialisable dict with a ``record`` key (``"machine"``, ``"peak"``, ``"restore"``,
``"ratio"``, ``"training"`` or ``"skipped"``). Restore records carry at least ``method``, ``config``, ``precision``,
``batch_size``, ``seconds_per_tile``, ``nfe``, ``measured_or_extrapolated``, ``flops_per_tile``, ``utilisation`` and
``device``. Utilisations are fractions of the matmul peak of the record's precision measured in the same run.
"""

from __future__ import annotations

import logging

import torch

from experiments.benchmarking.methods import MethodBench, example_batch
from experiments.benchmarking.timing import autocast, measure

log = logging.getLogger(__name__)

EXTRAPOLATE_MODES = ("auto", "always", "never")
# LatentArtiFusion's claim on a GPU (arXiv 2407.20172): 0.83 s per tile against 30.71 s for pixel ArtiFusion.
PAPER_SECONDS = {"latent": 0.83, "artifusion": 30.71}


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if not num or not den else num / den


def restore_record(
    bench: MethodBench,
    *,
    config: str,
    precision: str,
    batch_size: int,
    flops: dict[str, int],
    max_seconds: float,
    warmup: int,
    extrapolate: str = "auto",
    check_nfe: tuple[int, ...] | list[int] = (),
) -> dict:
    """Time one method at one precision and batch size and build its record.

    Args:
        bench: The method with random weights.
        config: ``--config`` name (for the record).
        precision: ``"fp32"`` or ``"bf16"`` (autocast).
        batch_size: Tiles per restore call.
        flops: Per-tile FLOPs from :meth:`MethodBench.count_flops`.
        max_seconds: Budget per timed measurement (each part, and the full restore).
        warmup: Untimed calls before each measurement.
        extrapolate: ``"auto"`` (run the full restore when the estimate fits ``max_seconds``), ``"always"`` (never
            run it, except for single-pass methods whose full restore is the network pass) or ``"never"``.
        check_nfe: When the restore is extrapolated, also run and time full restores at these smaller NFE (the
            sampler without RePaint jumps) and compare each with the same model's prediction
            ``fixed + NFE x (eval + step)``: ``extrapolation_check`` holds measured and predicted seconds and the
            relative error, so the extrapolated figure is validated in the same run.

    Returns:
        The restore record (seconds are medians; ``parts_seconds_per_tile`` holds the component times); the peak and
        utilisation fields are filled in later by :func:`add_utilisation`.

    Raises:
        ValueError: For an unknown ``extrapolate`` mode.
    """
    if extrapolate not in EXTRAPOLATE_MODES:
        raise ValueError(f"extrapolate must be one of {EXTRAPOLATE_MODES}, got {extrapolate!r}")
    device = bench.device
    x, mask = example_batch(batch_size, bench.geometry.image_size, device)
    timed = bench.time_parts(x, mask, precision, max_seconds=max_seconds, warmup=warmup)
    parts = timed["seconds"]
    fixed = sum(parts[k] or 0.0 for k in ("encode", "decode", "paste"))
    per_eval = parts["eval"] + (parts["step"] or 0.0)
    estimate = fixed + bench.nfe * per_eval

    single_pass = bench.nfe == 1 and fixed == 0.0
    run_full = extrapolate == "never" or single_pass or (extrapolate == "auto" and estimate <= max_seconds)
    full_reps = 0
    if run_full:
        log.info("  full restore: %s %s batch %d (estimate %.2f s)", bench.name, precision, batch_size, estimate)
        with torch.no_grad(), autocast(device, precision):
            # The parts were warmed up above, so the full restore needs no warm-up call of its own.
            timing = measure(bench.restore_fn(x, mask, precision), device, max_seconds=max_seconds, warmup=0)
        seconds, label, full_reps = timing.median, "measured", timing.reps
    else:
        seconds, label = estimate, "extrapolated"
    checks = []
    if label == "extrapolated" and getattr(bench, "pipeline", None) is not None:
        checks = [_check_extrapolation(bench, x, mask, precision, n, fixed, per_eval) for n in check_nfe]

    vae_flops = flops["encode"] + flops["decode"]
    flops_per_tile = vae_flops + bench.nfe * flops["eval"]
    seconds_per_tile = seconds / batch_size
    vae_seconds = (parts["encode"] or 0.0) + (parts["decode"] or 0.0)
    network_rate = flops["eval"] * batch_size / parts["eval"]
    vae_rate = vae_flops * batch_size / vae_seconds if vae_seconds else None
    achieved = flops_per_tile / seconds_per_tile
    return {
        "record": "restore",
        "method": bench.name,
        "config": config,
        "precision": precision,
        "batch_size": batch_size,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "image_size": bench.geometry.image_size,
        "nfe": bench.nfe,
        "seconds_per_tile": seconds_per_tile,
        "seconds_per_batch": seconds,
        "measured_or_extrapolated": label,
        "full_restore_reps": full_reps,
        "estimate_seconds_per_tile": estimate / batch_size,
        "parts_seconds_per_tile": {k: (v / batch_size if v is not None else None) for k, v in parts.items()},
        "parts_reps": timed["reps"],
        "network_params": sum(p.numel() for p in bench.network.parameters()),
        "vae_params": sum(p.numel() for p in bench.vae.parameters()) if bench.vae is not None else None,
        "flops_per_tile": flops_per_tile,
        "flops_per_eval_per_tile": flops["eval"],
        "flops_vae_encode_per_tile": flops["encode"],
        "flops_vae_decode_per_tile": flops["decode"],
        "flops_fixed_per_tile": vae_flops,
        "achieved_flops_per_second": achieved,
        "network_flops_per_second": network_rate,
        "vae_flops_per_second": vae_rate,
        "how": label,
        "batch": batch_size,
        "extrapolation_check": checks,
        "extrapolation_error_max": max((abs(c["error"]) for c in checks), default=None),
    }


def _check_extrapolation(bench, x, mask, precision: str, nfe: int, fixed: float, per_eval: float) -> dict:
    """One full restore at ``nfe`` network evaluations (jumps off), timed once, against the parts model."""
    from dataclasses import replace

    pipe = bench.pipeline
    saved = pipe.sampler_config
    pipe.sampler_config = replace(saved, num_steps=nfe, jump_length=0, jump_n_sample=1, strength=1.0)
    try:
        expected = pipe.make_sampler().expected_nfe()
        g = torch.Generator(device=x.device)
        with torch.no_grad(), autocast(bench.device, precision):
            timing = measure(
                lambda: pipe.restore(x, mask, generator=g.manual_seed(0)), bench.device, max_seconds=0.0, warmup=0
            )
    finally:
        pipe.sampler_config = saved
    predicted = fixed + expected * per_eval
    return {
        "nfe": expected,
        "measured_seconds": timing.median,
        "predicted_seconds": predicted,
        "error": predicted / timing.median - 1,
    }


def add_utilisation(records: list[dict], peaks: dict[str, float]) -> None:
    """Set ``peak_flops_per_second`` and the utilisation fractions of every restore and training record.

    ``utilisation`` is achieved FLOP/s over the peak of the record's precision; restore records also get
    ``network_utilisation`` (UNet, Swin-UNet or generator alone) and ``vae_utilisation`` (encode + decode; None
    without a VAE).
    """
    for r in records:
        if r.get("record") not in ("restore", "training"):
            continue
        peak = peaks.get(r["precision"])
        r["peak_flops_per_second"] = peak
        r["utilisation"] = _ratio(r["achieved_flops_per_second"], peak)
        if r["record"] == "restore":
            r["network_utilisation"] = _ratio(r["network_flops_per_second"], peak)
            r["vae_utilisation"] = _ratio(r["vae_flops_per_second"], peak)


def add_batch_speedups(records: list[dict]) -> None:
    """Set ``batch_speedup`` on every restore record that has a batch-1 twin (same method, config and precision).

    The speedup is the batch-1 record's seconds per tile divided by this record's.
    """
    restore = [r for r in records if r.get("record") == "restore"]
    base = {(r["method"], r["config"], r["precision"]): r["seconds_per_tile"] for r in restore if r["batch_size"] == 1}
    for r in restore:
        r["batch_speedup"] = _ratio(base.get((r["method"], r["config"], r["precision"])), r["seconds_per_tile"])


def ratio_records(records: list[dict]) -> list[dict]:
    """Pixel ArtiFusion / latent seconds per tile for every (config, precision, batch size) holding both methods."""
    restore = {
        (r["method"], r["config"], r["precision"], r["batch_size"]): r for r in records if r.get("record") == "restore"
    }
    out = []
    for (method, config, precision, batch), latent in restore.items():
        pixel = restore.get(("artifusion", config, precision, batch))
        if method != "latent" or pixel is None:
            continue
        out.append(
            {
                "record": "ratio",
                "config": config,
                "precision": precision,
                "batch_size": batch,
                "device": latent["device"],
                "latent_seconds_per_tile": latent["seconds_per_tile"],
                "artifusion_seconds_per_tile": pixel["seconds_per_tile"],
                "ratio": pixel["seconds_per_tile"] / latent["seconds_per_tile"],
                "flops_ratio": pixel["flops_per_tile"] / latent["flops_per_tile"],
                "latent_label": latent["measured_or_extrapolated"],
                "artifusion_label": pixel["measured_or_extrapolated"],
                "paper_ratio": PAPER_SECONDS["artifusion"] / PAPER_SECONDS["latent"],
            }
        )
    return out
