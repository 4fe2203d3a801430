"""Markdown tables of benchmark records (restore, latent/pixel ratio, sampler grid, speed target, training, peak)."""

from __future__ import annotations

from collections.abc import Sequence


def _fmt(value: float | int | str | None, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return format(value, spec)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _check(checks: list[dict]) -> str:
    """``NFE n: +e %`` per validation restore of an extrapolated record (model over measured, minus one)."""
    return ", ".join(f"NFE {c['nfe']}: {100 * c['error']:+.0f} %" for c in checks) or "-"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def restore_table(records: list[dict]) -> str:
    """Seconds and FLOPs per tile of every restore record, with the utilisation of the network and the VAE."""
    rows = []
    for r in records:
        if r.get("record") != "restore":
            continue
        rows.append(
            [
                r["method"],
                r["config"],
                r["precision"],
                str(r["batch_size"]),
                str(r["nfe"]),
                _fmt(r["seconds_per_tile"], ".4g"),
                r["measured_or_extrapolated"],
                _check(r.get("extrapolation_check") or []),
                _fmt(r.get("batch_speedup"), ".2f"),
                _fmt(r["parts_seconds_per_tile"]["eval"] * 1e3, ".3g"),
                _fmt(r["flops_per_tile"] / 1e9, ".4g"),
                _fmt(r["flops_per_eval_per_tile"] / 1e9, ".4g"),
                _fmt(r["flops_fixed_per_tile"] / 1e9, ".4g"),
                _fmt(r["achieved_flops_per_second"] / 1e12, ".3g"),
                _pct(r["utilisation"]),
                _pct(r["network_utilisation"]),
                _pct(r["vae_utilisation"]),
            ]
        )
    header = [
        "method",
        "config",
        "precision",
        "batch",
        "NFE",
        "s/tile",
        "how",
        "check: measured vs model",
        "batch speed-up",
        "ms/eval/tile",
        "GFLOP/tile",
        "net GFLOP/eval",
        "VAE GFLOP",
        "TFLOP/s",
        "util",
        "net util",
        "VAE util",
    ]
    return markdown_table(header, rows)


def ratio_table(records: list[dict]) -> str:
    """Pixel ArtiFusion / latent seconds per tile (the paper: 30.71 s / 0.83 s = 37x on a GPU)."""
    rows = [
        [
            r["config"],
            r["precision"],
            str(r["batch_size"]),
            _fmt(r["latent_seconds_per_tile"], ".4g"),
            _fmt(r["artifusion_seconds_per_tile"], ".4g"),
            f"{r['ratio']:.1f}x",
            f"{r['flops_ratio']:.1f}x",
            f"{r['latent_label']} / {r['artifusion_label']}",
            f"{r['paper_ratio']:.1f}x",
        ]
        for r in records
        if r.get("record") == "ratio"
    ]
    header = [
        "config",
        "precision",
        "batch",
        "latent s/tile",
        "artifusion s/tile",
        "time ratio",
        "FLOP ratio",
        "how (latent / artifusion)",
        "paper (GPU)",
    ]
    return markdown_table(header, rows)


def training_table(records: list[dict]) -> str:
    """Denoiser training images per second with and without the latent cache."""
    rows = [
        [
            r.get("method", "latent"),
            r["config"],
            r["precision"],
            str(r["batch_size"]),
            "yes" if r["latent_cache"] else "no",
            _fmt(r["images_per_second"], ".4g"),
            _fmt(r["seconds_per_step"], ".4g"),
            _fmt(r["cache_speedup"], ".2f"),
            _fmt(r["cache_build_images_per_second"], ".4g")
            if r.get("latent_cache") and "cache_build_images_per_second" in r
            else "-",
            _fmt(r["flops_per_step"] / 1e9, ".4g"),
            _pct(r["utilisation"]),
            str(r["steps"]),
        ]
        for r in records
        if r.get("record") == "training"
    ]
    header = [
        "method",
        "config",
        "precision",
        "batch",
        "latent cache",
        "images/s",
        "s/step",
        "cache speed-up",
        "cache build images/s",
        "GFLOP/step",
        "util",
        "steps timed",
    ]
    return markdown_table(header, rows)


def peak_table(records: list[dict]) -> str:
    """Measured matmul peaks of this run (utilisations use the higher of the start and end values)."""
    rows = [
        [
            r["precision"],
            f"{r['size']}x{r['size']}",
            r.get("when", "-"),
            r["device"],
            str(r["threads"]),
            _fmt(r["flops_per_second"] / 1e12, ".3g"),
        ]
        for r in records
        if r.get("record") == "peak"
    ]
    return markdown_table(["dtype", "matmul", "measured at", "device", "threads", "TFLOP/s"], rows)


def machine_line(records: list[dict]) -> str:
    """One line naming the machine of the run."""
    m = next((r for r in records if r.get("record") == "machine"), None)
    if m is None:
        return ""
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    flags = ", ".join(m["cpu_flags"]) or "none"
    return (
        f"machine: {m['cpu_model']} ({m['cpu_count']} CPUs, flags {flags}), {m['threads']} torch threads, "
        f"torch {m['torch']}, diffusers {m['diffusers']}, device {m['device']}{gpu}"
    )


def sampler_grid_table(records: list[dict]) -> str:
    """Speed and quality of every ``sampler_row`` record (``benchmarking/speed_quality.py``)."""

    def delta(r: dict) -> str:
        if r.get("psnr_artifact_delta") is None:
            return "-"
        low, high = r["psnr_artifact_delta_ci"]
        return f"{r['psnr_artifact_delta']:+.2f} [{low:+.2f}, {high:+.2f}]"

    rows = [
        [
            r["method"],
            r["config"],
            r["precision"],
            str(r["batch"]),
            r["row"],
            str(r["nfe"]),
            _fmt(r["seconds_per_tile"], ".4g"),
            _fmt(r.get("speedup_vs_reference"), ".2f"),
            _fmt(r.get("psnr_artifact"), ".2f"),
            _fmt(r.get("ssim_artifact"), ".3f"),
            delta(r),
            _fmt(r.get("psnr_artifact_delta_worst"), "+.2f"),
            _fmt(r.get("psnr_vs_full_autoencoder"), ".2f"),
        ]
        for r in records
        if r.get("record") == "sampler_row"
    ]
    header = [
        "method",
        "config",
        "precision",
        "batch",
        "sampler row",
        "NFE",
        "s/tile",
        "speed-up vs 50 steps",
        "PSNR (trained)",
        "SSIM (trained)",
        "PSNR delta [95 % CI]",
        "worst tile",
        "PSNR vs full-VAE row",
    ]
    return markdown_table(header, rows)


def _default_speedup(r: dict) -> str:
    if not r.get("speedup_vs_default_restore"):
        return "-"
    return f"{r['speedup_vs_default_restore']:.2f}x (NFE {r['default_restore_nfe']}, {r['default_restore_how']})"


def speed_target_table(records: list[dict]) -> str:
    """The fastest quality-preserving row per method, precision and batch, with its speed-ups."""
    rows = [
        [
            r["method"],
            r["config"],
            r["precision"],
            str(r["batch"]),
            r["row"],
            _fmt(r["seconds_per_tile"], ".4g"),
            _fmt(r["psnr_artifact_delta"], "+.3f"),
            _fmt(r["speedup_vs_reference"], ".2f") + "x" if r["speedup_vs_reference"] else "-",
            _default_speedup(r),
            (_fmt(r["speedup_vs_artifusion"], ".1f") + f"x ({r['artifusion_how']})")
            if r["speedup_vs_artifusion"]
            else "-",
        ]
        for r in records
        if r.get("record") == "speed_target"
    ]
    header = [
        "method",
        "config",
        "precision",
        "batch",
        "fastest row",
        "s/tile",
        "PSNR delta",
        "vs 50-step whole tile",
        "vs the default restore row",
        "vs fastest pixel ArtiFusion",
    ]
    return markdown_table(header, rows)
