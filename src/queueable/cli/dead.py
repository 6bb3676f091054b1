"""``queueable dead ...``: list, show, replay, purge, export and import dead letters.

A thin layer over :class:`queueable._deadletters.DeadLetterAdmin`; see ``docs/operations.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

import click

from queueable._deadletters import (
    GROUP_KEYS,
    TABLE_COLUMNS,
    DeadFilter,
    DeadLetterAdmin,
    DeadMessage,
    DryRunResult,
    ExportFormatError,
    QueueNotFoundError,
    decode_export_line,
    format_table,
    group_counts,
    parse_since,
    table_row,
)
from queueable.cli._common import (
    EXIT_FAILED,
    EXIT_NOT_FOUND,
    CliError,
    cli_errors,
    echo_json,
    resolve_settings,
    url_option,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Iterator
    from types import TracebackType

    from queueable._app import App

__all__ = ["dead"]

#: Our own usage errors are one line, like every other error (click's parser errors keep click's format).
EXIT_USAGE = 2

F = TypeVar("F", bound="Callable[..., Any]")
T = TypeVar("T")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def dead() -> None:
    """Inspect and act on dead letters: the messages a listener could not handle.

    Every command reads each dead-letter queue completely and puts back what it does not remove, in the same
    order. Filters combine with AND; patterns accept shell wildcards (mailer:*).

    \b
    Exit codes: 0 done, 1 failed (or --dry-run found failures, or another dead command
    holds the queue), 2 usage, 3 broker unreachable, 4 not found, 5 configuration.
    """


# -- shared options ---------------------------------------------------------------------------------------


def app_option(func: F) -> F:
    """``--app``: the application (module:attribute); gives the queues and, for --dry-run, the code."""
    return click.option(
        "--app",
        "app_spec",
        envvar="QUEUEABLE_APP",
        show_envvar=True,
        metavar="APP",
        help="Your application as module:attribute; its queues are the ones examined.",
    )(func)


def filter_options(func: F) -> F:
    """The filters every dead-letter command accepts."""
    options = [
        click.option(
            "--queue",
            "queues",
            multiple=True,
            metavar="Q",
            help="Work queue (or its .dead queue); repeatable. Default: the app's queues, else QUEUEABLE_QUEUE.",
        ),
        click.option("--listener", metavar="PATTERN", help="Listener id, e.g. mailer:notify_author or mailer:*."),
        click.option("--event", metavar="PATTERN", help="Event wire name."),
        click.option("--error", metavar="PATTERN", help="Exception type, qualified or not (TimeoutError)."),
        click.option("--reason", metavar="PATTERN", help="Dead reason (schema, delivery_limit...)."),
        click.option(
            "--since", metavar="AGE|TIME", help="Dead-lettered within 30m, 2h, 1d... or since an ISO 8601 time."
        ),
        click.option("--limit", type=click.IntRange(min=1), help="At most this many dead letters."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _filter(
    *,
    ids: tuple[str, ...],
    listener: str | None,
    event: str | None,
    error: str | None,
    reason: str | None,
    since: str | None,
) -> DeadFilter:
    moment = None
    if since is not None:
        try:
            moment = parse_since(since)
        except ValueError as exc:
            msg = f"--since: {exc}"
            raise CliError(msg, EXIT_USAGE) from None
    return DeadFilter(ids=frozenset(ids), listener=listener, event=event, error=error, reason=reason, since=moment)


def _admin(app_spec: str | None, url: str | None, queues: tuple[str, ...]) -> tuple[App | None, DeadLetterAdmin]:
    app, settings = resolve_settings(app_spec, url)
    if app is not None:
        return app, DeadLetterAdmin(settings, list(queues) or app.provider.all_queue_names)
    return None, DeadLetterAdmin(settings, list(queues))


def quiet_client_logs() -> None:
    """aio-pika/aiormq log connection failures themselves; the command reports them once, as one line."""
    for name in ("aiormq", "aio_pika"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _run(admin: DeadLetterAdmin, work: Callable[[DeadLetterAdmin], Coroutine[Any, Any, T]]) -> T:
    quiet_client_logs()

    async def main() -> T:
        async with admin:
            return await work(admin)

    try:
        return asyncio.run(main())
    except QueueNotFoundError as exc:
        raise CliError(str(exc), EXIT_NOT_FOUND) from exc
    finally:
        for warning in dict.fromkeys(admin.warnings):
            click.echo(f"warning: {warning}", err=True)


class _Progress:
    """A click progress bar on stderr, only when stderr is a terminal and the run is long enough."""

    def __init__(self, label: str, length: int, *, enabled: bool) -> None:
        self._bar: Any = None
        if enabled and length > 1 and sys.stderr.isatty():
            self._bar = click.progressbar(length=length, label=label, file=sys.stderr)

    def __enter__(self) -> Callable[[DeadMessage], None]:
        if self._bar is not None:
            self._bar.__enter__()
        return self.step

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.__exit__(exc_type, exc, tb)

    def step(self, _message: DeadMessage) -> None:
        if self._bar is not None:
            self._bar.update(1)


# -- list -------------------------------------------------------------------------------------------------


@dead.command("list")
@click.argument("app_arg", metavar="[APP]", required=False)
@app_option
@url_option
@filter_options
@click.option("--group-by", type=click.Choice(GROUP_KEYS), help="Counts per group instead of the letters.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@cli_errors
def list_(  # noqa: PLR0917 - click passes each option as an argument
    app_arg: str | None,
    app_spec: str | None,
    url: str | None,
    queues: tuple[str, ...],
    listener: str | None,
    event: str | None,
    error: str | None,
    reason: str | None,
    since: str | None,
    limit: int | None,
    group_by: str | None,
    as_json: bool,
) -> None:
    """List dead letters (the queues are left exactly as they were)."""
    flt = _filter(ids=(), listener=listener, event=event, error=error, reason=reason, since=since)
    _app, admin = _admin(app_arg or app_spec, url, queues)
    messages = _run(admin, lambda a: a.browse(flt, limit=limit))
    if group_by:
        groups = group_counts(messages, group_by)
        if as_json:
            for key, count in groups:
                echo_json({group_by: key, "count": count})
        elif groups:
            click.echo(format_table((group_by.upper(), "COUNT"), [[k, str(c)] for k, c in groups], max_width=100))
        return
    if as_json:
        for message in messages:
            echo_json(message.summary())
        return
    if not messages:
        click.echo(f"no dead letters in {', '.join(admin.dead_queues)}" + (" match" if not flt.is_empty else ""))
        return
    click.echo(format_table(TABLE_COLUMNS, [table_row(m) for m in messages]))
    click.echo(f"{len(messages)} dead letter{'s' if len(messages) != 1 else ''}", err=True)


# -- show -------------------------------------------------------------------------------------------------


@dead.command()
@click.argument("message_id", metavar="ID")
@app_option
@url_option
@click.option("--queue", "queues", multiple=True, metavar="Q", help="Work queue to look in; repeatable.")
@click.option("--json", "as_json", is_flag=True, help="The dead letter as one JSON object.")
@cli_errors
def show(message_id: str, app_spec: str | None, url: str | None, queues: tuple[str, ...], as_json: bool) -> None:
    """Everything about one dead letter: error, traceback, attempts, timestamps, headers and the body."""
    _app, admin = _admin(app_spec, url, queues)
    found = _run(admin, lambda a: a.browse(DeadFilter(ids=frozenset({message_id}))))
    if not found:
        msg = f"no dead letter with id {message_id} in {', '.join(admin.dead_queues)}"
        raise CliError(msg, EXIT_NOT_FOUND)
    for index, message in enumerate(found):
        if as_json:
            echo_json(message.details())
            continue
        if index:
            click.echo("")
        click.echo(_render(message, copies=len(found)))


def _render(message: DeadMessage, *, copies: int) -> str:
    import json  # noqa: PLC0415

    details = message.details()
    lines = [f"id:              {message.message_id}"]
    if copies > 1:
        lines.append(f"                 ({copies} dead letters have this id; position {message.position})")
    fields = [
        ("queue", f"{message.queue} (position {message.position}), from {message.original_queue}"),
        ("reason", message.reason),
        ("listener", message.listener),
        ("event", message.event),
        ("error", f"{message.error_type or '-'}: {message.error_message or ''}"),
        ("attempt", str(message.attempt)),
        ("replays", str(message.replays)),
        ("first failure", details["first_failure_at"]),
        ("last failure", details["last_failure_at"]),
        ("dead at", details["dead_at"]),
        ("consumer", f"{details['consumer_host'] or '-'} pid {details['consumer_pid'] or '-'}"),
        ("correlation id", message.correlation_id),
    ]
    lines.extend(f"{(name + ':').ljust(16)} {value if value is not None else '-'}" for name, value in fields)
    lines.append("properties:")
    for key, value in details["properties"].items():
        if key == "timestamp" and isinstance(value, int):
            value = f"{value} ({datetime.fromtimestamp(value, UTC).isoformat()})"  # noqa: PLW2901 - shown as text
        lines.append(f"  {key}: {value}")
    lines.append("headers:")
    lines.extend(f"  {k}: {v}" for k, v in details["headers"].items() if k != "x-queueable-error-traceback")
    if message.traceback:
        lines.append("traceback:")
        lines.extend("  " + line for line in message.traceback.rstrip().splitlines())
    lines.append("body:")
    if "body" in details:
        try:
            pretty = json.dumps(json.loads(details["body"]), indent=2, ensure_ascii=False)
        except ValueError:
            pretty = details["body"]
    else:
        pretty = f"(not UTF-8, {len(message.body)} bytes, base64) {details['body_base64']}"
    lines.extend("  " + line for line in pretty.splitlines() or [""])
    return "\n".join(lines)


# -- replay -----------------------------------------------------------------------------------------------


@dead.command()
@click.argument("ids", metavar="[ID]...", nargs=-1)
@click.option("--all", "select_all", is_flag=True, help="Every dead letter that matches the filters.")
@app_option
@url_option
@filter_options
@click.option("--dry-run", is_flag=True, help="With --app: report what would fail again; move nothing.")
@click.option(
    "--to", "to_queue", metavar="Q", help="Send every copy to work queue Q instead of where it came from."
)
@click.option(
    "--rate", type=click.FloatRange(min=0, min_open=True), metavar="N", help="At most N messages a second."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@cli_errors
def replay(  # noqa: PLR0917 - click passes each option as an argument
    ids: tuple[str, ...],
    select_all: bool,
    app_spec: str | None,
    url: str | None,
    queues: tuple[str, ...],
    listener: str | None,
    event: str | None,
    error: str | None,
    reason: str | None,
    since: str | None,
    limit: int | None,
    dry_run: bool,
    to_queue: str | None,
    rate: float | None,
    as_json: bool,
) -> None:
    """Move dead letters back to the work queue they came from (attempt 1, replay count + 1).

    Each copy is confirmed by the broker before its dead letter is removed, so a replay interrupted at any
    moment loses nothing (the message in flight may end up in both queues).
    """
    _require_selection(ids, select_all)
    flt = _filter(ids=ids, listener=listener, event=event, error=error, reason=reason, since=since)
    app, admin = _admin(app_spec, url, queues)
    if dry_run:
        if app is None:
            msg = "--dry-run needs the application (--app module:attribute or QUEUEABLE_APP) to check payloads"
            raise CliError(msg, EXIT_USAGE)
        results = _run(admin, lambda a: a.check(app, flt, limit=limit))
        _report_dry_run(results, as_json=as_json)
        _check_ids_found(ids, [r.message for r in results])
        if any(not r.ok for r in results):
            raise SystemExit(EXIT_FAILED)
        return

    async def work(a: DeadLetterAdmin) -> list[DeadMessage]:
        total = await _planned(a, flt, limit)
        with _Progress("replaying", total, enabled=not as_json) as step:
            return await a.replay(
                flt, limit=limit, rate=rate, progress=_each(step, as_json, "replayed", to_queue), to_queue=to_queue
            )

    moved = _run(admin, work)
    _summary("replayed", moved, as_json=as_json, to_queue=to_queue)
    _check_ids_found(ids, moved)


def _report_dry_run(results: list[DryRunResult], *, as_json: bool) -> None:
    for result in results:
        if as_json:
            echo_json(result.as_dict())
        elif result.ok:
            click.echo(f"ok    {result.message.message_id}  {result.message.listener or '-'}")
        else:
            # One line per letter (pydantic's errors span several): `dead show ID` has the whole text.
            message = result.message
            error = " ".join(str(result.error).split())
            click.echo(f"FAIL  {message.message_id}  {message.listener or '-'}  {result.reason}: {error}")
    failing = sum(1 for r in results if not r.ok)
    if not as_json:
        ok = len(results) - failing
        click.echo(f"dry run: {ok} would run, {failing} would fail again; nothing moved", err=True)


# -- purge ------------------------------------------------------------------------------------------------


@dead.command()
@click.argument("ids", metavar="[ID]...", nargs=-1)
@click.option("--all", "select_all", is_flag=True, help="Every dead letter that matches the filters.")
@app_option
@url_option
@filter_options
@click.option("--yes", is_flag=True, help="Really delete (required).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@cli_errors
def purge(  # noqa: PLR0917 - click passes each option as an argument
    ids: tuple[str, ...],
    select_all: bool,
    app_spec: str | None,
    url: str | None,
    queues: tuple[str, ...],
    listener: str | None,
    event: str | None,
    error: str | None,
    reason: str | None,
    since: str | None,
    limit: int | None,
    yes: bool,
    as_json: bool,
) -> None:
    """Delete dead letters for good, and say how many."""
    _require_selection(ids, select_all)
    if not yes:
        msg = "purge deletes dead letters for good: add --yes (check with `queueable dead list` first)"
        raise CliError(msg, EXIT_USAGE)
    flt = _filter(ids=ids, listener=listener, event=event, error=error, reason=reason, since=since)
    _app, admin = _admin(app_spec, url, queues)

    async def work(a: DeadLetterAdmin) -> list[DeadMessage]:
        total = await _planned(a, flt, limit)
        with _Progress("purging", total, enabled=not as_json) as step:
            return await a.purge(flt, limit=limit, progress=_each(step, as_json, "purged"))

    removed = _run(admin, work)
    _summary("purged", removed, as_json=as_json)
    _check_ids_found(ids, removed)


# -- export / import --------------------------------------------------------------------------------------


@dead.command("export")
@click.option("--output", "-o", required=True, metavar="FILE.jsonl", help="Where to write ('-' for stdout).")
@app_option
@url_option
@filter_options
@cli_errors
def export(  # noqa: PLR0917 - click passes each option as an argument
    output: str,
    app_spec: str | None,
    url: str | None,
    queues: tuple[str, ...],
    listener: str | None,
    event: str | None,
    error: str | None,
    reason: str | None,
    since: str | None,
    limit: int | None,
) -> None:
    """Archive dead letters losslessly (body, headers, properties) as JSON lines; moves nothing."""
    flt = _filter(ids=(), listener=listener, event=event, error=error, reason=reason, since=since)
    _app, admin = _admin(app_spec, url, queues)
    with _open_output(output) as out:

        async def work(a: DeadLetterAdmin) -> int:
            total = await _planned(a, flt, limit)
            with _Progress("exporting", total, enabled=output != "-") as step:
                return await a.export(out, flt, limit=limit, progress=step)

        written = _run(admin, work)
    where = "stdout" if output == "-" else output
    click.echo(f"exported {written} dead letter{'s' if written != 1 else ''} to {where}", err=True)


@dead.command("import")
@click.argument("source", metavar="FILE.jsonl", type=click.Path(dir_okay=False, allow_dash=True))
@app_option
@url_option
@click.option("--queue", metavar="Q", help="Put every letter into Q's dead-letter queue instead of its own.")
@cli_errors
def import_(source: str, app_spec: str | None, url: str | None, queue: str | None) -> None:
    """Put exported dead letters back into dead-letter queues, byte for byte."""
    messages = list(_read_export(source))
    _app, admin = _admin(app_spec, url, (queue,) if queue else ())

    async def work(a: DeadLetterAdmin) -> int:
        with _Progress("importing", len(messages), enabled=True) as step:
            return await a.import_(messages, queue=queue, progress=step)

    imported = _run(admin, work)
    click.echo(f"imported {imported} dead letter{'s' if imported != 1 else ''}", err=True)


def _read_export(source: str) -> Iterator[DeadMessage]:
    stream: TextIO
    with contextlib.ExitStack() as stack:
        if source == "-":
            stream = sys.stdin
        else:
            try:
                stream = stack.enter_context(Path(source).open(encoding="utf-8"))
            except OSError as exc:
                msg = f"cannot read {source}: {exc.strerror or exc}"
                raise CliError(msg, EXIT_NOT_FOUND) from exc
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                yield decode_export_line(line, position=number - 1)
            except ExportFormatError as exc:
                msg = f"{source}:{number}: {exc}"
                raise CliError(msg, EXIT_USAGE) from exc


@contextlib.contextmanager
def _open_output(output: str) -> Iterator[TextIO]:
    if output == "-":
        yield sys.stdout
        return
    path = Path(output)
    partial = path.with_name(path.name + ".partial")
    try:
        stream = partial.open("w", encoding="utf-8")
    except OSError as exc:
        msg = f"cannot write {output}: {exc.strerror or exc}"
        raise CliError(msg, EXIT_FAILED) from exc
    try:
        with stream:
            yield stream
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(path)  # a complete file or none: never a half-written archive under the real name


# -- helpers ----------------------------------------------------------------------------------------------


def _require_selection(ids: tuple[str, ...], select_all: bool) -> None:
    if not ids and not select_all:
        msg = "name the dead letters: give IDs, or --all (with filters to narrow it)"
        raise CliError(msg, EXIT_USAGE)
    if ids and select_all:
        msg = "give IDs or --all, not both"
        raise CliError(msg, EXIT_USAGE)


async def _planned(admin: DeadLetterAdmin, flt: DeadFilter, limit: int | None) -> int:
    """The length of the progress bar: every ready dead letter, or fewer when it is known to be fewer."""
    if not sys.stderr.isatty():
        return 0
    total = await admin.count()
    if flt.ids:
        total = min(total, len(flt.ids))
    return min(total, limit) if limit is not None else total


def _each(
    step: Callable[[DeadMessage], None], as_json: bool, action: str, to_queue: str | None = None
) -> Callable[[DeadMessage], None]:
    def report(message: DeadMessage) -> None:
        step(message)
        if as_json:
            echo_json({"action": action, "id": message.message_id, "queue": to_queue or message.original_queue})

    return report


def _summary(action: str, messages: list[DeadMessage], *, as_json: bool, to_queue: str | None = None) -> None:
    per_queue: dict[str, int] = {}
    for message in messages:
        queue = to_queue or message.original_queue
        per_queue[queue] = per_queue.get(queue, 0) + 1
    if as_json:
        echo_json({"summary": action, "count": len(messages), "queues": per_queue})
        return
    preposition = "to" if action == "replayed" else "from"
    detail = ", ".join(f"{count} {preposition} {queue}" for queue, count in per_queue.items())
    plural = "s" if len(messages) != 1 else ""
    click.echo(f"{action} {len(messages)} dead letter{plural}" + (f" ({detail})" if detail else ""))


def _check_ids_found(ids: tuple[str, ...], messages: list[DeadMessage]) -> None:
    missing = sorted(set(ids) - {m.message_id for m in messages})
    if missing:
        msg = f"no dead letter with id {', '.join(missing)}"
        raise CliError(msg, EXIT_NOT_FOUND)
