"""Ablation suites as data: the YAML files of ``experiments/ablations/`` parsed into typed, hashable rows.

A suite file holds ``name``, ``kind`` (``robustness``, ``sampler``: runnable; ``paper``, ``training``: declared only),
default ``methods``, ``evalsets`` and ``metrics``, a ``quick`` section (``tiles``, ``evalsets``), an optional
``reference`` row and its rows, either listed (``rows:``) or expanded from ``groups:``. A group varies one lever over
``values`` (its ``quick`` subset is what ``--quick`` runs):

- ``field: NAME`` sets one sampler override (a ``SamplerConfig`` field or ``scheduler``) to each value;
- ``perturbation: KIND`` perturbs the mask (``components/mask_perturb.py``) at each value, the severity;
- a value may instead be ``{label, overrides}`` (several overrides at once).

``needs: latent-space`` limits a group to pipelines with a VAE; ``needs_field: NAME`` drops the group's rows with a
note when ``SamplerConfig`` has no such field. Row names are ``GROUP-LABEL`` (``steps-10``, ``erode-4``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_modules.components.mask_perturb import KINDS
from lightning_modules.components.regional_sampler import SamplerConfig

SUITES_DIR = Path(__file__).parent / "ablations"
RUNNABLE_KINDS = ("robustness", "sampler")
KINDS_ALL = (*RUNNABLE_KINDS, "paper", "training")
SAMPLER_KEYS = frozenset({f.name for f in dataclasses.fields(SamplerConfig)} | {"scheduler"})
_SUITE_KEYS = {"name", "kind", "description", "methods", "evalsets", "metrics", "quick", "reference", "groups", "rows"}
_GROUP_KEYS = {"name", "field", "perturbation", "values", "quick", "options", "needs", "needs_field", "description"}
_ROW_KEYS = {
    "name",
    "group",
    "description",
    "methods",
    "evalsets",
    "metrics",
    "overrides",
    "perturbation",
    "train_overrides",
    "quick",
}


class SuiteError(ValueError):
    """A suite file that cannot be read or breaks the schema; the message names the file and the key."""


@dataclass(frozen=True)
class Perturbation:
    """A mask perturbation: ``kind`` (see ``mask_perturb.KINDS``), ``severity`` and ``blobs`` options."""

    kind: str = "none"
    severity: float = 0
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Row:
    """One row of a suite: what is changed, for which methods, on which evaluation sets.

    Attributes:
        name: unique within the suite (``GROUP-LABEL`` for expanded rows).
        group: the lever this row belongs to (``reference`` for the reference row).
        level: the lever's value, for plots (a severity, a step count, a label).
        overrides: sampler overrides (``SamplerConfig`` fields and ``scheduler``) for every pipeline method.
        perturbation: the mask perturbation (``none`` for sampler rows).
        methods: method names (names in the method table, ``lightning_modules/methods.py``).
        evalsets: evaluation-set names.
        metrics: ``region/metric`` names shown (the CSV has all computed ones).
        quick: whether ``--quick`` runs this row.
        needs: ``"latent-space"`` or ``""``.
        needs_field: a ``SamplerConfig`` field the row needs (``""`` = none).
        description: free text.
        train_overrides: LightningCLI overrides (training rows, declared only).
    """

    name: str
    group: str
    level: Any
    overrides: Mapping[str, Any]
    perturbation: Perturbation
    methods: tuple[str, ...]
    evalsets: tuple[str, ...]
    metrics: tuple[str, ...]
    quick: bool = True
    needs: str = ""
    needs_field: str = ""
    description: str = ""
    train_overrides: tuple[str, ...] = ()

    @property
    def missing_field(self) -> bool:
        """True when the row needs a ``SamplerConfig`` field this checkout lacks."""
        return bool(self.needs_field) and self.needs_field not in SAMPLER_KEYS

    def settings(self) -> dict[str, Any]:
        """JSON-ready settings that decide this row's results (hashed for resuming, shown by ``--dry-run``)."""
        return {
            "name": self.name,
            "group": self.group,
            "level": self.level,
            "overrides": dict(self.overrides),
            "perturbation": dataclasses.asdict(self.perturbation),
            "methods": list(self.methods),
            "evalsets": list(self.evalsets),
            "needs": self.needs,
            "train_overrides": list(self.train_overrides),
        }


