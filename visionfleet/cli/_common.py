"""Shared CLI plumbing: settings at the edge, errors as messages, progress on stderr."""

from __future__ import annotations

import functools
import json
import os
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from visionfleet.settings import ENV_HOME, Settings

__all__ = ["err", "out", "settings", "cli_errors", "progress", "print_json", "fail", "parse_float_list", "http_json"]

err = Console(stderr=True, highlight=False)
# Piped output (scripts, CI logs) gets wide tables instead of rich's 80-column default.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)

F = TypeVar("F", bound=Callable[..., Any])


def settings() -> Settings:
    """Settings from ``$VISIONFLEET_HOME`` (made absolute, and exported for child processes)."""
    s = Settings.from_env()
    os.environ[ENV_HOME] = str(s.home)
    return s


def fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def cli_errors(fn: F) -> F:
    """Turn expected failures into one clear line on stderr and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from visionfleet.imaging import ImageError

        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
        except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, ImageError) as exc:
            fail(str(exc), 2)
        except LookupError as exc:  # registry NotFound
            fail(str(exc), 2)
        except (RuntimeError, ConnectionError, TimeoutError, OSError) as exc:
            fail(f"{exc}", 1)

    return wrapper  # type: ignore[return-value]


@contextmanager
def progress(transient: bool = False) -> Iterator[Progress]:
    """A rich progress display on stderr."""
    p = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=transient,
    )
    with p:
        yield p


def print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    sys.stdout.flush()


def parse_float_list(text: str, n: int, what: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"Got {text!r} for {what}; expected {n} comma-separated numbers") from None
    if len(vals) != n:
        raise ValueError(f"Got {text!r} for {what}; expected {n} comma-separated numbers")
    return vals


def http_json(method: str, url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None,
              timeout: float = 60.0) -> Any:
    """One HTTP call with the standard library; errors become clear exceptions.

    Raises:
        RuntimeError: the server answered an error (its ``{"error"}`` text is kept).
        ConnectionError: the server could not be reached.
    """
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            msg = json.loads(exc.read()).get("error", exc.reason)
        except Exception:  # noqa: BLE001 - not our JSON: keep the reason phrase
            msg = exc.reason
        raise RuntimeError(f"server answered {exc.code}: {msg}") from None
    except urllib.error.URLError as exc:
        raise ConnectionError(f"cannot reach {url}: {exc.reason} (is `visionfleet serve up` running?)") from None
