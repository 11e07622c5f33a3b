"""Job configs are dataclasses whose defaults are the paper's recipe; command-line flags are generated from fields.

``parse(Cfg)`` turns ``--per-class 7000`` into ``Cfg(per_class=7000)``; a field's ``metadata["help"]`` is its help.
A ``tuple[X, ...]`` field takes a comma-separated list (``--models kemotionnet,resnet18``); X is int, float or str.
``asdict(cfg)`` crosses the driver→worker boundary and ``Cfg(**d)`` rebuilds it there.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import os
import signal
import subprocess
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import kemo

T = TypeVar("T")


def _scalar_type(tp: Any) -> tuple[Any, bool]:
    """(underlying type, optional?) for ``X`` or ``X | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _list_of(tp: Any) -> Any | None:
    """X for ``tuple[X, ...]`` (or ``list[X]``), else None."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return args[0]
    if origin is list and len(args) == 1:
        return args[0]
    return None


def list_parser(item: type) -> Any:
    """An argparse ``type=`` for a comma-separated list of ``item`` (empty entries dropped)."""

    def parse_list(text: str) -> tuple:
        try:
            return tuple(item(x.strip()) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {item.__name__}") from None

    parse_list.__name__ = f"list of {item.__name__}"
    return parse_list


def parser_for(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description or (cls.__doc__ or "").strip().splitlines()[0])
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        tp, _ = _scalar_type(hints[field.name])
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        default = None if required else (field.default if field.default is not dataclasses.MISSING
                                         else field.default_factory())
        help_ = field.metadata.get("help", "")
        item = _list_of(tp)
        if item in (int, float, str):
            shown = ",".join(map(str, default)) if default is not None else None
            parser.add_argument(flag, type=list_parser(item), default=default, required=required,
                                help=f"{help_} (default: {shown})" if not required else help_)
        elif tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif tp in (int, float, str):
            parser.add_argument(flag, type=tp, default=default, required=required,
                                help=f"{help_} (default: {default})" if not required else help_)
        else:
            raise TypeError(f"{cls.__name__}.{field.name}: unsupported flag type {tp!r}")
    return parser


def parse(cls: type[T], argv: list[str] | None = None) -> T:
    """Build ``cls`` from command-line flags generated from its fields; a value the config refuses (its
    ``__post_init__`` raises ValueError) is a usage error, as a wrong flag is."""
    parser = parser_for(cls)
    ns = parser.parse_args(argv)
    try:
        return cls(**vars(ns))
    except ValueError as e:
        parser.error(str(e))


def at_least(flag: str, value: float, low: float) -> None:
    """Refuse a flag below ``low`` (or not a finite number) in one line, at parse time."""
    if not math.isfinite(value) or value < low:
        raise ValueError(f"{flag} {value}: give at least {low}")


def within(flag: str, value: float, low: float, high: float) -> None:
    """Refuse a flag outside [``low``, ``high``] (or not a finite number) in one line, at parse time."""
    if not math.isfinite(value) or not low <= value <= high:
        raise ValueError(f"{flag} {value}: give a value in [{low}, {high}]")


class Stopped(RuntimeError):
    """A job that started and cannot go on, for a reason the user can act on (its message says how): ``refusals``
    ends it with that one line and exit status 1."""


class Interrupted(BaseException):
    """SIGTERM or SIGINT reached a job: raised in its main thread, so every ``with`` block (the output's lease) ends
    as it would on an error, and the job exits 128 + the signal's number (143, 130), as shells and schedulers expect.
    A BaseException: library code that catches Exception does not swallow it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def refusals() -> Iterator[None]:
    """A job's door around ``run(cfg)``: what the job refuses (a flag, an input, an output, a checkpoint: kemo raises
    ValueError or OSError for these, with the message a user needs; S3 its own errors, such as a missing bucket)
    ends it with that one line on stderr and exit status 2, not a traceback; a job that stopped (:class:`Stopped`) the
    same, with status 1; SIGTERM and SIGINT stop it cleanly (:class:`Interrupted`). ``KEMO_TRACEBACK=1`` shows the
    traceback as well."""
    from botocore.exceptions import BotoCoreError, ClientError

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _interrupt)
    try:
        yield
    except (ValueError, OSError, Stopped, ClientError, BotoCoreError) as e:
        # S3 says what is wrong in one line too ("An error occurred (NoSuchBucket) when calling ...")
        if os.environ.get("KEMO_TRACEBACK") == "1":
            raise
        logging.getLogger("kemo").debug("refused", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1 if isinstance(e, Stopped) else 2) from None
    except (Interrupted, KeyboardInterrupt, SystemExit) as e:
        # Ray's driver turns SIGTERM into sys.exit(15) once it runs: the same stop, said the same way
        signum = e.signum if isinstance(e, Interrupted) else (
            signal.SIGINT if isinstance(e, KeyboardInterrupt) else e.code if e.code == signal.SIGTERM else None)
        if signum is None:
            raise
        print(f"stopped by {signal.Signals(signum).name}: what was written is kept; run the same command again to "
              "go on", file=sys.stderr)
        _exit_now(128 + signum)


def _exit_now(status: int) -> None:
    """Exit with ``status`` once the job's own clean-up is done (the lease released by its ``with`` block): Ray
    stopped here, then no interpreter teardown, where Ray's core worker, stopped by a signal, aborted the process
    (SIGABRT, a status that says the work failed)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def code_version() -> str:
    """Package version plus the git commit of the source tree when there is one (``0.1.0+g1a2b3c4[.dirty]``)."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return kemo.__version__
    return f"{kemo.__version__}+g{sha}{'.dirty' if dirty else ''}"
