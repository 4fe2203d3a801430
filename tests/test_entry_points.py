"""Typed entry points: each command's flags and its job dataclass agree, Python callers pass typed jobs (no entry
point builds an argument list for another), and evaluate hands every sampled method the same sampler settings."""

import argparse
import ast
import dataclasses
import re
from pathlib import Path

import pytest

from datamodules import synthesize
from experiments import ablate, benchmark, downstream, evaluate, export, restore, restore_slide, tiny_vae
from experiments.jobs import from_namespace
from tests.tiny_data import write_tiny_evalset, write_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64


@pytest.mark.parametrize(
    ("parse", "job", "argv", "required"),
    [
        (
            restore.parse_args,
            restore.RestoreJob,
            ["--images", "i", "--masks", "m", "--out", "o"],
            {"images": Path("i"), "masks": Path("m"), "out": Path("o")},
        ),
        (evaluate.parse_args, evaluate.EvaluateJob, ["--out", "o"], {"out": Path("o")}),
        (
            synthesize.parse_args,
            synthesize.SynthesisJob,
            ["--bundled", "--out", "o"],
            {"out": Path("o"), "bundled": True},
        ),
        (downstream.parse_args, downstream.DownstreamJob, ["--out", "o"], {"out": Path("o")}),
        (benchmark.parse_args, benchmark.BenchmarkJob, [], {}),
        (
            export.parse_args,
            export.ExportJob,
            ["vae", "--ckpt", "c", "--out", "o"],
            {"kind": "vae", "ckpt": Path("c"), "out": Path("o")},
        ),
        (
            restore_slide.parse_args,
            restore_slide.SlideJob,
            ["--slide", "s.tif", "--out", "o.tif", "--masks", "auto"],
            {"slide": Path("s.tif"), "out": Path("o.tif"), "masks": "auto"},
        ),
        (ablate.parse_args, ablate.AblateJob, ["--suite", "sampler"], {"suite": "sampler"}),
        (tiny_vae.parse_args, tiny_vae.TinyVaeJob, [], {}),
    ],
    ids=[
        "restore",
        "evaluate",
        "synthesize",
        "downstream",
        "benchmark",
        "export",
        "restore_slide",
        "ablate",
        "tiny_vae",
    ],
)
def test_the_parsed_flags_are_the_job_dataclass_with_its_defaults(parse, job, argv, required):
    assert parse(argv) == job(**required), "a flag default and the dataclass default disagree"


def test_from_namespace_refuses_a_flag_without_a_field_and_a_field_without_a_flag():
    ns = argparse.Namespace(**{f.name: None for f in dataclasses.fields(restore.RestoreJob)})
    assert isinstance(from_namespace(restore.RestoreJob, ns), restore.RestoreJob)
    with pytest.raises(TypeError, match="only flags \\['extra'\\]"):
        from_namespace(restore.RestoreJob, argparse.Namespace(**vars(ns), extra=1))
    del ns.seed
    with pytest.raises(TypeError, match="only fields \\['seed'\\]"):
        from_namespace(restore.RestoreJob, ns)


def test_synthesis_types_parse_to_a_tuple_and_the_typed_call_checks_the_source(tmp_path):
    assert synthesize.parse_args(["--bundled", "--types", "fold, ink", "--out", "o"]).types == ("fold", "ink")
    with pytest.raises(synthesize.CLIError, match="exactly one tile source"):
        synthesize.synthesize(synthesize.SynthesisJob(out=tmp_path / "e"))
    with pytest.raises(synthesize.CLIError, match="unknown artifact type"):
        synthesize.synthesize(synthesize.SynthesisJob(out=tmp_path / "e", bundled=True, types=("smudge",)))


def _python_files() -> list[Path]:
    return sorted(p for d in ("experiments", "datamodules", "lightning_modules") for p in (ROOT / d).rglob("*.py"))


def test_no_entry_point_builds_an_argument_list_for_another():
    offenders = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            # module.main(...) of another entry point, or module.parse_args([...]) with a built list (a command's own
            # ``parser.parse_args(argv)`` is how argparse is used, and stays)
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.args
                and isinstance(node.func.value, ast.Name)
            ):
                continue
            if node.func.attr == "main" or (
                node.func.attr == "parse_args" and isinstance(node.args[0], ast.List | ast.BinOp)
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"call the typed function instead of main/parse_args with argv: {offenders}"


TYPED = [
    "experiments/restore.py",
    "experiments/evaluate.py",
    "experiments/downstream.py",
    "experiments/benchmark.py",
    "experiments/export.py",
    "experiments/demo.py",
    "datamodules/synthesize.py",
    "datamodules/gallery.py",
]


@pytest.mark.parametrize("name", TYPED)
def test_the_entry_points_pass_typed_jobs_not_namespaces(name):
    text = (ROOT / name).read_text()
    lines = [text[: m.start()].count("\n") + 1 for m in re.finditer(r"argparse\.Namespace", text)]
    assert not lines, f"{name} lines {lines}: functions take the job dataclass; argparse stays in parse_args/main"


@pytest.fixture(scope="module")
def evalset_and_pipeline(tmp_path_factory, he_tiles):
    root = tmp_path_factory.mktemp("typed")
    return write_tiny_evalset(root / "evalset", he_tiles, 1, SIZE), write_tiny_pipeline(root / "pipeline", SIZE)


def test_evaluate_gives_every_sampled_method_the_steps_and_sampler_and_no_other(
    evalset_and_pipeline, tmp_path, monkeypatch
):
    evalset, pipeline = evalset_and_pipeline
    jobs = []

    def record(job, restorer=None):
        jobs.append(job)
        return {"done": 1, "resumed": 0, "pairs": 1, "nfe": 0, "timing": {"seconds": 1.0, "tiles": 1}, "sampler": None}

    monkeypatch.setattr(restore, "restore_folder", record)
    job = evaluate.EvaluateJob(
        out=tmp_path / "e",
        data=evalset,
        methods=f"identity,artifusion={pipeline},latent",
        model=pipeline,
        steps=3,
        sampler_set=["feather=1"],
        precision="bf16",
        seed=7,
    )
    evaluate.run_methods(job)
    by_method = {j.method: j for j in jobs}
    assert set(by_method) == {"identity", "artifusion", "latent"}
    for name in ("artifusion", "latent"):  # not only methods whose name starts with "latent"
        assert by_method[name].steps == 3 and by_method[name].sampler_set == ["feather=1"]
    assert by_method["identity"].steps is None and by_method["identity"].sampler_set == []
    assert {(j.seed, j.precision, j.batch_size) for j in jobs} == {(7, "bf16", 4)}


def test_the_typed_restore_call_takes_an_already_built_restorer(evalset_and_pipeline, tmp_path):
    from lightning_modules.methods import build_restorer

    evalset, _ = evalset_and_pipeline
    built = build_restorer("telea")
    calls = []
    original = built.restore

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    built.restore = spy
    job = restore.RestoreJob(
        images=evalset / "corrupted", masks=evalset / "masks", out=tmp_path / "r", method="telea", device="cpu"
    )
    stats = restore.restore_folder(job, restorer=built)
    assert stats["done"] == len(list((evalset / "corrupted").iterdir())) and calls
