"""Helpers for the entry scripts only (demo, benchmark, fuser trainer): one-line usage errors,
presets applied as flag defaults, and user errors turned into one line and exit code 2.
The library itself never parses arguments."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import UserInputError


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem (exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def parse_with_preset(parser: argparse.ArgumentParser, argv: list[str] | None, exclude: tuple[str, ...] = ()):
    """Parse twice: a `--preset` changes the defaults (minus `exclude`), flags given explicitly still win."""
    from .presets import preset_defaults

    args = parser.parse_args(argv)
    if getattr(args, "preset", None):
        defaults = preset_defaults(args.preset, bool(getattr(args, "parallel_drafting", False)),
                                   getattr(args, "fuser_checkpoint", None))
        parser.set_defaults(**{k: v for k, v in defaults.items() if k not in exclude})
        args = parser.parse_args(argv)
    return args


def run_main(fn, *args) -> int:
    """fn(*args), with a UserInputError reported as `error: ...` on stderr and exit code 2, and
    Ctrl-C as one line and exit code 130 (results files are written atomically; an entry script that
    keeps finished work on Ctrl-C catches it itself and says where it went)."""
    try:
        return fn(*args)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl-C): nothing was saved", file=sys.stderr)
        return 130


def default_lang(environ, system_locale: str | None = None) -> str:
    """The report's language from the user's locale: zh for a Chinese one, en otherwise. As gettext
    reads it: the locale is LC_ALL, else LC_MESSAGES, else LANG; LANGUAGE (a priority list) wins over
    it unless the locale is C/POSIX. Without any of them, `system_locale` (the entry script's
    locale.getlocale()[0]: what Windows reports, e.g. 'Chinese (Simplified)_China' or 'zh_CN').
    `environ`: the entry script's os.environ."""
    def chinese(value: str) -> bool:
        value = value.strip().lower()
        return value.startswith("zh") or value.startswith("chinese")

    current = next((environ.get(n) for n in ("LC_ALL", "LC_MESSAGES", "LANG") if environ.get(n)), None)
    plain = current is not None and current.split(".")[0].upper() in ("C", "POSIX")
    language = (environ.get("LANGUAGE") or "").split(":")[0]
    if language and not plain:
        return "zh" if chinese(language) else "en"
    if current is not None:
        return "zh" if chinese(current) else "en"
    return "zh" if system_locale and chinese(system_locale) else "en"


def apply_threads(requested: int) -> int:
    """Set torch's CPU thread count: `requested`, or for 0 one per physical core (taken as half the
    logical CPUs; oversubscribed shared cores make torch collapse). Returns the count in use."""
    import torch

    if requested < 0:
        raise UserInputError(f"--threads must be >= 0 (0: one per physical core), got {requested}")
    threads = requested or max(1, (os.cpu_count() or 2) // 2)
    torch.set_num_threads(threads)
    return threads
