"""``queueable status [APP]``: every queueable queue with ready and unacked counts and consumers.

AMQP itself reports only ready messages and consumers (a passive ``queue.declare``), and cannot list queues:
the delay queues that exist are found by probing every bucket of the transport's ladder (about 80 passive
declares per work queue, a fraction of a second). Unacked counts, and the queue list, come from the management
HTTP API when ``--management-url`` is given.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import urllib.parse
import urllib.request
from typing import Any

import click

from queueable._consumer import dead_letter_queue_for
from queueable._deadletters import DeadLetterAdmin, QueueKind, QueueStatus, format_table, kind_of
from queueable.cli._common import EXIT_BROKER, CliError, cli_errors, echo_json, resolve_settings, url_option
from queueable.cli.dead import quiet_client_logs

__all__ = ["delay_queue_names", "management_status", "status"]


@click.command()
@click.argument("app_spec", metavar="[APP]", required=False)
@url_option
@click.option("--queue", "queues", multiple=True, metavar="Q", help="Work queue to report; repeatable.")
@click.option(
    "--management-url",
    envvar="QUEUEABLE_MANAGEMENT_URL",
    show_envvar=True,
    metavar="URL",
    help="RabbitMQ management API (http://user:pass@host:15672) for unacked counts and delay queues.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per queue, one per line.")
@cli_errors
def status(
    app_spec: str | None, url: str | None, queues: tuple[str, ...], management_url: str | None, as_json: bool
) -> None:
    """Every queueable queue (work, .dead, delay) with ready and unacked messages and consumers."""
    app, settings = resolve_settings(app_spec, url)
    names = list(queues) or (app.provider.queue_names if app is not None else [settings.default_queue])
    admin = DeadLetterAdmin(settings, names)

    async def work() -> list[QueueStatus]:
        async with admin:
            rows: list[QueueStatus] = []
            for queue in admin.queues:
                rows.extend(await admin.status([queue, dead_letter_queue_for(queue)]))
                if not management_url:  # the management API lists the delay queues that exist
                    delays = await admin.status(delay_queue_names(queue))
                    rows.extend(row for row in delays if row.exists)
            return rows

    quiet_client_logs()
    rows = asyncio.run(work())
    if management_url:
        rows = management_status(management_url, _vhost(settings.url), admin.queues, rows)
    if as_json:
        for row in rows:
            echo_json(row.as_dict())
        return
    table = [
        [
            row.name,
            str(row.kind),
            _num(row.ready) if row.exists else "missing",
            _num(row.unacked) if row.exists else "",
            _num(row.consumers) if row.exists else "",
        ]
        for row in rows
    ]
    click.echo(format_table(("QUEUE", "KIND", "READY", "UNACKED", "CONSUMERS"), table, max_width=100))
    dead = sum(row.ready or 0 for row in rows if row.kind is QueueKind.DEAD)
    note = "" if management_url else " (unacked needs --management-url)"
    click.echo(f"{dead} dead letter{'s' if dead != 1 else ''}{note}", err=True)


def delay_queue_names(queue: str) -> list[str]:
    """Every delay queue ``queue`` can have (one per bucket of the transport's ladder, about 80)."""
    from queueable.transport.rabbitmq import DELAY_BUCKETS_MS, delay_queue_for  # noqa: PLC0415

    return [delay_queue_for(queue, ms) for ms in DELAY_BUCKETS_MS]


def _num(value: int | None) -> str:
    return "n/a" if value is None else str(value)


def _vhost(url: str | None) -> str:
    path = urllib.parse.urlsplit(url or "").path
    return urllib.parse.unquote(path[1:]) if len(path) > 1 else "/"


def management_status(
    management_url: str, vhost: str, work_queues: list[str], rows: list[QueueStatus]
) -> list[QueueStatus]:
    """``rows`` completed from the management API: unacked counts, and the delay queues that exist."""
    queues = {q["name"]: q for q in _fetch_queues(management_url, vhost)}
    completed = [
        QueueStatus(
            row.name,
            row.kind,
            exists=row.name in queues or row.exists,
            ready=_field(queues, row.name, "messages_ready", row.ready),
            consumers=_field(queues, row.name, "consumers", row.consumers),
            unacked=_field(queues, row.name, "messages_unacknowledged", None),
        )
        for row in rows
    ]
    for work in work_queues:
        pattern = re.compile(re.escape(work) + r"\.delay\.\d+$")
        delay_names = sorted((n for n in queues if pattern.match(n)), key=lambda n: int(n.rsplit(".", 1)[1]))
        for name in delay_names:
            info = queues[name]
            completed.append(
                QueueStatus(
                    name,
                    kind_of(name),
                    exists=True,
                    ready=info.get("messages_ready"),
                    consumers=info.get("consumers"),
                    unacked=info.get("messages_unacknowledged"),
                )
            )
    return completed


def _field(queues: dict[str, dict[str, Any]], name: str, key: str, default: int | None) -> int | None:
    value = queues.get(name, {}).get(key, default)
    return value if isinstance(value, int) else default


def _fetch_queues(management_url: str, vhost: str) -> list[dict[str, Any]]:
    parts = urllib.parse.urlsplit(management_url)
    if parts.scheme not in ("http", "https"):
        msg = f"--management-url must be http:// or https://, got {parts.scheme or 'nothing'}"
        raise CliError(msg, 2)
    host = parts.hostname or "localhost"
    netloc = f"{host}:{parts.port}" if parts.port else host
    base = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    columns = "name,messages_ready,messages_unacknowledged,consumers"
    endpoint = f"{base}/api/queues/{urllib.parse.quote(vhost, safe='')}?columns={columns}"
    request = urllib.request.Request(endpoint, headers={"Accept": "application/json"})  # noqa: S310 - scheme checked above
    user = urllib.parse.unquote(parts.username or "guest")
    password = urllib.parse.unquote(parts.password or "guest")
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - scheme checked above
            data = json.load(response)
    except (OSError, ValueError) as exc:
        msg = f"management API at {base} did not answer: {exc}"
        raise CliError(msg, EXIT_BROKER) from exc
    if not isinstance(data, list):
        msg = f"management API at {base} returned {type(data).__qualname__}, not a list of queues"
        raise CliError(msg, EXIT_BROKER)
    return [q for q in data if isinstance(q, dict) and isinstance(q.get("name"), str)]