@dataclass(frozen=True)
class Suite:
    """A parsed suite file.

    Attributes:
        name: suite name (the file stem).
        kind: ``robustness``, ``sampler``, ``paper`` or ``training``.
        description: free text.
        rows: every row, the reference first when there is one.
        reference: name of the row every other row is paired against (``""`` = none).
        quick_tiles: tiles per evaluation set under ``--quick``.
        quick_evalsets: evaluation sets under ``--quick`` (empty = all).
        path: the file it came from.
    """

    name: str
    kind: str
    description: str
    rows: tuple[Row, ...]
    reference: str = ""
    quick_tiles: int = 7
    quick_evalsets: tuple[str, ...] = ()
    path: Path | None = None

    @property
    def implemented(self) -> bool:
        """Whether ``experiments.ablate`` can run this suite's kind."""
        return self.kind in RUNNABLE_KINDS

    def selected(self, *, quick: bool, names: list[str] | None = None) -> list[Row]:
        """Rows to run: the ``quick`` ones under ``--quick``, restricted to ``names`` (the reference always kept).

        Raises:
            SuiteError: a name in ``names`` is not a row of this suite.
        """
        known = {r.name for r in self.rows}
        unknown = [n for n in names or [] if n not in known]
        if unknown:
            raise SuiteError(f"suite {self.name}: no row(s) {', '.join(unknown)}; rows: {', '.join(sorted(known))}")
        rows = [r for r in self.rows if r.quick or not quick]
        if names:
            rows = [r for r in rows if r.name in names or r.name == self.reference]
        if quick and self.quick_evalsets:
            rows = [
                dataclasses.replace(r, evalsets=tuple(e for e in r.evalsets if e in self.quick_evalsets) or r.evalsets)
                for r in rows
            ]
        return rows

    def with_evalsets(self, names: list[str]) -> Suite:
        """The same suite run on the evaluation sets ``names`` (the ones given on the command line) only."""
        rows = tuple(dataclasses.replace(r, evalsets=tuple(names)) for r in self.rows)
        return dataclasses.replace(self, rows=rows, quick_evalsets=tuple(names[:1]))


