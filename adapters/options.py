"""Command-line flags from typed fields, shared by ``caveat-train`` (dataclass fields) and ``caveat-serve``
(pydantic settings): one reading of an annotation and one way to add a flag."""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any


def scalar_type(annotation: Any) -> tuple[Any, bool, bool]:
    """``(scalar type, is a list, is optional)`` of a field annotation: ``list[str] | None`` →
    ``(str, True, True)``."""
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation, optional = args[0], len(args) < len(typing.get_args(annotation))
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True, optional
    return annotation, False, optional


def comma_list(value: str) -> list[str]:
    """``"a, b,"`` → ``["a", "b"]``."""
    return [part.strip() for part in value.split(",") if part.strip()]


def add_flag(
    group: Any, name: str, kind: Any, *, is_list: bool = False, metavar: str | None = None, **options: Any
) -> None:
    """``--name`` on a parser or argument group: ``--name/--no-name`` for a bool, a comma-separated list for a
    list, else one value converted by ``kind`` (``options``: ``dest``, ``default``, ``help``)."""
    flag = f"--{name}"
    if kind is bool:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
    elif is_list:
        group.add_argument(flag, type=comma_list, metavar=metavar, **options)
    else:
        group.add_argument(flag, type=kind, metavar=metavar, **options)
