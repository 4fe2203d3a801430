r"""How much of a latent method's error is the autoencoder's: two oracle restorations that only the VAE limits.

    python -m experiments.ceilings --vae outputs/demo/vae --data outputs/demo/evalset --out outputs/demo/ceilings.md

For every triplet of an evaluation set (``clean/``, ``corrupted/``, ``masks/``) it pastes into the artifact mask

- ``D(E(clean))``: what a perfect latent restorer would give with ``decode="full"`` (the paper's paste-back);
- ``x + D(E(clean)) - D(E(x))``: the same with ``decode="delta"`` (decode the change, keep the input's texture);
- ``exp(ln x + ln D(E(clean)) - ln D(E(x)))``: the same with ``decode="od-delta"``;
- the transmission-weighted blend of the delta and the full decode: ``decode="adaptive"``;

and reports artifact-region PSNR/SSIM (mean and 95 % bootstrap interval) next to the unrestored input. A latent
method cannot beat the ceiling of its decode mode; the gap between a method and its ceiling is the denoiser's. Run it
whenever the VAE or the evaluation set changes (posterior means, fp32). Writes a markdown table (``--out``) and
prints it; ``--json`` also writes the numbers.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from datamodules.datasets import TripletFolderDataset
from lightning_modules.components.autoencoders import LatentCodec, load_autoencoder
from lightning_modules.components.regional_sampler import composite, decode_latents
from lightning_modules.metrics.functional import per_image_metrics
from lightning_modules.metrics.statistics import bootstrap_ci

MODES = ("full", "delta", "od-delta", "adaptive")


@torch.no_grad()
def vae_ceilings(vae_dir: Path, data: Path, *, batch_size: int = 8) -> dict[str, dict[str, list[float]]]:
    """Per-image artifact-region PSNR/SSIM of the unrestored input and of the oracle paste-back per decode mode.

    Args:
        vae_dir: Folder of a diffusers ``AutoencoderKL``.
        data: Triplet folder with ``clean/``, ``corrupted/`` and ``masks/``.
        batch_size: Tiles per VAE batch.

    Returns:
        ``{"input" | "oracle-full" | "oracle-delta" | "oracle-od-delta": {"psnr": [...], "ssim": [...]}}``.
    """
    codec = LatentCodec(load_autoencoder(vae_dir)).float()
    dataset = TripletFolderDataset(data)
    out: dict[str, dict[str, list[float]]] = {
        k: {"psnr": [], "ssim": []} for k in ("input", *(f"oracle-{m}" for m in MODES))
    }
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        clean = torch.stack([it["clean"] for it in items])
        corrupted = torch.stack([it["corrupted"] for it in items])
        mask = torch.stack([it["artifact_mask"] for it in items])
        z_clean, z_corrupted = codec.encode(clean, sample=False), codec.encode(corrupted, sample=False)
        candidates = {"input": corrupted}
        for mode in MODES:
            decoded = decode_latents(codec.decode, z_clean, z_corrupted, corrupted, mode).clamp(-1, 1)
            candidates[f"oracle-{mode}"] = composite(decoded, corrupted, mask)
        for name, restored in candidates.items():
            values = per_image_metrics(restored, clean, mask, regions=("artifact",), metrics=("psnr", "ssim"))
            for metric in ("psnr", "ssim"):
                out[name][metric] += values[f"artifact/{metric}"].tolist()
    return out


def markdown(values: dict[str, dict[str, list[float]]], vae_dir: Path, data: Path) -> str:
    """The ceiling table (mean [95 % CI] per row)."""
    lines = [
        f"## VAE ceilings (`python -m experiments.ceilings --vae {vae_dir} --data {data}`)",
        "",
        "Artifact-region quality if the denoiser were perfect (its latent = the clean tile's), per decode mode, "
        "next to the unrestored input. A latent method cannot beat the ceiling of its decode mode.",
        "",
        "| paste-back | artifact PSNR | artifact SSIM |",
        "|---|---|---|",
    ]
    for name, metrics in values.items():
        cells = []
        for metric in ("psnr", "ssim"):
            mean, low, high, _ = bootstrap_ci(metrics[metric])
            digits = 2 if metric == "psnr" else 3
            cells.append(f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(prog="python -m experiments.ceilings", description=__doc__.split("\n\n")[0])
    p.add_argument("--vae", type=Path, required=True, help="diffusers AutoencoderKL folder (e.g. outputs/demo/vae)")
    p.add_argument("--data", type=Path, required=True, help="triplet folder with clean/, corrupted/, masks/")
    p.add_argument("--out", type=Path, help="write the markdown table here")
    p.add_argument("--json", type=Path, help="write the per-image values here")
    args = p.parse_args(argv)
    for path, what in ((args.vae, "--vae"), (args.data, "--data")):
        if not path.is_dir():
            raise SystemExit(f"{what} {path} is not a folder")
    values = vae_ceilings(args.vae, args.data)
    table = markdown(values, args.vae, args.data)
    print(table)
    if args.out:
        args.out.write_text(table)
    if args.json:
        args.json.write_text(json.dumps(values, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
