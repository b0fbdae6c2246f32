"""What the command line says when it refuses a config: one line naming the key, before any work.

jsonargparse reports a typo in a nested key (``--model.init_args.sde.init_args.TT 0.5``) as a
13-line dump of every Union alternative with the whole namespace, and argparse an unknown option
as ``unrecognized arguments``; :func:`one_line` turns both into one line with the full key and the
closest valid one (``did you mean ...``). A value a constructor refuses (:class:`ConfigError`)
is reported with its full config key (:func:`find_key`).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from difftime.utils import ConfigError

_PARSER_KEY = re.compile(r'^Parser key "([^"]+)":')
_CLASS_PATH = re.compile(r"^Problem with given class_path '([^']+)':")
_NOT_ACCEPTED = re.compile(r"^Option '([^']+)' is not accepted")
_GROUP_OPTION = re.compile(r"(Group|Subcommand) '([^']+)' does not accept option '([^']+)'")
_NOISE = ("Does not validate against", "Subtypes:", "Errors:", "- Expected a <class 'NoneType'>", "Given value type:")


class CliError(RuntimeError):
    """A problem with what the user asked for, reported as one line before any work."""


class CliFailed(Exception):
    """The command line was refused before any work; ``str()`` is the one-line reason.

    :func:`commands.cli.main` prints it as ``train.py: error: <reason>`` and exits with status 2;
    :func:`commands.cli.build_cli` raises it, so other commands (``sample.py``) report it as their own.
    """


# ---------------------------------------------------------------------- constructor errors
def find_key(config: Any, error: ConfigError, path: str = "") -> str | None:
    """Config path of the ``init_args`` entry that raised ``error`` (matched by class and key)."""
    if isinstance(config, dict):
        class_path = str(config.get("class_path", ""))
        init_args = config.get("init_args") or {}
        if error.owner and class_path.rsplit(".", 1)[-1] == error.owner and error.key in init_args:
            return f"{path}init_args.{error.key}"
        for key, value in config.items():
            found = find_key(value, error, f"{path}{key}.")
            if found:
                return found
    elif isinstance(config, (list, tuple)):
        for i, value in enumerate(config):
            found = find_key(value, error, f"{path}{i}.")
            if found:
                return found
    return None


def _chain(error: BaseException | None) -> list[BaseException]:
    seen: list[BaseException] = []
    while error is not None and all(error is not e for e in seen):
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def config_error(error: BaseException | None) -> ConfigError | None:
    """The ConfigError behind an exception (jsonargparse wraps errors raised in constructors)."""
    return next((e for e in _chain(error) if isinstance(e, ConfigError)), None)


def constructor_error(error: BaseException) -> str | None:
    """The reason a constructor gave, when jsonargparse wrapped it in a many-line Union dump.

    jsonargparse reports a ``ValueError`` raised while instantiating a ``class_path`` as one error
    per Union subtype, with the whole namespace; the constructor's own message (the innermost
    ``ValueError`` of the chain, e.g. an auxiliary prior trained at another T) is the one line
    that matters. Anything else is a bug and keeps its traceback.
    """
    innermost = _chain(error)[-1]
    if not isinstance(innermost, ValueError) or "\n" in str(innermost):
        return None
    return str(innermost)


def check_writable(directory: Path, key: str) -> None:
    """The folder (or the nearest existing parent it will be created in) must be writable."""
    existing = Path(directory).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise CliError(f"config key '{key}': the checkpoint folder {directory} cannot be created or written "
                       f"({existing} is {'not writable' if existing.is_dir() else 'not a folder'})")


# ---------------------------------------------------------------------- parser errors
def closest(word: str, choices: Iterable[str]) -> str | None:
    """The choice nearest to ``word`` (difflib ratio >= 0.6), for ``did you mean``."""
    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


def class_arguments(class_path: str) -> list[str]:
    """Names of the constructor arguments of ``class_path``, with those its ``**kwargs`` pass on to
    its base classes (empty when it cannot be imported)."""
    module, _, name = class_path.rpartition(".")
    try:
        target = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    names: list[str] = []
    for klass in inspect.getmro(target) if inspect.isclass(target) else (target,):
        try:
            parameters = list(inspect.signature(klass).parameters.values())
        except (TypeError, ValueError):
            break
        names += [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in names]
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break
    return names


def _unknown_option(key: str, option: str, owner: str) -> str:
    known = class_arguments(owner)
    match = closest(option, known)
    hint = f"; did you mean '{key.rsplit('.', 1)[0]}.{match}'?" if match else \
        (f"; its arguments: {', '.join(known)}" if known else "")
    return f"config key '{key}' is not an argument of {owner}{hint}"


def _unrecognized(line: str, options: Iterable[str]) -> str:
    """``unrecognized arguments: --trainer.max_stepz 10`` with the closest option of each."""
    options = list(options)
    unknown = [t.split("=", 1)[0] for t in line.split(":", 1)[1].split() if t.startswith("--")]
    if not unknown:
        return line
    parts = []
    for option in unknown:
        match = closest(option, options)
        parts.append(f"{option} (did you mean {match}?)" if match else option)
    return f"unrecognized option{'s' if len(parts) > 1 else ''} {', '.join(parts)}"


def _given_value(lines: list[str]) -> str | None:
    given = next((l.split("Given value:", 1)[1].strip() for l in lines if l.startswith("Given value:")), None)
    nested = re.search(r"val='([^']*)'\)$", given or "")
    return nested.group(1) if nested else given


def one_line(message: str, options: Iterable[str] = ()) -> str:
    """A jsonargparse/argparse error as one line with the full config key and, for a key that does
    not exist, the closest valid one. ``options``: the parser's option strings."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines:
        return message
    if lines[0].startswith("unrecognized arguments:"):
        return _unrecognized(lines[0], options)
    if (group := _GROUP_OPTION.search(lines[0])):  # an unknown key in a config file
        key = f"{group.group(2)}.{group.group(3)}" if group.group(1) == "Group" else group.group(3)
        prefix = f"--{key.rsplit('.', 1)[0]}." if "." in key else "--"
        match = closest(f"--{key}", [o for o in options if o.startswith(prefix)])
        return f"config key '{key}' is not accepted" + (f"; did you mean '{match[2:]}'?" if match else "")
    path: list[str] = []
    owner, pending, reason = None, False, None
    for line in lines:
        text = line[2:] if line.startswith("- ") else line
        if (match := _PARSER_KEY.match(text)):
            path += (["init_args"] if pending else []) + match.group(1).split(".")
            pending = False
        elif (match := _CLASS_PATH.match(text)):
            owner, pending = match.group(1), True
        elif (match := _NOT_ACCEPTED.match(text)):
            key = ".".join(path + (["init_args"] if pending else []) + [match.group(1)])
            return _unknown_option(key, match.group(1), owner or "?")
        elif not line.startswith(_NOISE) and not text.startswith("Given value:"):
            reason = text
    if not path:
        return " ".join(" ".join(lines).split())
    given = _given_value(lines)
    suffix = f" (given: {given})" if given and "Got value" not in (reason or "") and len(given) <= 80 else ""
    return f"config key '{'.'.join(path)}': {reason or 'invalid value'}{suffix}"
