"""The research scripts' distillation flags, mapped onto :class:`DistillConfig` and run settings.

:func:`parse_authors_flags` parses a command line of ``distill_repblend.py`` (RepBlend),
``distill_tesla_lors.py`` (LoRS) or VL-distill's ``distill.py`` (MTT-VL) with that script's own
parser (:func:`authors_parser`: flags, types, defaults and choices from
:mod:`~repblend_fast.compat.flag_specs`) and maps every flag by its entry in :data:`RULES`
(:mod:`~repblend_fast.compat.flag_rules`): a ``field`` of the config, a ``setting`` of the run
(data, encoders, paths), ``logging`` only or ``ignored`` (accepted, warned about once when
given), or ``refused`` (an error with the reason).

Some accepted flags refuse particular values (``--pix_init noise``, unequal ``--momentum_*``,
``--max_files 1``, ...): the rule says which and why. Several of their booleans are declared
``type=bool``, so ``--flag False`` is *true* in their scripts; the shim reproduces that and
warns, so a published script means here what it meant there.

The tables' names (:data:`FLAG_KINDS`, :data:`RULES`, :data:`SCRIPTS`, :func:`flag_table`,
:func:`script_flags`, ``IMAGE_ENCODER_ALIASES``, ``local_image_weights``, ``local_text_model``)
are importable from here too.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from repblend_fast.compat.encoder_names import (
    IMAGE_ENCODER_ALIASES,
    local_image_weights,
    local_text_model,
)
from repblend_fast.compat.flag_rules import (
    FLAG_KINDS,
    RULES,
    FlagRule,
    RefusedValue,
    flag_table,
    implied_fields,
)
from repblend_fast.compat.flag_specs import PARSER_SPECS, SCRIPTS, script_flags
from repblend_fast.config import DistillConfig
from repblend_fast.methods import METHOD_REGISTRY, get_method

__all__ = [
    "FLAG_KINDS",
    "IMAGE_ENCODER_ALIASES",
    "RULES",
    "SCRIPTS",
    "AuthorsFlagError",
    "AuthorsRun",
    "FlagRule",
    "authors_parser",
    "flag_table",
    "local_image_weights",
    "local_text_model",
    "parse_authors_flags",
    "script_flags",
]

_FALSEY_STRINGS = {"false", "0", "no", "off", "none", "f", "n"}


class AuthorsFlagError(ValueError):
    """A flag (or value) the shim refuses; the message names the flag and the reason."""


# ----------------------------------------------------------------------------- parsing
class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so every bad flag is one line (exit 2)."""

    def error(self, message: str):  # noqa: D102 - argparse API
        raise AuthorsFlagError(f"{self.prog}: {message}")


def authors_parser(script: str, prog: str | None = None) -> argparse.ArgumentParser:
    """Their distillation parser for ``script`` (flags, types, choices, defaults), raising
    :class:`AuthorsFlagError` on a bad flag. Abbreviated flags are not accepted."""
    if script not in PARSER_SPECS:
        raise AuthorsFlagError(f"unknown script {script!r}; choose one of {sorted(PARSER_SPECS)}")
    p = _Parser(prog=prog or f"authors {script}", allow_abbrev=False, add_help=False)
    for name, typ, default, choices in PARSER_SPECS[script]:
        if typ == "store_true":
            p.add_argument(f"--{name}", action="store_true", default=default)
        else:
            p.add_argument(f"--{name}", type=typ, default=default, choices=choices)
    return p


def _given(argv: list[str]) -> list[str]:
    names = []
    for tok in argv:
        if tok.startswith("--") and len(tok) > 2:
            names.append(tok[2:].split("=", 1)[0])
    return names


def _raw_values(argv: list[str], name: str) -> list[str]:
    """The strings given for ``--name`` on the command line (``--name=v`` or ``--name v``)."""
    out = []
    for i, tok in enumerate(argv):
        if tok == f"--{name}" and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif tok.startswith(f"--{name}="):
            out.append(tok.split("=", 1)[1])
    return out


@dataclass
class AuthorsRun:
    """The outcome of parsing one of their command lines.

    ``values`` are their parsed flags (their names), ``fields`` the DistillConfig fields they set
    (plus what the script's code implies), ``settings`` the run settings (data, encoders, paths),
    ``rows`` the mapping as printable ``(source, target, note)`` triples and ``warnings`` one
    line per logging-only, ignored or type=bool flag that was given.
    """

    script: str
    values: dict[str, Any]
    given: list[str]
    fields: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    rows: list[tuple[str, str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def config(self, **overrides: Any) -> DistillConfig:
        """The run's validated :class:`DistillConfig` (``overrides`` last, e.g. from --set)."""
        method = overrides.get("method", self.fields["method"])
        entry = METHOD_REGISTRY.get(method)
        merged = {**(entry.defaults if entry else {}), **self.fields, **overrides}
        try:
            return DistillConfig.from_dict(merged).validate()
        except (TypeError, ValueError) as exc:
            raise AuthorsFlagError(f"{exc} (from the flags of {SCRIPTS[self.script]})") from None

    @property
    def output_dir(self) -> Path:
        """Their output location: ``logged_files/<dataset>/<name>`` (without wandb's timestamp,
        so that the same command finds its run again)."""
        name = str(self.values["name"]).replace(":", "-").replace("/", "-")
        return Path("logged_files") / str(self.values["dataset"]) / name


def parse_authors_flags(script: str, argv: list[str]) -> AuthorsRun:
    """Parse ``argv`` with ``script``'s parser and map every flag (see the module docstring).

    Raises :class:`AuthorsFlagError` for an unknown flag, a bad value, or a refused flag/value
    (naming the flag and why).
    """
    ns = authors_parser(script).parse_args(argv)
    values = vars(ns)
    given = _given(argv)
    run = AuthorsRun(script, values, given)
    specs = {s[0]: s for s in PARSER_SPECS[script]}
    warned: set[str] = set()
    for name, (_, typ, _default, _choices) in specs.items():
        rule = RULES[name]
        v = values[name]
        is_given = name in given
        if typ is bool and is_given:
            raw = [s for s in _raw_values(argv, name) if s.strip().lower() in _FALSEY_STRINGS]
            if raw:
                run.warnings.append(
                    f"--{name} {raw[0]}: their parser declares it type=bool, so any non-empty "
                    f"string (even {raw[0]!r}) is True there; reproduced: {name}={v}"
                )
        try:
            out = rule.convert(v, values, script) if rule.convert is not None else v
        except RefusedValue as why:
            raise AuthorsFlagError(f"--{name} {v}: not supported: {why}") from None
        if rule.kind == "refused" and is_given:
            raise AuthorsFlagError(f"--{name}: not supported: {rule.note or 'see the table'}")
        if rule.kind == "field":
            run.fields[rule.target] = out
            run.rows.append((f"--{name} {v}", f"{rule.target} = {out!r}", rule.note))
        elif rule.kind == "setting":
            run.settings[rule.target] = out
            run.rows.append((f"--{name} {v}", f"setting {rule.target} = {out!r}", rule.note))
        elif is_given and name not in warned:
            warned.add(name)
            what = "logging only" if rule.kind == "logging" else "no effect in their script"
            run.warnings.append(f"--{name}: {what} ({rule.note}); accepted and not used")
    for fld, value, why in implied_fields(script):
        run.fields[fld] = value
        run.rows.append((f"({SCRIPTS[script]})", f"{fld} = {value!r}", why))
    if not get_method(script).blends:
        run.fields.pop("blend_alpha", None)
    return run
