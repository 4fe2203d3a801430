"""The method table (lightning_modules/methods.py): every name builds, lazily, and says what it takes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_modules import methods
from lightning_modules.components.restorer import Restorer, takes_sampler
from lightning_modules.methods import (
    METHODS,
    MethodSpec,
    available_restorers,
    build_restorer,
    method_spec,
    register_restorer,
    resolve,
)

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = ("identity", "telea", "ns", "latent", "latent-conditional", "latent-reference", "artifusion", "cyclegan")
IMPLEMENTATIONS = (
    "lightning_modules.baselines",
    "lightning_modules.components.pipeline",
    "lightning_modules.components.artifusion",
    "experiments",
)


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory) -> dict[str, Path]:
    """A random-weight model folder for every method that needs one."""
    from diffusers import DDPMScheduler

    from lightning_modules.components.autoencoders import build_autoencoder
    from lightning_modules.components.denoisers import build_unet
    from lightning_modules.components.gan_networks import ResnetGenerator
    from lightning_modules.components.pipeline import save_pipeline
    from lightning_modules.components.regional_sampler import SamplerConfig
    from tests.tiny_data import write_tiny_pipeline

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    latent = write_tiny_pipeline(root / "latent")
    conditional = save_pipeline(
        root / "conditional",
        unet=build_unet("tiny", sample_size=8, in_channels=9, out_channels=4),
        scheduler=DDPMScheduler(),
        sampler=SamplerConfig(),
        vae=build_autoencoder("tiny"),
        image_size=64,
        conditional=True,
    )
    pixel = save_pipeline(
        root / "pixel",
        unet=build_unet("tiny", sample_size=8, in_channels=3),
        scheduler=DDPMScheduler(),
        sampler=SamplerConfig(),
        image_size=8,
    )
    generator = root / "generator"
    ResnetGenerator(ngf=8, n_blocks=1).save_pretrained(generator)
    return {
        "latent": latent,
        "latent-reference": latent,
        "latent-conditional": conditional,
        "artifusion": pixel,
        "cyclegan": generator,
    }


def test_the_table_holds_every_builtin_method():
    assert tuple(METHODS) == BUILTIN
    for name in BUILTIN:
        spec = method_spec(name)
        assert isinstance(spec.factory, str) and ":" in spec.factory and spec.summary
        assert spec.needs_model == (spec.export is not None), name
    with pytest.raises(ValueError, match="unknown restoration method 'magic'; available: .*telea"):
        method_spec("magic")


@pytest.mark.parametrize("name", BUILTIN)
def test_every_method_builds_and_agrees_with_its_table_entry(name, model_folders):
    spec = method_spec(name)
    restorer = build_restorer(name, model=model_folders.get(name), device="cpu", precision="fp32")
    assert isinstance(restorer, Restorer) and restorer.name == name
    assert takes_sampler(restorer) is spec.takes_sampler
    assert hasattr(restorer, "make_sampler") is spec.takes_sampler


@pytest.mark.parametrize("name", [n for n in BUILTIN if method_spec(n).needs_model])
def test_model_methods_ask_for_their_model(name):
    with pytest.raises(ValueError, match=f"method '{name}' needs --model"):
        build_restorer(name)


def test_the_cli_checks_read_model_and_sampler_needs_from_the_table(model_folders):
    from experiments.restore import has_sampler, uses_model

    for name in BUILTIN:
        spec = method_spec(name)
        assert uses_model(name) is spec.needs_model, name
        assert has_sampler(name, model_folders.get(name)) is spec.takes_sampler, name


def test_export_and_benchmark_entries_name_real_hooks():
    from experiments import export
    from experiments.benchmarking import methods as benchmarking

    for name, spec in METHODS.items():
        assert spec.export is None or spec.export in export.KINDS, name
        if spec.benchmark is not None:
            assert issubclass(resolve(spec.benchmark), benchmarking.MethodBench), name
    assert benchmarking.METHODS == ("latent", "latent-conditional", "artifusion", "cyclegan")


def test_reading_the_table_imports_no_implementation():
    code = (
        "import sys, lightning_modules.components.restorer as r, lightning_modules.methods as m\n"
        "m.available_restorers(); m.method_spec('latent'); r.takes_sampler(object())\n"
        f"loaded = [k for k in sys.modules if k.startswith({IMPLEMENTATIONS!r})]\n"
        "assert not loaded, loaded\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize(
    "path",
    ["lightning_modules.no_such_module:factory", "lightning_modules.baselines.classical:_no_such_factory", "no_colon"],
)
def test_a_broken_factory_path_fails_on_one_line_naming_method_and_path(monkeypatch, path):
    monkeypatch.setitem(METHODS, "broken", MethodSpec(path, needs_model=False, takes_sampler=False))
    assert "broken" in available_restorers()
    with pytest.raises(ImportError) as info:
        build_restorer("broken")
    message = str(info.value)
    assert "\n" not in message and "method 'broken'" in message and repr(path) in message


class _Plugin:
    name, nfe = "plugin", 0

    def restore(self, corrupted, artifact_mask, *, generator=None):
        return corrupted.clone()

    def make_sampler(self, **_):
        raise AssertionError("callers must ask takes_sampler, not probe for make_sampler")


def test_a_plugin_joins_the_same_table(monkeypatch):
    monkeypatch.setattr(methods, "METHODS", dict(METHODS))

    @register_restorer("plugin", summary="a test plugin")
    def _factory(**_):
        return _Plugin()

    @register_restorer("plugin-model")
    def _model_factory(*, model=None, **_):
        return _Plugin()

    assert {"plugin", "plugin-model"} <= set(available_restorers())
    assert not method_spec("plugin").needs_model and method_spec("plugin-model").needs_model
    assert not method_spec("plugin").takes_sampler and method_spec("plugin").summary == "a test plugin"
    restorer = build_restorer("plugin", model=None, device="cpu")
    assert isinstance(restorer, _Plugin) and not takes_sampler(restorer)
    with pytest.raises(ValueError, match="'telea' is already registered"):
        register_restorer("telea")(_factory)


def test_the_old_import_path_still_registers_into_the_table():
    from lightning_modules.components import restorer

    assert restorer.register_restorer is register_restorer and restorer.build_restorer is build_restorer
    assert restorer.available_restorers is available_restorers
    with pytest.raises(AttributeError):
        restorer.RESTORERS  # noqa: B018
