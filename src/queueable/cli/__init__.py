"""The command line: ``queueable`` (operations) and ``queueable-consume`` (the worker).

Each subcommand lives in its own module and is attached here.
"""

from __future__ import annotations

import click

from queueable import __version__
from queueable.cli.consume import consume
from queueable.cli.dead import dead
from queueable.cli.relay import relay
from queueable.cli.status import status
from queueable.cli.topology import topology

__all__ = ["consume_main", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="queueable")
def main() -> None:
    """Operate queueable: consume queued listeners, inspect and replay dead letters, check queues.

    Connection settings come from --url or QUEUEABLE_URL. APP is your application as module:attribute,
    the same object your web process imports (e.g. myproject.events:app).
    """


main.add_command(dead)
main.add_command(status)
main.add_command(consume)
main.add_command(relay)
main.add_command(topology)


def consume_main() -> None:
    """Entry point of ``queueable-consume`` (the same as ``queueable consume``)."""
    from queueable.cli.consume import consume  # noqa: PLC0415

    consume(prog_name="queueable-consume")
