"""``queueable status [APP]``: every queueable queue with ready and unacked counts and consumers.

AMQP itself reports only ready messages and consumers (a passive ``queue.declare``), and cannot list queues:
the delay queues that exist are found by probing every bucket of the transport's ladder (about 80 passive
declares per work queue, a fraction of a second). Unacked counts, and the queue list, come from the management
HTTP API when ``--management-url`` is given, and with them a warning for every dead-letter queue whose
delivery limit would let reading it drop its dead letters (RabbitMQ 4's default limit included).
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

__all__ = ["dead_letter_limit_warnings", "delay_queue_names", "management_status", "status"]


@click.command()
@click.argument("app_spec", metavar="[APP]", required=False, envvar="QUEUEABLE_APP")
@url_option
@click.option("--queue", "queues", multiple=True, metavar="Q", help="Work queue to report; repeatable.")
@click.option(
    "--management-url",
    envvar="QUEUEABLE_MANAGEMENT_URL",
    show_envvar=True,
    metavar="URL",
    help="RabbitMQ management API (http://user:pass@host:15672) for unacked counts, delay queues, and a "
    "check that no delivery limit can drop dead letters (warnings on stderr).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per queue, one per line.")
@cli_errors
def status(
    app_spec: str | None, url: str | None, queues: tuple[str, ...], management_url: str | None, as_json: bool
) -> None:
    """Every queueable queue (work, .dead, delay) with ready and unacked messages and consumers."""
    app, settings = resolve_settings(app_spec, url)
    names = list(queues) or (app.provider.all_queue_names if app is not None else [settings.default_queue])
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
    warnings: list[str] = []
    if management_url:
        rows = management_status(management_url, _vhost(settings.url), admin.queues, rows, warnings=warnings)
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
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
    management_url: str,
    vhost: str,
    work_queues: list[str],
    rows: list[QueueStatus],
    *,
    warnings: list[str] | None = None,
) -> list[QueueStatus]:
    """``rows`` completed from the management API: unacked counts, and the delay queues that exist.

    ``warnings``, when given, receives what puts dead letters at risk (:func:`dead_letter_limit_warnings`).
    """
    queues = {q["name"]: q for q in _fetch_queues(management_url, vhost)}
    if warnings is not None:
        dead = [row.name for row in rows if row.kind is QueueKind.DEAD]
        warnings.extend(dead_letter_limit_warnings(_fetch_version(management_url), queues, dead))
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
    columns = "name,messages_ready,messages_unacknowledged,consumers,type,arguments,effective_policy_definition"
    data = _get_json(management_url, f"/api/queues/{urllib.parse.quote(vhost, safe='')}?columns={columns}")
    if not isinstance(data, list):
        msg = f"the management API returned {type(data).__qualname__}, not a list of queues"
        raise CliError(msg, EXIT_BROKER)
    return [q for q in data if isinstance(q, dict) and isinstance(q.get("name"), str)]


def _fetch_version(management_url: str) -> str | None:
    """The broker's version (``/api/overview``), or ``None`` if the answer does not say."""
    data = _get_json(management_url, "/api/overview")
    version = data.get("rabbitmq_version") if isinstance(data, dict) else None
    return version if isinstance(version, str) else None


def _get_json(management_url: str, path: str) -> Any:
    parts = urllib.parse.urlsplit(management_url)
    if parts.scheme not in ("http", "https"):
        msg = f"--management-url must be http:// or https://, got {parts.scheme or 'nothing'}"
        raise CliError(msg, 2)
    host = parts.hostname or "localhost"
    netloc = f"{host}:{parts.port}" if parts.port else host
    base = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    request = urllib.request.Request(base + path, headers={"Accept": "application/json"})  # noqa: S310 - scheme checked above
    user = urllib.parse.unquote(parts.username or "guest")
    password = urllib.parse.unquote(parts.password or "guest")
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - scheme checked above
            return json.load(response)
    except (OSError, ValueError) as exc:
        msg = f"management API at {base} did not answer: {exc}"
        raise CliError(msg, EXIT_BROKER) from exc


#: RabbitMQ's default delivery limit for quorum queues that set none, from this major version on.
DEFAULT_DELIVERY_LIMIT_4 = 20
_DEFAULT_LIMIT_SINCE = 4


def dead_letter_limit_warnings(
    version: str | None, queues: dict[str, dict[str, Any]], dead_queues: list[str]
) -> list[str]:
    """What puts the dead letters of ``dead_queues`` at risk: a delivery limit on a quorum dead-letter queue.

    Reading a dead-letter queue (``dead list``, ``show``, ``replay``...) returns its messages to it, and a
    quorum queue counts each return as a delivery; past a delivery limit the broker drops them (a ``.dead``
    queue has no dead-letter exchange of its own). So a ``.dead`` quorum queue needs no limit at all: none set
    on RabbitMQ 3.x; ``-1`` on 4.x, which otherwise applies its default of 20. RabbitMQ 3.10 reads ``-1`` as a
    limit below every count (seen on 3.10.8: a letter went at its first return).
    """
    try:
        major: int | None = int((version or "").split(".", 1)[0])
    except ValueError:
        major = None
    has_default = major is not None and major >= _DEFAULT_LIMIT_SINCE  # and -1 means no limit
    before_default = major is not None and major < _DEFAULT_LIMIT_SINCE
    fix = "a policy with delivery-limit: -1" if has_default else "no delivery limit"
    found: list[str] = []
    for name in dead_queues:
        info = queues.get(name)
        if info is None or info.get("type") != "quorum":
            continue
        limits = [
            (source, value)
            for source, value in (
                ("its x-delivery-limit argument", (info.get("arguments") or {}).get("x-delivery-limit")),
                ("a policy", (info.get("effective_policy_definition") or {}).get("delivery-limit")),
            )
            if isinstance(value, int) and not isinstance(value, bool)
        ]
        finite = [(source, value) for source, value in limits if value >= 0]
        if finite:
            source, value = min(finite, key=lambda item: item[1])
            found.append(
                f"{name} has a delivery limit of {value} (from {source}): every read of a dead-letter queue "
                f"counts as a delivery, so its dead letters are dropped after {value}; give it {fix}"
            )
        elif limits and before_default:  # only -1 is set
            found.append(
                f"{name} has a delivery limit of -1, which means 'no limit' only from RabbitMQ 4.0 on "
                f"(3.10 drops a dead letter the first time it is read); on {version}, remove it: RabbitMQ 3.x "
                "has no default limit"
            )
        elif not limits and has_default:
            found.append(
                f"{name} has no delivery limit of its own, so RabbitMQ {version} applies its default of "
                f"{DEFAULT_DELIVERY_LIMIT_4}: every read of a dead-letter queue counts as a delivery, so its dead "
                f"letters are dropped after {DEFAULT_DELIVERY_LIMIT_4}; give it {fix}"
            )
    return found
