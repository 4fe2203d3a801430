"""The small export folders of networks that are not diffusers models (artifact segmenter, pixel refiner).

Layout: ``DIR/<name>.json`` (``format_version`` + architecture + free-form facts) and ``DIR/weights.pt`` (a state
dict, loaded with ``weights_only=True``). Folders are built in ``DIR.tmp`` and renamed over ``DIR``, so an interrupted
export leaves the old folder or the new one, never a mixture.
"""

import json
import os
import shutil
from pathlib import Path

import torch

WEIGHTS = "weights.pt"


def write_export_folder(path: str | os.PathLike, meta_name: str, meta: dict, model: torch.nn.Module) -> Path:
    """Write ``meta`` to ``path/meta_name`` and the model's state dict to ``path/weights.pt``, atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp / WEIGHTS)
    (tmp / meta_name).write_text(json.dumps(meta, indent=2, sort_keys=True))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def read_export_meta(path: str | os.PathLike, meta_name: str, version: int | tuple[int, ...], missing: str) -> dict:
    """The JSON of an export folder (no weights read).

    Args:
        path: The folder.
        meta_name: Its JSON file name.
        version: The ``format_version`` this code reads (or a tuple of those it reads).
        missing: The message for a folder without the JSON (what it should be and how to make one).

    Raises:
        FileNotFoundError: No ``meta_name`` in ``path``.
        ValueError: Invalid JSON or another format version.
    """
    meta_file = Path(path) / meta_name
    if not meta_file.is_file():
        raise FileNotFoundError(missing)
    try:
        meta = json.loads(meta_file.read_text())
    except ValueError as err:
        raise ValueError(f"{meta_file} is not valid JSON ({err})") from None
    versions = version if isinstance(version, tuple) else (version,)
    if not isinstance(meta, dict) or meta.get("format_version") not in versions:
        found = meta.get("format_version") if isinstance(meta, dict) else None
        wanted = " or ".join(str(v) for v in versions)
        raise ValueError(f"{meta_file}: format_version {found} is not {wanted}")
    return meta
