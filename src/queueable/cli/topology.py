"""``queueable topology declare [APP]``: create the exchange, work queues and dead-letter queues, idempotently.

The worker declares the same topology at start, and the transport before its first publish; this command is
for deployments that want the queues to exist before any process runs (or that give the application user no
``configure`` permission). Delay queues are not declared here: the worker creates them on first use, one per
delay bucket actually needed, and they expire when unused.
"""

from __future__ import annotations

import asyncio

import click

from queueable._settings import mask_url
from queueable.cli._common import cli_errors, echo_json, resolve_settings, url_option
from queueable.errors import ConfigurationError

__all__ = ["topology"]


@click.group()
def topology() -> None:
    """Declare the RabbitMQ topology queueable uses (exchange, work and dead-letter queues)."""


@topology.command("declare")
@click.argument("app_spec", metavar="[APP]", required=False, envvar="QUEUEABLE_APP")
@url_option
@click.option(
    "--queue",
    "queues",
    multiple=True,
    metavar="Q",
    help="Work queue to declare (repeatable). Default: the app's queues, or QUEUEABLE_QUEUE without APP.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per declared entity, one per line.")
@cli_errors
def declare(app_spec: str | None, url: str | None, queues: tuple[str, ...], as_json: bool) -> None:
    """Declare the exchange, each work queue and its dead-letter queue, and their bindings.

    Safe to run any number of times: an entity that exists with the same arguments is left alone. A queue that
    exists with other arguments (classic vs quorum, another delivery limit) is reported and nothing is changed
    (exit code 5): RabbitMQ cannot alter a queue's arguments in place.
    """
    from queueable.transport.rabbitmq import RabbitMQTransport  # noqa: PLC0415

    app, settings = resolve_settings(app_spec, url)
    if settings.scheme == "memory":
        msg = "no broker to declare on: set QUEUEABLE_URL=amqp://... or pass --url"
        raise ConfigurationError(msg)
    names = list(queues) or (app.provider.queue_names if app is not None else [settings.default_queue])

    async def work() -> list[dict[str, object]]:
        transport = RabbitMQTransport(settings)
        try:
            specs = await transport.declare_topology(names)
        finally:
            await transport.close()
        exchange = {"exchange": settings.exchange, "type": "direct", "durable": True}
        return [exchange, *(spec.as_dict() for spec in specs)]

    declared = asyncio.run(work())
    if as_json:
        for entity in declared:
            echo_json(entity)
        return
    click.echo(f"declared on {mask_url(settings.url)}:")
    for entity in declared:
        if "exchange" in entity:
            click.echo(f"  exchange {entity['exchange']!s:<40} direct, durable")
            continue
        arguments = entity["arguments"]
        assert isinstance(arguments, dict)
        args = ", ".join(f"{k.removeprefix('x-')}={v!r}" for k, v in arguments.items())
        click.echo(f"  {entity['role']!s:<8} {entity['queue']!s:<40} bound as {entity['binding']!r}; {args}")