def settings_hash(settings: Mapping[str, Any]) -> str:
    """SHA-256 (16 hex digits) of a JSON-serialisable mapping, key order ignored."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def available_suites(root: Path = SUITES_DIR) -> list[str]:
    """Names of the suite files in ``root`` (YAML files with a top-level ``kind``; ``vae_levers.yaml`` has none)."""
    names = []
    for path in sorted(root.glob("*.yaml")):
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(data, dict) and "kind" in data:
            names.append(path.stem)
    return names


def suite_path(name: str, root: Path = SUITES_DIR) -> Path:
    """The file of suite ``name`` (a name in ``root`` or a path to a YAML file).

    Raises:
        SuiteError: no such suite.
    """
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    path = root / f"{name}.yaml"
    if name in available_suites(root):
        return path
    raise SuiteError(f"unknown suite {name!r}; available: {', '.join(available_suites(root))} (files in {root})")


def load_suite(name: str, root: Path = SUITES_DIR) -> Suite:
    """Parse a suite by name or path; every schema problem raises :class:`SuiteError` naming the file and key."""
    path = suite_path(name, root)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise SuiteError(f"{path}: cannot read the suite ({' '.join(str(err).split())})") from None
    try:
        return parse_suite(data, path)
    except (KeyError, TypeError, ValueError) as err:
        raise SuiteError(f"{path}: {' '.join(str(err).split())}") from None


def _unknown(section: str, data: Mapping, allowed: set[str]) -> None:
    extra = sorted(set(data) - allowed)
    if extra:
        raise ValueError(f"{section}: unknown key(s) {extra}; allowed: {sorted(allowed)}")


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where} must be a list of names, got {value!r}")
    return tuple(value)


def _overrides(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping of sampler settings, got {value!r}")
    unknown = sorted(set(value) - SAMPLER_KEYS)
    if unknown:
        raise ValueError(f"{where}: {unknown} are neither SamplerConfig fields nor 'scheduler'")
    return dict(value)


def _perturbation(value: Any, where: str) -> Perturbation:
    if not isinstance(value, dict) or value.get("kind") not in KINDS:
        raise ValueError(f"{where} must be {{kind: one of {list(KINDS)}, severity: N}}, got {value!r}")
    return Perturbation(value["kind"], value.get("severity", 0), dict(value.get("options", {})))


def parse_suite(data: Any, path: Path | None = None) -> Suite:
    """Build a :class:`Suite` from a loaded YAML mapping (see the module docstring for the schema).

    Raises:
        ValueError: a missing or unknown key, a bad value, or a duplicate row name.
    """
    if not isinstance(data, dict):
        raise ValueError("a suite file is a mapping with name, kind and rows or groups")
    if "kind" not in data:
        raise ValueError("no 'kind': not an ablation suite (experiments.vae_study reads vae_levers.yaml)")
    _unknown("suite", data, _SUITE_KEYS)
    if data["kind"] not in KINDS_ALL:
        raise ValueError(f"kind {data['kind']!r} is not one of {list(KINDS_ALL)}")
    defaults = {
        "methods": _strings(data.get("methods", []), "methods"),
        "evalsets": _strings(data.get("evalsets", []), "evalsets"),
        "metrics": _strings(data.get("metrics", []), "metrics"),
    }
    rows: list[Row] = []
    reference = data.get("reference")
    if reference is not None:
        rows.append(_listed_row({"group": "reference", **reference}, defaults, "reference"))
    rows += [_listed_row(r, defaults, f"rows[{i}]") for i, r in enumerate(data.get("rows") or [])]
    for i, group in enumerate(data.get("groups") or []):
        rows += _group_rows(group, defaults, f"groups[{i}]")
    if not rows:
        raise ValueError("the suite declares no rows (rows: or groups:)")
    names = [r.name for r in rows]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate row name(s) {dupes}")
    quick = data.get("quick") or {}
    _unknown("quick", quick, {"tiles", "evalsets"})
    tiles = quick.get("tiles", 7)
    if isinstance(tiles, bool) or not isinstance(tiles, int) or tiles < 1:
        raise ValueError(f"quick.tiles must be an int >= 1, got {tiles!r}")
    return Suite(
        name=str(data.get("name", path.stem if path else "suite")),
        kind=data["kind"],
        description=str(data.get("description", "")).strip(),
        rows=tuple(rows),
        reference=reference["name"] if reference is not None else "",
        quick_tiles=tiles,
        quick_evalsets=_strings(quick.get("evalsets", []), "quick.evalsets"),
        path=path,
    )


def _listed_row(row: Any, defaults: Mapping[str, tuple], where: str) -> Row:
    """A row written out in full (``rows:`` entries and the reference)."""
    if not isinstance(row, dict) or not isinstance(row.get("name"), str):
        raise ValueError(f"{where} must be a mapping with a name")
    _unknown(where, row, _ROW_KEYS)
    return Row(
        name=row["name"],
        group=row.get("group", row["name"]),
        level=row["name"],
        overrides=_overrides(row.get("overrides", {}), f"{where}.overrides"),
        perturbation=_perturbation(row.get("perturbation", {"kind": "none"}), f"{where}.perturbation"),
        methods=_strings(row.get("methods", defaults["methods"]), f"{where}.methods"),
        evalsets=_strings(row.get("evalsets", defaults["evalsets"]), f"{where}.evalsets"),
        metrics=_strings(row.get("metrics", defaults["metrics"]), f"{where}.metrics"),
        quick=bool(row.get("quick", True)),
        description=str(row.get("description", "")),
        train_overrides=_strings(row.get("train_overrides", []), f"{where}.train_overrides"),
    )


def _group_rows(group: Any, defaults: Mapping[str, tuple], where: str) -> list[Row]:
    """Expand one ``groups:`` entry into a row per value."""
    if not isinstance(group, dict) or not isinstance(group.get("name"), str) or "values" not in group:
        raise ValueError(f"{where} must be a mapping with a name and values")
    _unknown(where, group, _GROUP_KEYS)
    if ("field" in group) + ("perturbation" in group) > 1:
        raise ValueError(f"{where}: give field or perturbation, not both")
    if "field" in group and group["field"] not in SAMPLER_KEYS and group["field"] != group.get("needs_field"):
        raise ValueError(f"{where}: field {group['field']!r} is neither a SamplerConfig field nor 'scheduler'")
    if "perturbation" in group and group["perturbation"] not in KINDS:
        raise ValueError(f"{where}: perturbation {group['perturbation']!r} is not one of {list(KINDS)}")
    quick_values = group.get("quick", group["values"])
    rows = []
    for value in group["values"]:
        label, level, overrides, perturbation = _value(group, value, f"{where}.values")
        rows.append(
            Row(
                name=f"{group['name']}-{label}",
                group=group["name"],
                level=level,
                overrides=overrides,
                perturbation=perturbation,
                methods=defaults["methods"],
                evalsets=defaults["evalsets"],
                metrics=defaults["metrics"],
                quick=value in quick_values,
                needs=str(group.get("needs", "")),
                needs_field=str(group.get("needs_field", "")),
                description=str(group.get("description", "")),
            )
        )
    return rows


def _value(group: Mapping, value: Any, where: str) -> tuple[str, Any, dict, Perturbation]:
    """``(label, level, overrides, perturbation)`` of one value of a group."""
    if isinstance(value, dict):
        _unknown(where, value, {"label", "overrides"})
        label = str(value.get("label", ""))
        if not label:
            raise ValueError(f"{where}: a mapping value needs a label")
        return label, label, _overrides(value.get("overrides", {}), f"{where}.{label}"), Perturbation()
    label = str(value).lower() if isinstance(value, bool) else str(value)
    if "perturbation" in group:
        return label, value, {}, Perturbation(group["perturbation"], value, dict(group.get("options", {})))
    if "field" in group:
        return label, value, {group["field"]: value}, Perturbation()
    raise ValueError(f"{where}: scalar values need the group's field or perturbation")
