"""Argument types shared by the entry points' parsers.

MLflow Projects substitutes parameters as typed by the user or as the YAML default renders, so an
integer may arrive as ``400.0`` and a flag as ``true``/``false``.
"""

from __future__ import annotations

import argparse


def int_arg(text: str) -> int:
    """An integer, also when written as a float ('400.0')."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    return int(value)


def bool_arg(text: str) -> bool:
    """true/false (also 1/0, yes/no), as MLflow Projects passes string flags."""
    lowered = text.lower()
    if lowered not in {"true", "false", "1", "0", "yes", "no"}:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return lowered in {"true", "1", "yes"}
