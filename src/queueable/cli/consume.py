"""``queueable-consume APP`` (also ``queueable consume APP``): the worker process."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

import click

from queueable import __version__
from queueable._settings import mask_url
from queueable._worker import StopReason, Worker, WorkerOptions
from queueable.cli._common import app_argument, cli_errors, configure_logging, resolve_settings, url_option
from queueable.errors import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Callable

    from queueable._app import App
    from queueable._settings import Settings

__all__ = ["consume"]

log = logging.getLogger("queueable.worker")

DEFAULT_CONCURRENCY = 16


@click.command(
    "consume",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="""\b
Examples:
  queueable-consume myproject.events:app
  queueable-consume myproject.events:app -Q mail -Q search --concurrency 32
  queueable-consume myproject.events:app --max-messages 10000 --memory-limit 512   # under a supervisor

\b
Exit codes: 0 stopped cleanly (signal, --max-messages, --time-limit, --memory-limit),
3 broker unreachable or credentials refused, 5 the app cannot be loaded or is misconfigured.""",
)
@click.version_option(__version__, prog_name="queueable-consume")
@app_argument(required=True)
@click.option(
    "--queue",
    "-Q",
    "queues",
    multiple=True,
    metavar="NAME",
    help="Work queue to consume (repeatable). Default: every queue the app's queued listeners use.",
)
@click.option(
    "--prefetch",
    type=click.IntRange(min=1),
    help="Unacked deliveries the broker may push to this worker, per consumed queue (default: "
    "QUEUEABLE_PREFETCH or 64, at least --concurrency).",
)
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(min=1),
    default=DEFAULT_CONCURRENCY,
    show_default=True,
    help="Messages handled at the same time (async listeners as tasks, sync ones in a pool of as many threads).",
)
@click.option(
    "--max-messages",
    type=click.IntRange(min=1),
    help="Exit cleanly (code 0) after taking this many messages; a supervisor starts a fresh process.",
)
@click.option(
    "--time-limit",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Exit cleanly after this many seconds.",
)
@click.option(
    "--memory-limit",
    type=click.IntRange(min=1),
    metavar="MB",
    help="Exit cleanly when the resident memory exceeds MB (checked between messages).",
)
@click.option(
    "--shutdown-timeout",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="On SIGTERM/SIGINT or a limit: how long running handlers may finish before their messages are "
    "requeued. A second signal requeues them at once.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
    help="info logs start, stop, retries; warning and up logs dead letters and failures. Nothing per "
    "successful message below debug.",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="text for people, json (one object per line) for log collectors.",
)
@click.option(
    "--loop",
    "loop_name",
    type=click.Choice(["asyncio", "uvloop"]),
    default="asyncio",
    show_default=True,
    help="Event loop. uvloop (pip install 'queueable[uvloop]') takes less CPU per message.",
)
@url_option
@cli_errors
def consume(  # noqa: PLR0917 - click passes options by keyword; this is its calling convention
    app: str,
    queues: tuple[str, ...],
    prefetch: int | None,
    concurrency: int,
    max_messages: int | None,
    time_limit: float | None,
    memory_limit: int | None,
    shutdown_timeout: float,
    log_level: str,
    log_format: str,
    loop_name: str,
    url: str | None,
) -> None:
    """Run the queued listeners of APP (module:attribute, e.g. myproject.events:app).

    Consumes the app's work queues from RabbitMQ (--url or QUEUEABLE_URL) and hands every message to the
    listener it names, among the listeners APP registered with queue=True and no others. A message is
    acknowledged only once its outcome is durable: handled, or its retry / dead-letter copy confirmed by the
    broker; otherwise it is requeued. Bad input (not JSON, wrong schema, unknown listener...) goes to the
    queue's dead-letter queue (QUEUE.dead) with the reason, and the worker carries on.

    The topology (exchange, queues, dead-letter and delay queues) is declared at start, idempotently.
    SIGTERM or SIGINT stops it gracefully; run several workers on the same queues to scale out.
    """
    configure_logging(log_level, log_format)
    loaded, settings = resolve_settings(app, url)
    assert loaded is not None
    if settings.scheme == "memory":
        msg = "queueable-consume needs a broker: set QUEUEABLE_URL=amqp://... or pass --url"
        raise ConfigurationError(msg)
    chosen = _queues(loaded, queues)
    options = WorkerOptions(
        queues=chosen,
        prefetch=max(prefetch or settings.prefetch, concurrency),
        concurrency=concurrency,
        max_messages=max_messages,
        time_limit=time_limit,
        memory_limit_mb=memory_limit,
        shutdown_timeout=shutdown_timeout,
    )
    with asyncio.Runner(loop_factory=_loop_factory(loop_name)) as runner:
        runner.run(_run(loaded, settings, options))


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if name != "uvloop":
        return None
    try:
        import uvloop  # noqa: PLC0415 - optional
    except ImportError as exc:
        msg = f"--loop uvloop: {exc}: pip install 'queueable[uvloop]'"
        raise ConfigurationError(msg) from exc
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _queues(app: App, requested: tuple[str, ...]) -> tuple[str, ...]:
    if not any(entry.queue or entry.deferrable for entry in app.provider.listeners):
        msg = (
            "this app registers no queued listener (queue=True) or deferrable one: a worker would have nothing to "
            "run, and would dead-letter whatever is in its queue as an unknown listener"
        )
        raise ConfigurationError(msg)
    known = app.provider.queue_names
    if not requested:
        return tuple(known)
    default = app.provider.default_queue
    if default in requested and default not in known:
        # Allowed: after a deploy that gave every listener a queue of its own, messages and retries published
        # before it still wait in the default queue, for listener ids this app still registers.
        log.warning(
            "consuming %s, which no queued listener of this app uses now: messages there for listeners this app "
            "registers are handled, any others are dead-lettered as unknown listeners",
            default,
        )
    unknown = [name for name in requested if name not in known and name != default]
    if unknown:
        msg = (
            f"no queued listener of this app uses queue(s) {', '.join(unknown)} (its queues: {', '.join(known)}); "
            "consuming them would dead-letter every message as an unknown listener"
        )
        raise ConfigurationError(msg)
    return tuple(dict.fromkeys(requested))


async def _run(app: App, settings: Settings, options: WorkerOptions) -> StopReason:
    from queueable.transport.rabbitmq import RabbitMQTransport  # noqa: PLC0415 - the CLI loads fast without it

    app.provider.validate()
    # One connection per worker process: listeners that dispatch events publish through the worker's transport
    # (which declares every queue of the app, not only the consumed ones, before its first publish).
    transport = RabbitMQTransport(settings, queues=app.provider.queue_names)
    app.use_transport(transport)
    worker = Worker(app.processor(), transport, options)
    loop = asyncio.get_running_loop()
    # Sync listeners run in the default executor: size it to the concurrency (asyncio's default is min(32, cpus+4),
    # which would leave worker slots waiting for a thread on a small machine).
    loop.set_default_executor(
        concurrent.futures.ThreadPoolExecutor(
            max_workers=options.concurrency, thread_name_prefix="queueable-listener"
        )
    )
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, worker.stop, StopReason.SIGNAL)
    log.info("queueable worker pid %d connecting to %s", os.getpid(), mask_url(settings.url))
    try:
        reason = await worker.run()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await transport.close()
    if worker.abandoned:
        _exit_without_waiting_for_threads(worker.abandoned)
    return reason


def _exit_without_waiting_for_threads(abandoned: int) -> None:
    """A sync listener that outlived the shutdown timeout keeps running in its thread, and asyncio.run() and
    the interpreter would wait for it at exit. Its message is requeued already: exit now, with 0.
    """
    log.warning("exiting with %d listener(s) still running in threads; their messages were requeued", abandoned)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
