"""What every CLI command shares: loading the app, connection options, exit codes, one-line errors.

Exit codes (documented in the README, stable for scripts):

====  ==========================================================
0     success
1     the operation ran and failed (e.g. a replay that could not confirm)
2     usage error: bad option or filter (click's own code)
3     the broker is unreachable or refused the credentials
4     not found: an id or queue that does not exist
5     configuration error: the app cannot be loaded or is invalid
====  ==========================================================
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import select
import sys
import time
from typing import TYPE_CHECKING, Any, TypeVar

import click

from queueable._app import App, load_app
from queueable._settings import Settings
from queueable.errors import ConfigurationError, QueueableError

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "EXIT_BROKER",
    "EXIT_CONFIG",
    "EXIT_FAILED",
    "EXIT_NOT_FOUND",
    "CliError",
    "app_argument",
    "cli_errors",
    "echo_json",
    "resolve_settings",
    "url_option",
]

EXIT_FAILED = 1
EXIT_BROKER = 3
EXIT_NOT_FOUND = 4
EXIT_CONFIG = 5
EXIT_PIPE = 141  # 128 + SIGPIPE, as a shell reports a command whose reader closed the pipe

F = TypeVar("F", bound="Callable[..., Any]")


class CliError(click.ClickException):
    """A one-line error with a chosen exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = exit_code

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return self.code

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True, file=file)


def cli_errors(func: F) -> F:
    """Turn library and connection errors into one clear line and a documented exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except BrokenPipeError as exc:
            if not _stdout_reader_gone():
                msg = f"broker unreachable: {_safe(exc)}"  # the broker's socket, not our output
                raise CliError(msg, EXIT_BROKER) from exc
            # The reader went away (`queueable dead list --json | head -1`): not a failure of ours to report.
            # Further writes to the closed pipe (at interpreter exit) go nowhere, and the exit code is what a
            # command killed by SIGPIPE has.
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(EXIT_PIPE) from None
        except ConfigurationError as exc:
            raise CliError(str(exc), EXIT_CONFIG) from exc
        except (ConnectionError, OSError) as exc:
            msg = f"broker unreachable: {_safe(exc)}"
            raise CliError(msg, EXIT_BROKER) from exc
        except QueueableError as exc:
            raise CliError(str(exc), EXIT_FAILED) from exc
        except Exception as exc:
            # aio-pika's connection errors do not all derive from ConnectionError.
            if _is_connection_error(exc):
                msg = f"broker unreachable: {_safe(exc)}"
                raise CliError(msg, EXIT_BROKER) from exc
            raise

    return wrapper  # type: ignore[return-value]


def _stdout_reader_gone() -> bool:
    """Whether standard output is a pipe whose reading end was closed (poll reports an error on it)."""
    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no file behind stdout (a test runner's buffer), no poll
        return False


def _is_connection_error(exc: BaseException) -> bool:
    try:
        from aiormq.exceptions import AMQPConnectionError  # noqa: PLC0415
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, AMQPConnectionError)


def _safe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__qualname__
    # Never echo credentials that a library put into its message.
    return _strip_credentials(text)


def _strip_credentials(text: str) -> str:
    import re  # noqa: PLC0415

    return re.sub(r"(amqps?://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)


def url_option(func: F) -> F:
    """``--url``: the broker URL (default ``QUEUEABLE_URL``); never echoed with its password."""
    return click.option(
        "--url",
        envvar="QUEUEABLE_URL",
        show_envvar=True,
        help="Broker URL, amqp://user:pass@host:5672/vhost (or amqps://).",
    )(func)


def app_argument(*, required: bool = False) -> Callable[[F], F]:
    """``APP``: the application as ``module:attribute`` (like uvicorn and celery -A)."""
    return click.argument("app", metavar="APP", required=required)


def resolve_settings(app_spec: str | None, url: str | None) -> tuple[App | None, Settings]:
    """Load the app (if given) and the settings it implies, with ``--url`` overriding."""
    if app_spec:
        app = load_app(app_spec)
        settings = app.settings.merged(url=url) if url else app.settings
    else:
        app = None
        settings = Settings.from_env(url=url)
    return app, settings


def echo_json(obj: Any) -> None:
    """One JSON object on one line (for ``--json`` output)."""
    click.echo(json.dumps(obj, default=str, separators=(",", ":"), ensure_ascii=False))


def configure_logging(level: str, fmt: str) -> None:
    """Text or JSON log lines on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(QuietRepeats())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aio_pika").setLevel(max(root.level, logging.WARNING))
    logging.getLogger("aiormq").setLevel(max(root.level, logging.WARNING))


class QuietRepeats(logging.Filter):
    """Collapses runs of the same aio-pika/aiormq log line: the first one, then one per ``window`` seconds.

    While the broker is down, aio-pika's robust connection retries every second and it and aiormq log two
    lines per attempt: 7,200 lines an hour of outage. A line is "the same" when it comes from the same logger
    with the same level and message template (its arguments, such as the error, may differ). The line let
    through after a quiet spell says how many were dropped. queueable's own lines are never filtered; it logs
    "reconnected" when the connection is back.
    """

    def __init__(self, window: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.window = window
        self.clock = clock
        self._runs: dict[tuple[str, int, str], list[float | int]] = {}  # key -> [last let through, dropped]

    _LIBRARIES = ("aio_pika", "aiormq")
    _MAX_RUNS = 1_000  # templates remembered; a library that logs pre-formatted text cannot grow this forever

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".", 1)[0] not in self._LIBRARIES:
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        run = self._runs.get(key)
        if run is not None and now - run[0] < self.window:
            run[1] += 1
            return False
        dropped = int(run[1]) if run is not None else 0
        if len(self._runs) >= self._MAX_RUNS and run is None:
            self._runs.clear()
        self._runs[key] = [now, 0]
        if dropped:
            # Appended to the template, so that the record's own %-arguments still apply; no % in it.
            record.msg = f"{record.msg} [{dropped} more like this since the last one shown]"
        if record.exc_info and record.levelno < logging.CRITICAL:
            # Their tracebacks are about a connection that queueable reports and recovers itself: one line.
            exc = record.exc_info[1]
            if exc is not None:
                text = f"{type(exc).__name__}: {exc}"
                record.msg = f"{record.msg} ({text.replace('%', '%%') if record.args else text})"
            record.exc_info = None
            record.exc_text = None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per log record, with any ``extra=`` fields included."""

    _standard = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": _strip_credentials(record.getMessage()),
        }
        data.update({k: v for k, v in record.__dict__.items() if k not in self._standard})
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)
