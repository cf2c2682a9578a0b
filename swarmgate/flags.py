"""Flags declared once, and the argparse options, settings and child command lines made
from them.

A process's settings field carries its flag as plain data in its metadata (the settings
modules import nothing of the command line); `Flag.of` reads it:

- ``flag``: the name. Without ``help``, the field takes the flag another field declares
  (a gateway's ``--device`` is the one a node's settings declare).
- ``help``; ``default`` (else the field's; a field with neither is a required flag);
  ``env`` (else ``SWARMGATE_`` and the name, or None for no variable); ``check``:
  ``positive``, ``non_negative``, ``device`` or ``blocks``; ``choices``; ``metavar``;
  ``repeat`` (a list flag given once per value).
- ``local: False``: ``swarmgate up`` does not offer it (its processes would share one port,
  one identity). ``secret: True``: ``up`` hands it to its child in the environment, never on
  a command line, which every user of the machine can read.

Every flag reads its default from its variable, in one way (`default_of`): a switch is on
unless the value is empty, 0, false or no; a list splits on spaces and commas; anything
else is checked as the flag is, and a bad value is an argparse error naming the variable.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FlagValue = str | int | float | bool | tuple[str, ...] | tuple[int, int] | None
# An unset flag's own default: None, or a value of the flag's kind.
_FALSE_WORDS = ("", "0", "false", "no")


@dataclass(frozen=True)
class Flag:
    name: str  # "--max-queue"
    help: str
    default: FlagValue = None
    env: str | None = ""  # "": SWARMGATE_ and the name; None: no variable
    parse: Callable[[str], object] = str  # one word → its value; raises on a bad one
    choices: tuple[str, ...] = ()
    words: bool = False  # takes one or more words: a tuple of them
    repeat: bool = False  # words given by repeating the flag (--api-key A --api-key B)
    switch: bool = False  # takes no value: True when given
    required: bool = False  # unless its variable is set
    metavar: str | None = None
    field: str | None = None  # the settings field it fills
    local: bool = True  # offered by `swarmgate up`
    secret: bool = False  # never on a child's command line

    def __post_init__(self) -> None:
        if self.env == "":
            derived = "SWARMGATE_" + self.name.removeprefix("--").upper().replace("-", "_")
            object.__setattr__(self, "env", derived)
        if self.switch and self.default is None:
            object.__setattr__(self, "default", False)

    @property
    def dest(self) -> str:
        """The attribute argparse stores it in: ``--max-queue`` → ``max_queue``."""
        return self.name.removeprefix("--").replace("-", "_")

    @property
    def inverts(self) -> bool:
        """A ``--no-X`` switch turns a field that is on by default off."""
        return self.switch and self.name.startswith("--no-")

    @classmethod
    def of(cls, settings: type, spec: dataclasses.Field[Any]) -> Flag:
        """The flag a settings field declares (its metadata has a ``help``)."""
        meta = spec.metadata
        hint = typing.get_type_hints(settings)[spec.name]
        kind = _unwrap_optional(hint)
        default = meta.get("default", spec.default)
        required = default is dataclasses.MISSING  # a field without a default: a must
        if required:
            default = None
        flag = cls(
            name=meta["flag"],
            help=meta["help"],
            default=default,
            env=meta.get("env", ""),
            choices=tuple(meta.get("choices", ())),
            repeat=bool(meta.get("repeat", False)),
            metavar=meta.get("metavar"),
            field=spec.name,
            local=bool(meta.get("local", True)),
            secret=bool(meta.get("secret", False)),
            required=required,
        )
        if kind is bool:
            if flag.name.startswith("--no-") != (default is True):
                raise TypeError(f"{settings.__name__}.{spec.name}: on by default iff --no-")
            return dataclasses.replace(flag, switch=True, default=False)
        if kind == tuple[str, ...]:
            return dataclasses.replace(flag, words=True)
        return dataclasses.replace(flag, parse=_parser(kind, meta.get("check"), flag.choices))

    def with_help(self, text: str) -> Flag:
        return dataclasses.replace(self, help=text)

    def needed(self) -> Flag:
        return dataclasses.replace(self, required=True)

    def help_text(self) -> str:
        """Its help, with its default and its variable (argparse %-formats help)."""
        notes = []
        if self.default not in (None, False, (), ""):
            notes.append(f"default: {_shown(self.default)}")
        if self.env:
            notes.append(f"env {self.env}")
        suffix = f" ({'; '.join(notes)})".replace("%", "%%") if notes else ""
        return self.help + suffix


def _shown(value: FlagValue) -> str:
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def settings_flags(settings: type) -> list[Flag]:
    """The flags a settings class declares, in field order."""
    return [
        Flag.of(settings, spec)
        for spec in dataclasses.fields(settings)
        if "flag" in spec.metadata and "help" in spec.metadata
    ]


def flag_fields(settings: type) -> dict[str, str]:
    """Each flagged field of a settings class → its flag's name, declared there or not."""
    return {
        spec.name: spec.metadata["flag"]
        for spec in dataclasses.fields(settings)
        if "flag" in spec.metadata
    }


class FromEnv(str):
    """A default read from an environment variable: argparse checks a string default with
    the flag's ``type`` when the flag is not given, and the error then names the variable."""

    variable = ""

    @classmethod
    def of(cls, variable: str, value: str) -> FromEnv:
        text = cls(value)
        text.variable = variable
        return text


