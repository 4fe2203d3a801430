"""Typed jobs of the entry points: one dataclass per command, built from its argparse namespace in ``main`` only.

Every entry point (``datamodules.synthesize``, ``experiments.restore``, ``experiments.evaluate``,
``experiments.downstream``) exposes a function that takes its job dataclass, so that Python callers (the demo, the
ablation runner, the learning curve, notebooks) call it with typed values instead of building argument lists, and a
setting cannot be lost on the way. The dataclass fields are the command's flags with the same names and defaults;
:func:`from_namespace` refuses a namespace whose keys and the fields disagree, so the two cannot drift apart (the
tests parse each command's minimal arguments and compare with the dataclass defaults).
"""

import argparse
from dataclasses import fields
from typing import TypeVar

T = TypeVar("T")


def from_namespace(cls: type[T], ns: argparse.Namespace, **converted: object) -> T:
    """``cls(**vars(ns))`` after checking that the namespace holds exactly the dataclass's fields.

    Args:
        cls: A dataclass whose field names are the command's argparse destinations.
        ns: The parsed arguments.
        **converted: Fields given in their typed form instead of the namespace's (e.g. a comma list split).

    Raises:
        TypeError: If a field has no flag or a flag no field (a programming error, caught by the tests).
    """
    names = {f.name for f in fields(cls)}
    given = set(vars(ns))
    if names != given:
        raise TypeError(
            f"{cls.__name__} fields and the command's flags disagree: only fields "
            f"{sorted(names - given)}, only flags {sorted(given - names)}"
        )
    return cls(**{**vars(ns), **converted})
