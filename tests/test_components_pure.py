"""The pure building blocks (models, samplers, artifact synthesis, I/O, splits, metric maths) must not import Lightning.

Each module is imported in a fresh interpreter (``python -c``), so modules imported by other tests cannot hide or fake
a dependency. One subprocess imports them all; if it finds Lightning loaded, each module is re-imported alone to name
the culprit(s).
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PURE_DIRS = ("lightning_modules/components", "datamodules/artifacts")
PURE_FILES = (
    "datamodules/imageio.py",
    "datamodules/tiling.py",
    "datamodules/sources.py",
    "datamodules/splits.py",
    "datamodules/slides.py",
    "datamodules/slide_masks.py",
    "datamodules/pyramid.py",
    "lightning_modules/metrics/functional.py",
    "lightning_modules/metrics/regions.py",
    "lightning_modules/metrics/maps.py",
    "lightning_modules/metrics/statistics.py",
    "lightning_modules/methods.py",
)
FORBIDDEN = ("lightning", "pytorch_lightning")

_CHECK = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
loaded = [m for m in {forbidden!r} if m in sys.modules]
print("LOADED=" + ",".join(loaded))
"""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def pure_modules() -> list[str]:
    """Dotted names of every module that must stay free of Lightning, in a stable order."""
    files = [p for d in PURE_DIRS for p in sorted((ROOT / d).rglob("*.py"))]
    files += [ROOT / f for f in PURE_FILES]
    return list(dict.fromkeys(_module_name(p) for p in files))


def _lightning_loaded_after_import(*modules: str) -> list[str]:
    """Import ``modules`` in a fresh interpreter; return the forbidden top-level packages left in sys.modules."""
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", _CHECK.format(forbidden=FORBIDDEN), *modules],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"importing {modules} failed:\n{proc.stderr[-4000:]}"
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("LOADED=")][-1]
    return [m for m in line.removeprefix("LOADED=").split(",") if m]


def test_pure_module_list_is_complete():
    modules = pure_modules()
    for path in PURE_FILES:
        assert (ROOT / path).is_file(), f"{path} is listed as pure but does not exist"
    assert "lightning_modules.components.regional_sampler" in modules
    assert "datamodules.artifacts.base" in modules
    assert len(modules) >= len(PURE_FILES) + 10


def test_pure_modules_do_not_import_lightning():
    modules = pure_modules()
    if not _lightning_loaded_after_import(*modules):
        return
    culprits = {m: loaded for m in modules if (loaded := _lightning_loaded_after_import(m))}
    raise AssertionError(f"these modules pull in Lightning (module -> packages loaded): {culprits}")