def default_of(flag: Flag, environ: Mapping[str, str]) -> object:
    """The flag's default: its variable's value where it is set and not empty, else its own."""
    raw = environ.get(flag.env) if flag.env else None
    if raw is None or not raw.strip():
        return list(flag.default) if isinstance(flag.default, tuple) else flag.default
    if flag.switch:
        return raw.strip().lower() not in _FALSE_WORDS
    if flag.words or flag.repeat:
        return raw.replace(",", " ").split()
    assert flag.env is not None
    return FromEnv.of(flag.env, raw)


def add_flags(
    parser: argparse.ArgumentParser,
    flags: Iterable[Flag],
    environ: Mapping[str, str] = os.environ,
) -> None:
    for flag in flags:
        default = default_of(flag, environ)
        if flag.switch:
            parser.add_argument(
                flag.name, action="store_true", default=default, help=flag.help_text()
            )
            continue
        required = flag.required and default in (None, [])
        if flag.words or flag.repeat:
            parser.add_argument(
                flag.name,
                nargs=None if flag.repeat else "+",
                action="append" if flag.repeat else "store",
                default=default,
                required=required,
                metavar=flag.metavar,
                help=flag.help_text(),
            )
            continue
        parser.add_argument(
            flag.name,
            type=_reporting(flag),
            choices=flag.choices or None,
            default=default,
            required=required,
            metavar=flag.metavar,
            help=flag.help_text(),
        )


def settings_values(
    settings: type, flags: Mapping[str, Flag], args: argparse.Namespace
) -> dict[str, Any]:
    """What the parsed flags give a settings class's flagged fields, as keyword arguments."""
    values: dict[str, Any] = {}
    for name, flag_name in flag_fields(settings).items():
        flag = flags[flag_name]
        value = getattr(args, flag.dest)
        if flag.inverts:
            value = not value
        elif flag.words or flag.repeat:
            value = tuple(value or ())
        values[name] = value
    return values


def command_line(flag: Flag, value: object) -> list[str]:
    """The words that give a child process ``value`` for ``flag`` (none for an unset one)."""
    if value is None or value is False or value == [] or value == ():
        return []
    if flag.switch:
        return [flag.name]
    if isinstance(value, (list, tuple)) and flag.words:
        return [flag.name, *(str(v) for v in value)]
    if isinstance(value, tuple):  # --blocks
        return [flag.name, ":".join(str(v) for v in value)]
    return [flag.name, str(value)]


def unique(flags: Iterable[Flag]) -> Iterator[Flag]:
    """Each flag once, the first of each name."""
    seen: set[str] = set()
    for flag in flags:
        if flag.name not in seen:
            seen.add(flag.name)
            yield flag


# ---- checking one word ----


def _unwrap_optional(hint: object) -> object:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else hint
    return hint


def _parser(kind: object, check: str | None, choices: Sequence[str]) -> Callable[[str], object]:
    if choices:
        return _one_of(tuple(choices))
    if check is None and kind in (str, int, float, Path):
        return typing.cast(Callable[[str], object], kind)
    parsers: dict[tuple[object, str | None], Callable[[str], object]] = {
        (int, "positive"): positive_int,
        (float, "positive"): positive_float,
        (float, "non_negative"): non_negative_float,
        (str, "device"): device,
        (tuple[int, int], "blocks"): blocks,
    }
    try:
        return parsers[(kind, check)]
    except KeyError:
        raise TypeError(f"no way to read a {kind} flag with check {check!r}") from None


def _reporting(flag: Flag) -> Callable[[str], object]:
    """The flag's ``parse``, whose errors say what was wrong and, for a value from the
    environment, which variable held it (argparse adds the flag's name)."""

    def parse(text: str) -> object:
        try:
            return flag.parse(text)
        except (ValueError, argparse.ArgumentTypeError) as e:
            reason = str(e) if isinstance(e, argparse.ArgumentTypeError) else f"bad value {text!r}"
            if isinstance(text, FromEnv):
                reason = f"{text.variable}={str(text)!r}: {reason}"
            raise argparse.ArgumentTypeError(reason) from None

    return parse


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return number


def positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value}")
    return number


def non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return number


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    """Checks the value itself: argparse checks ``choices`` on what was typed, not on a
    default from the environment, so a typo there would only fail at load time."""

    def check(value: str) -> str:
        if value not in choices:
            raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(choices)}")
        return str(value)

    return check


def device(value: str) -> str:
    """A ``--device`` spelled as torch spells devices; whether this machine has it is
    checked when the process starts (models/devices.py), with a message saying why not."""
    spec = value.strip().lower()
    kind, _, index = spec.partition(":")
    if spec in ("auto", "cpu", "cuda", "mps") or (kind == "cuda" and index.isdigit()):
        return spec
    raise argparse.ArgumentTypeError(f"{value!r} is not one of auto, cpu, cuda, cuda:N, mps")


def blocks(value: str) -> tuple[int, int]:
    try:
        start, end = (int(part) for part in value.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--blocks wants START:END, got {value!r}") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"--blocks {value}: need 0 <= START < END")
    return start, end
