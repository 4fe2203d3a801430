r"""Folder restore throughput: tiles per second of ``experiments.restore`` against batch size and tile order.

Usage:
    python -m experiments.folder_bench --model outputs/demo/pipeline_conditional --method latent-conditional \
        --images SET/corrupted --masks SET/masks --batch-sizes 1,4,8 --orders name,mask-size \
        --sampler-set crop_decode=true --json outputs/folder_bench.json

Each (order, batch size) restores the whole folder once with :func:`experiments.restore.restore_folder` into a fresh
temporary folder, with one restorer built once and shared (model loading is not timed; an untimed restore of the
first tile warms it up). ``--order mask-size`` sorts the tiles by mask bounding-box area, largest first, so
with ``crop`` / ``crop_decode`` tiles of equal window size share one model call. Rows are run in the order given;
quote ratios within one run, and time nothing while other work runs on the machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from datamodules.datasets import to_mask_tensor, to_tensor
from experiments.benchmarking.tables import markdown_table
from experiments.cli_errors import run_main
from experiments.restore import ORDERS, RestoreJob, load_pair, pair_files, restore_folder, validate_args
from lightning_modules.components.restorer import takes_sampler
from lightning_modules.components.slide_store import write_json_atomic
from lightning_modules.methods import build_restorer


def throughput(job: RestoreJob, batch_sizes: list[int], orders: list[str]) -> list[dict]:
    """One ``folder_restore`` record per (order, batch size): tiles, seconds and tiles/s of a full folder restore.

    Args:
        job: The restore settings (``out`` is replaced by a temporary folder per row).
        batch_sizes: Tiles per model call.
        orders: Names of :data:`experiments.restore.ORDERS`.
    """
    _, kwargs = validate_args(job)
    restorer = build_restorer(job.method, model=job.model, device=job.device, precision=job.precision)
    pairs = pair_files(job.images, job.masks)[0]
    if not pairs:
        raise ValueError(f"no image in {job.images} has a mask with the same relative path in {job.masks}")
    rgb, mask = load_pair(pairs[0][1], pairs[0][2], job.mask_convention)
    restorer.restore(
        to_tensor(rgb)[None],
        to_mask_tensor(mask)[None],
        generator=torch.Generator().manual_seed(0),
        **(kwargs if takes_sampler(restorer) else {}),
    )
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for order in orders:
            for batch_size in batch_sizes:
                row = replace(job, out=Path(tmp) / f"{order}-{batch_size}", batch_size=batch_size, order=order)
                start = time.perf_counter()
                result = restore_folder(row, restorer=restorer)
                seconds = time.perf_counter() - start
                records.append(
                    {
                        "record": "folder_restore",
                        "method": job.method,
                        "order": order,
                        "batch_size": batch_size,
                        "tiles": result["done"],
                        "seconds": seconds,
                        "tiles_per_second": result["done"] / seconds,
                        "sampler": result["sampler"],
                    }
                )
    base = {r["order"]: r["tiles_per_second"] for r in records if r["batch_size"] == min(batch_sizes)}
    for r in records:
        r["speedup_vs_smallest_batch"] = r["tiles_per_second"] / base[r["order"]]
    return records


def table(records: list[dict]) -> str:
    """Markdown table of the ``folder_restore`` records."""
    rows = [
        [
            r["method"],
            r["order"],
            str(r["batch_size"]),
            str(r["tiles"]),
            f"{r['seconds']:.1f}",
            f"{r['tiles_per_second']:.3f}",
            f"{r['speedup_vs_smallest_batch']:.2f}",
        ]
        for r in records
    ]
    return markdown_table(["method", "order", "batch", "tiles", "seconds", "tiles/s", "vs smallest batch"], rows)


def _main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.folder_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=Path, required=True, help="folder of corrupted tiles")
    p.add_argument("--masks", type=Path, required=True, help="folder of masks (255 = artifact)")
    p.add_argument("--method", default="latent-conditional")
    p.add_argument("--model", type=Path, default=None, help="model folder of the method")
    p.add_argument("--batch-sizes", default="1,4,8", help="comma list (default 1,4,8)")
    p.add_argument("--orders", default="name,mask-size", help=f"comma list of {', '.join(ORDERS)}")
    p.add_argument("--sampler-set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    try:
        batch_sizes = [int(v) for v in args.batch_sizes.split(",") if v.strip()]
    except ValueError:
        p.error(f"--batch-sizes must be a comma list of integers, got {args.batch_sizes!r}")
    orders = [v.strip() for v in args.orders.split(",") if v.strip()]
    if not batch_sizes or min(batch_sizes) < 1:
        p.error("--batch-sizes must hold integers >= 1")
    if not orders or any(o not in ORDERS for o in orders):
        p.error(f"--orders must be a comma list of {', '.join(ORDERS)}, got {args.orders!r}")
    job = RestoreJob(
        images=args.images,
        masks=args.masks,
        out=Path("unused"),
        method=args.method,
        model=args.model,
        sampler_set=args.sampler_set,
        device=args.device,
        precision=args.precision,
    )
    records = throughput(job, batch_sizes, orders)
    print(table(records), flush=True)
    if args.json is not None:
        write_json_atomic(args.json, records)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point (errors as one line, see ``experiments/cli_errors.py``)."""
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
