"""queueable against raw aio-pika on a real RabbitMQ, in one process run: ``make bench`` (or ``scripts/bench``).

    .venv/bin/python bench/run.py                  # the full suite, about 3 minutes
    .venv/bin/python bench/run.py --quick          # a smaller run, under a minute
    .venv/bin/python bench/run.py --only latency,consumer --json results.json

Prints a Markdown table: every figure is the median over rounds with its interquartile range in brackets,
queueable's next to its baseline, and the ratio against the target of issue 6. Queues and the exchange are
unique to the run (``bench.<hex>.*``) and deleted at the end. Exits 0 when the suite ran, whether or not a
target is met (the table says which); 1 when the broker cannot be reached or a benchmark failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import sys
import time
from dataclasses import asdict, replace
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Names, cleanup
from _stats import table
from scenarios import EXTRA_SCENARIOS, SCENARIOS, Bench, Sizes

if TYPE_CHECKING:
    from _stats import Row

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="bench/run.py")
    parser.add_argument("--url", default=os.environ.get("QUEUEABLE_BENCH_URL", DEFAULT_URL))
    parser.add_argument("--quick", action="store_true", help="fewer rounds and messages (about 1 minute)")
    parser.add_argument(
        "--only",
        help=f"comma-separated subset of: {', '.join(SCENARIOS)}; "
        f"or, not in the default run: {', '.join(EXTRA_SCENARIOS)}",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH ('-': stdout)")
    parser.add_argument("--rounds", type=int, help="rounds of the latency and deferred benchmarks")
    parser.add_argument("--consume-messages", type=int, help="messages per consumer round")
    parser.add_argument("--memory-messages", type=int, help="messages through the memory worker")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio", help="event loop")
    return parser.parse_args(argv)


def _sizes(args: argparse.Namespace) -> Sizes:
    sizes = Sizes.quick() if args.quick else Sizes()
    overrides = {
        "rounds": args.rounds,
        "consume_messages": args.consume_messages,
        "memory_messages": args.memory_messages,
    }
    sizes = replace(sizes, **{k: v for k, v in overrides.items() if v is not None})
    if args.memory_messages is not None:
        sizes = replace(sizes, memory_interval=max(args.memory_messages // 10, 1))
    return sizes


async def _suite(args: argparse.Namespace) -> dict[str, Any]:
    chosen = list(SCENARIOS) if not args.only else [name.strip() for name in args.only.split(",")]
    every = {**SCENARIOS, **EXTRA_SCENARIOS}
    unknown = [name for name in chosen if name not in every]
    if unknown:
        msg = f"unknown benchmark(s): {', '.join(unknown)}"
        raise SystemExit(msg)
    names = Names.fresh()
    sizes = _sizes(args)
    rows: list[Row] = []
    timings: dict[str, float] = {}
    started = time.perf_counter()
    try:
        bench = await Bench.start(args.url, names, sizes)
        try:
            for name in chosen:
                print(f"[bench] {name} ...", file=sys.stderr, flush=True)
                begin = time.perf_counter()
                rows.extend(await every[name](bench))
                timings[name] = round(time.perf_counter() - begin, 1)
                print(f"[bench] {name}: {timings[name]} s", file=sys.stderr, flush=True)
            server = bench.server_version()
        finally:
            await bench.close()
    finally:
        try:
            await cleanup(args.url, names)
        except Exception as exc:  # the broker is gone: say what may be left behind, keep the first error
            print(f"[bench] could not delete the {names.prefix}.* queues: {exc}", file=sys.stderr)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["bench/run.py", *sys.argv[1:]]),
        "python": platform.python_version(),
        "aio_pika": version("aio-pika"),
        "aiormq": version("aiormq"),
        "pydantic": version("pydantic"),
        "queueable": version("queueable"),
        "rabbitmq": server,
        "loop": args.loop,
        "cpus": os.cpu_count(),
        "machine": f"{platform.system()} {platform.machine()}",
        "sizes": asdict(sizes),
        "seconds": {**timings, "total": round(time.perf_counter() - started, 1)},
        "rows": rows,
        "rounds": bench.rounds,
    }


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    factory = None
    if args.loop == "uvloop":
        import uvloop  # noqa: PLC0415 - optional: pip install 'queueable[uvloop]'

        factory = uvloop.new_event_loop
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            result = runner.run(_suite(args))
    except (ConnectionError, OSError) as exc:
        print(f"bench: cannot reach RabbitMQ at {args.url.split('@')[-1]}: {exc}", file=sys.stderr)
        return 1
    rows: list[Row] = result.pop("rows")
    print(
        f"\nqueueable {result['queueable']} bench, {result['date']}: Python {result['python']}, "
        f"aio-pika {result['aio_pika']}, RabbitMQ {result['rabbitmq']}, {result['cpus']} CPUs, "
        f"loop {result['loop']}, {result['seconds']['total']} s\n"
    )
    print(table(rows))
    print(
        "\nmedian [interquartile range] over rounds; ratio = median [IQR] of the per-round ratios "
        "queueable / baseline (each round paired with the baseline round run next to it)."
    )
    if args.json:
        payload = json.dumps({**result, "results": [row.as_dict() for row in rows]}, indent=2)
        if args.json == "-":
            print(payload)
        else:
            Path(args.json).write_text(payload + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
