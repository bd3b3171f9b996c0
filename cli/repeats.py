"""Refuse an option given twice.

Why: click keeps the last value of a repeated single-value option without a word, so
``featcache fit --seed 1 ... --seed 2`` (a long command edited by appending) recorded seed 2 while the
user read seed 1 at the start of the line. Options meant to repeat (``--tag``, ``--grid``) are left alone.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from featcache.errors import ConfigError

# Typed as Any: typer 0.2x vendors its own click (typer._click), a private module; these are click's
# public Command/Option attributes (params, opts, secondary_opts, is_flag, multiple, nargs, commands).


def _options(command: Any) -> dict[str, Any]:
    """Every spelling of each option of ``command`` (``--inspect`` and ``--no-inspect`` are one option)."""
    names: dict[str, Any] = {}
    for param in command.params:
        if param.param_type_name == "option":
            for name in (*param.opts, *param.secondary_opts):
                names[name] = param
    return names


def check_repeated_options(root: Any, argv: Sequence[str]) -> None:
    """ConfigError naming the first single-value option that ``argv`` (strings: run() converts the Path
    objects tests pass) gives more than once.

    Walks the command path as click does (group, subcommand, its options); unknown tokens are skipped, so
    click still reports them in its own words. ``--help`` (or ``-h``) anywhere disables the check.
    """
    if "--help" in argv or "-h" in argv:
        return
    command, options = root, _options(root)
    seen: dict[str, list[str]] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token == "--":
            break
        if token.startswith("--"):
            name, _, _ = token.partition("=")
            param = options.get(name)
            if param is None:
                return  # an unknown option: click's own message names it
            value = argv[i:i + param.nargs] if not param.is_flag and "=" not in token else []
            i += len(value)  # its value(s), which may look like an option
            if not param.multiple:
                seen.setdefault(param.opts[0], []).append(" ".join([token, *value]))
        elif token in (getattr(command, "commands", None) or {}):
            command = command.commands[token]
            options = _options(command)  # (a group's options come before its subcommand's name)
    for first, spelled in seen.items():
        if len(spelled) > 1:
            times = "twice" if len(spelled) == 2 else f"{len(spelled)} times"
            raise ConfigError(f"{first} was given {times} ({', '.join(spelled)}); give it once "
                              "(the last one would win without a word).")
