"""Step configs: one dataclass per entry point declares each parameter once, with its default and
help. The click command line (``harness.cli``), the MLproject's parameters and the argv a
launcher passes on are all made from it, and ``check()`` refuses a bad value before any work.

    @dataclass
    class GenerateConfig(StepConfig):
        n_per_prompt: int = param(100, "images per prompt", project=True)

        def check(self):
            self.at_least(1, "n_per_prompt")

MLflow Projects substitutes parameters as typed by the user or as the YAML default renders, so an
integer may arrive as ``400.0`` and a flag as ``true``/``false``: the option types accept both.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from typing import Any, Callable, TypeVar

import click

C = TypeVar("C", bound="StepConfig")


class ConfigError(ValueError):
    """A parameter value a step refuses; the message names the option."""


def param(default: Any = dataclasses.MISSING, help: str = "", *, choices: typing.Sequence[str] | None = None,
          project: bool = False, key: bool = True) -> Any:
    """A config field. ``project``: an MLproject parameter of the entry point; ``key``: part of the
    run's identity (what is learned), as opposed to where it is written or how often it logs."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "project": project,
                                                        "key": key})


class IntLike(click.ParamType):
    """An integer, also when written as a float ('400.0')."""
    name = "integer"

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"expected an integer, got {value!r}", param, ctx)
        if not number.is_integer():
            self.fail(f"expected an integer, got {value!r}", param, ctx)
        return int(number)


class OrNone(click.ParamType):
    """``inner``, or None from the empty string (what MLflow Projects renders for 'no value')."""

    def __init__(self, inner: click.ParamType):
        self.inner, self.name = inner, inner.name

    def convert(self, value, param, ctx):
        return None if value is None or value == "" else self.inner.convert(value, param, ctx)


INT, BOOL = IntLike(), click.BOOL
_CLICK_TYPES = {int: INT, float: click.FLOAT, str: click.STRING, bool: BOOL}


def field_type(cls: type, f: dataclasses.Field) -> tuple[type, bool]:
    """(base type, may be None) of a field's annotation."""
    hint = typing.get_type_hints(cls)[f.name]
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return inner, True
    return hint, False


@dataclasses.dataclass
class StepConfig:
    """Base of every step's config: checked on construction, so a config that exists is valid."""

    def __post_init__(self):
        for f in self.options():  # the command line checks choices too; a config made in code must as well
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"--{f.name} {getattr(self, f.name)!r}: choose one of {', '.join(choices)}")
        self.check()

    def check(self) -> None:
        """Raise ``ConfigError`` naming the option of the first value the step cannot use."""

    # ------------------------------------------------------------------ checks for subclasses

    def at_least(self, low: float, *names: str) -> None:
        if bad := [n for n in names if not getattr(self, n) >= low]:
            raise ConfigError(", ".join(f"--{n} {getattr(self, n)}" for n in bad) + f": must be at least {low}")

    def not_negative(self, *names: str) -> None:
        if bad := [n for n in names if not getattr(self, n) >= 0]:
            raise ConfigError(", ".join(f"--{n} {getattr(self, n)}" for n in bad) + ": must not be negative")

    def positive(self, *names: str) -> None:
        if bad := [n for n in names if not (math.isfinite(getattr(self, n)) and getattr(self, n) > 0)]:
            raise ConfigError(", ".join(f"--{n} {getattr(self, n)}" for n in bad) + ": must be positive")

    def within(self, name: str, low: float, high: float, *, high_open: bool = False) -> None:
        value = getattr(self, name)
        if not (low <= value < high if high_open else low <= value <= high):
            raise ConfigError(f"--{name} {value}: must be in [{low}, {high}{')' if high_open else ']'}")

    # ------------------------------------------------------------------ views of the values

    @classmethod
    def options(cls) -> list[dataclasses.Field]:
        """The fields a user sets (not the ones ``__post_init__`` derives)."""
        return [f for f in dataclasses.fields(cls) if f.init]

    def params(self) -> dict[str, Any]:
        """Every option's value, as logged to the step's MLflow run."""
        return {f.name: getattr(self, f.name) for f in self.options()}

    def key_params(self) -> dict[str, Any]:
        """The values that decide what the step computes: a run's identity for resume and reuse."""
        return {f.name: getattr(self, f.name) for f in self.options() if f.metadata.get("key", True)}

    def replace(self: C, **changes) -> C:
        return dataclasses.replace(self, **changes)

    def to_argv(self) -> list[str]:
        """The command line that parses back to this config (for a launcher's subprocess)."""
        argv = []
        for f in self.options():
            value = getattr(self, f.name)
            if value != f.default:
                argv += [f"--{f.name}", "" if value is None else str(value).lower() if isinstance(value, bool)
                         else str(value)]
        return argv


# ---------------------------------------------------------------------------------- command line


def click_params(cls: type[StepConfig], fixed: dict | None = None) -> list[click.Option]:
    """One ``--name`` option per field of ``cls`` (but the ``fixed`` ones), with its default shown."""
    options = []
    for f in cls.options():
        if fixed and f.name in fixed:
            continue
        base, nullable = field_type(cls, f)
        kind = click.Choice(list(f.metadata["choices"])) if f.metadata.get("choices") else _CLICK_TYPES[base]
        if nullable:
            kind = OrNone(kind)
        extra = {"is_flag": False, "flag_value": True} if base is bool else {}  # `--x` alone or `--x true`
        required = f.default is dataclasses.MISSING
        if not required:  # a required option gets no default at all: click 8.3+ takes None for a given value
            extra["default"] = f.default
        options.append(click.Option([f"--{f.name}", f.name], type=kind, required=required,
                                    show_default=not required, help=f.metadata.get("help") or None, **extra))
    return options


def command(cls: type[C], run: Callable[[C], Any], name: str | None = None, help: str | None = None,
            fixed: dict | None = None) -> click.Command:
    """A click command that builds ``cls`` from its options (plus ``fixed``) and calls ``run``."""
    def callback(**values):
        try:
            config = cls(**values, **(fixed or {}))
        except ConfigError as err:
            raise click.UsageError(str(err)) from None
        return run(config)

    return click.Command(name, params=click_params(cls, fixed), callback=callback, help=help,
                         context_settings={"show_default": True, "max_content_width": 110})


def parse(cls: type[C], argv: list[str] | None = None, prog: str | None = None, **fixed) -> C:
    """``cls`` from a command line, as ``argparse.parse_args`` would: bad input prints the usage
    and the problem and exits 2; ``--help`` prints the options and exits 0."""
    cmd = command(cls, lambda config: config, name=prog, help=_doc(cls), fixed=fixed)
    try:
        config = cmd.main(args=sys.argv[1:] if argv is None else list(argv), prog_name=prog,
                          standalone_mode=False)
    except click.ClickException as err:
        err.show()
        raise SystemExit(err.exit_code) from None
    except click.exceptions.Abort:
        raise SystemExit(1) from None
    if not isinstance(config, cls):  # --help: click printed it and returned the exit code
        raise SystemExit(config or 0)
    return config


def _doc(cls: type) -> str | None:
    module = sys.modules.get(cls.__module__)
    return (module.__doc__ or "").split("\n\n")[0] or None if module else None

