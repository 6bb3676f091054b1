"""Dead-letter administration without a broker: filters, --since, the table, the export line format, dry run."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pydantic import BaseModel

from queueable import App, Container, RetryPolicy, Settings
from queueable._deadletters import (
    DeadFilter,
    DeadLetterAdmin,
    DeadMessage,
    ExportFormatError,
    QueueKind,
    QueueStatus,
    decode_export_line,
    dry_run,
    encode_export_line,
    format_table,
    group_counts,
    kind_of,
    parse_since,
    table_row,
)
from queueable._wire import (
    H_ATTEMPT,
    H_DEAD_AT,
    H_DEAD_REASON,
    H_ERROR_MESSAGE,
    H_ERROR_TRACEBACK,
    H_ERROR_TYPE,
    H_EVENT,
    H_LISTENER,
    H_ORIGINAL_QUEUE,
    H_REPLAYS,
)
from queueable.cli import main
from queueable.errors import ConfigurationError

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def letter(
    message_id: str = "m1",
    *,
    listener: str = "mailer:notify",
    event: str = "blog.comment_posted",
    error_type: str = "smtplib.SMTPException",
    dead_at: datetime | None = NOW,
    reason: str = "retries_exhausted",
    **headers: Any,
) -> DeadMessage:
    base: dict[str, Any] = {
        H_LISTENER: listener,
        H_EVENT: event,
        H_ERROR_TYPE: error_type,
        H_ERROR_MESSAGE: "connection refused",
        H_DEAD_REASON: reason,
        H_ATTEMPT: 5,
        H_ORIGINAL_QUEUE: "emails",
    }
    if dead_at is not None:
        base[H_DEAD_AT] = dead_at.isoformat(timespec="milliseconds")
    base.update(headers)
    return DeadMessage(
        queue="emails.dead", position=0, body=b'{"post_id":1}', headers=base, properties={"message_id": message_id}
    )


# -- filters ----------------------------------------------------------------------------------------------


def test_empty_filter_selects_everything() -> None:
    """A filter with no criteria matches any letter and says it is empty."""
    assert DeadFilter().matches(letter())
    assert DeadFilter().is_empty
    assert not DeadFilter(listener="x").is_empty


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        (DeadFilter(listener="mailer:notify"), True),
        (DeadFilter(listener="mailer:*"), True),
        (DeadFilter(listener="billing:*"), False),
        (DeadFilter(event="blog.*"), True),
        (DeadFilter(event="shop.*"), False),
        (DeadFilter(error="SMTPException"), True),
        (DeadFilter(error="smtplib.SMTPException"), True),
        (DeadFilter(error="smtplib.*"), True),
        (DeadFilter(error="TimeoutError"), False),
        (DeadFilter(reason="retries_*"), True),
        (DeadFilter(reason="schema"), False),
        (DeadFilter(ids=frozenset({"m1", "m2"})), True),
        (DeadFilter(ids=frozenset({"m2"})), False),
        (DeadFilter(since=NOW - timedelta(minutes=1)), True),
        (DeadFilter(since=NOW), True),
        (DeadFilter(since=NOW + timedelta(seconds=1)), False),
        (DeadFilter(listener="mailer:*", error="TimeoutError"), False),
    ],
)
def test_filter_criteria(flt: DeadFilter, expected: bool) -> None:
    """Each criterion is a shell pattern (error also on the unqualified name) and all must hold."""
    assert flt.matches(letter()) is expected


def test_filter_is_case_sensitive_and_needs_the_field() -> None:
    """Patterns are case-sensitive, and a letter without the field never matches a criterion on it."""
    assert not DeadFilter(listener="Mailer:*").matches(letter())
    bare = DeadMessage(queue="q.dead", position=0, body=b"", headers={})
    assert not DeadFilter(listener="*").matches(bare)
    assert not DeadFilter(since=NOW - timedelta(days=365)).matches(bare)


# -- --since ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "delta"),
    [
        ("30s", timedelta(seconds=30)),
        ("15m", timedelta(minutes=15)),
        ("15min", timedelta(minutes=15)),
        ("1h", timedelta(hours=1)),
        ("1.5h", timedelta(minutes=90)),
        ("2d", timedelta(days=2)),
        ("1w", timedelta(weeks=1)),
        (" 2H ", timedelta(hours=2)),
    ],
)
def test_since_durations(text: str, delta: timedelta) -> None:
    """A duration means that long before now."""
    assert parse_since(text, now=NOW) == NOW - delta


def test_since_iso_times() -> None:
    """An ISO time is taken as given, and as UTC when it has no offset."""
    assert parse_since("2026-11-28T10:00:00+01:00", now=NOW) == datetime(2026, 11, 28, 9, 0, tzinfo=UTC)
    assert parse_since("2026-11-28T10:00:00", now=NOW) == datetime(2026, 11, 28, 10, 0, tzinfo=UTC)
    assert parse_since("2026-11-28", now=NOW) == datetime(2026, 11, 28, tzinfo=UTC)


@pytest.mark.parametrize("text", ["", "yesterday", "1y", "-1h", "h"])
def test_since_rejects_nonsense(text: str) -> None:
    """Anything else is a ValueError that names the accepted forms."""
    with pytest.raises(ValueError, match="duration"):
        parse_since(text, now=NOW)


# -- derived fields ---------------------------------------------------------------------------------------


def test_broker_dead_lettered_message_reports_delivery_limit() -> None:
    """A letter with only x-death says delivery_limit, with the broker's time and the queue it died in."""
    death_time = datetime(2026, 11, 29, 11, 0, tzinfo=UTC)
    message = DeadMessage(
        queue="emails.dead",
        position=3,
        body=b"{}",
        headers={
            H_LISTENER: "mailer:notify",
            "x-death": [{"count": 1, "reason": "delivery_limit", "queue": "emails", "time": death_time}],
        },
    )
    assert message.reason == "delivery_limit"
    assert message.dead_at == death_time
    assert message.original_queue == "emails"
    assert message.error_type is None
    assert "kept dying" in (message.error_message or "")
    assert message.attempt == 1
    assert DeadFilter(reason="delivery_limit").matches(message)


def test_summary_and_details_are_json_safe() -> None:
    """summary() is flat; details() adds headers, properties, traceback and the body (base64 if binary)."""
    message = letter(**{H_REPLAYS: 2, H_ERROR_TRACEBACK: "Traceback...", "raw": b"\xff"})
    summary = message.summary()
    assert summary["id"] == "m1"
    assert summary["replays"] == 2
    assert summary["dead_at"] == "2026-11-29T12:00:00.000+00:00"
    details = message.details()
    assert details["traceback"] == "Traceback..."
    assert details["body"] == '{"post_id":1}'
    assert details["headers"]["raw"] == {"$bytes": "/w=="}
    json.dumps(details)
    binary = DeadMessage(queue="q.dead", position=0, body=b"\xff\xfe", headers={})
    assert binary.details()["body_base64"] == "//4="
    assert binary.reason == "unknown"
    assert binary.original_queue == "q"


# -- table and groups -------------------------------------------------------------------------------------


def test_table_aligns_columns_and_truncates_long_cells() -> None:
    """Columns are padded to the widest cell; long or multi-line cells become one line ending in an ellipsis."""
    text = format_table(
        ("A", "LONG HEADER"), [["x", "short"], ["yyyy", "line one\nline two " + "z" * 50]], max_width=20
    )
    lines = text.splitlines()
    assert lines[0] == "A     LONG HEADER"
    assert lines[1] == "x     short"
    assert lines[2].startswith("yyyy  line one line two")
    assert lines[2].endswith("…")
    assert len(lines[2]) == 6 + 20


def test_table_row_of_a_letter() -> None:
    """A row shows id, time, original queue, listener, event, reason, attempt and the short error type."""
    row = table_row(letter())
    assert row == [
        "m1",
        "2026-11-29 12:00:00",
        "emails",
        "mailer:notify",
        "blog.comment_posted",
        "retries_exhausted",
        "5",
        "SMTPException: connection refused",
    ]


def test_group_counts_largest_first() -> None:
    """Groups are counted and sorted by count, then name; a missing value is '-'."""
    letters = [
        letter("a", listener="x"),
        letter("b", listener="y"),
        letter("c", listener="y"),
        DeadMessage(queue="q.dead", position=0, body=b"", headers={}),
    ]
    assert group_counts(letters, "listener") == [("y", 2), ("-", 1), ("x", 1)]
    assert group_counts(letters, "error") == [("smtplib.SMTPException", 3), ("unknown", 1)]
    with pytest.raises(ValueError, match="cannot group by"):
        group_counts(letters, "colour")


# -- export line format -----------------------------------------------------------------------------------


def test_export_line_round_trips_every_header_type() -> None:
    """Every AMQP value type, nested, and every property come back equal; the line is one JSON object."""
    headers = {
        "s": "text",
        "i": 7,
        "f": 0.5,
        "b": False,
        "n": None,
        "raw": b"\x00\xff",
        "when": datetime(2026, 1, 1, tzinfo=UTC),
        "dec": Decimal("1.25"),
        "list": [1, {"nested": b"\x01"}],
        "tagged-looking": {"$bytes": "not base64!"},
    }
    properties = {
        "message_id": "m1",
        "correlation_id": "c1",
        "content_type": "application/json",
        "timestamp": 1_700_000_000,
        "type": "t",
        "delivery_mode": 2,
        "expiration": 1500,
    }
    original = DeadMessage(queue="q.dead", position=0, body=b"\xff\x00", headers=headers, properties=properties)
    line = encode_export_line(original)
    assert "\n" not in line
    record = json.loads(line)
    assert record["v"] == 1
    assert record["queue"] == "q.dead"
    assert record["headers"]["raw"] == {"$bytes": "AP8="}
    back = decode_export_line(line)
    assert back.body == original.body
    assert back.headers == headers
    assert back.properties == properties
    assert encode_export_line(back) == line


def test_export_line_sorts_table_keys() -> None:
    """Tables are written with sorted keys, so the same table in another order exports to the same bytes."""
    one = DeadMessage(queue="q.dead", position=0, body=b"", headers={"b": 1, "a": {"y": 1, "x": 2}})
    two = DeadMessage(queue="q.dead", position=0, body=b"", headers={"a": {"x": 2, "y": 1}, "b": 1})
    assert encode_export_line(one) == encode_export_line(two)


@pytest.mark.parametrize(
    "line",
    [
        "not json",
        "[1, 2]",
        '{"v": 2, "queue": "q", "headers": {}, "body_b64": ""}',
        '{"v": 1, "queue": "q", "headers": {}}',
        '{"v": 1, "queue": "q", "headers": {}, "body_b64": "***"}',
        '{"v": 1, "queue": "", "headers": {}, "body_b64": ""}',
        '{"v": 1, "queue": "q", "properties": {"colour": "red"}, "body_b64": ""}',
    ],
)
def test_export_line_rejects_bad_records(line: str) -> None:
    """A line that is not a complete version-1 record is an ExportFormatError."""
    with pytest.raises(ExportFormatError):
        decode_export_line(line)


# -- dry run ----------------------------------------------------------------------------------------------


class Posted(BaseModel):
    post_id: int


def notify(event: Posted) -> None:
    """A queued listener for the dry-run tests."""


@pytest.fixture(name="blog_app")
def fixture_blog_app() -> App:
    app = App(settings=Settings(url="memory://"), default_retry=RetryPolicy.never())
    app.add_listener(notify, queue=True, id="blog:notify")
    return app


def test_dry_run_accepts_a_valid_payload(blog_app: App) -> None:
    """A letter the current code can decode, for a listener it has, would run."""
    message = letter(listener="blog:notify", event="tests.test_deadletters_units.Posted")
    result = dry_run(blog_app, message)
    assert result.ok, result
    assert result.as_dict()["would"] == "run"


def test_dry_run_reports_schema_and_unknown_listener(blog_app: App) -> None:
    """A payload that fails the model, or a listener the app lacks, would fail again, with the reason."""
    bad_body = DeadMessage(
        queue="emails.dead",
        position=0,
        body=b'{"post_id": "not a number"}',
        headers={H_LISTENER: "blog:notify", H_ORIGINAL_QUEUE: "emails"},
    )
    assert dry_run(blog_app, bad_body).reason == "schema"
    gone = letter(listener="blog:removed")
    result = dry_run(blog_app, gone)
    assert not result.ok
    assert result.reason == "unknown_listener"


class Ghost:
    """A service whose constructor fails (a missing credential, say)."""

    def __init__(self) -> None:
        msg = "SMTP_PASSWORD is not set"
        raise RuntimeError(msg)

    def handle(self, event: Posted) -> None:
        """Never reached."""


def test_dry_run_reports_a_service_that_cannot_be_built() -> None:
    """A service listener whose service the container cannot build would fail again as 'service'."""
    app = App(settings=Settings(url="memory://"))
    assert isinstance(app.container, Container)
    app.container.register("ghost", Ghost)
    app.add_listener_service("ghost", "handle", Posted, queue=True)
    message = DeadMessage(
        queue="queueable.dead", position=0, body=b'{"post_id": 1}', headers={H_LISTENER: "ghost:handle"}
    )
    result = dry_run(app, message)
    assert not result.ok
    assert result.reason == "service"
    assert "SMTP_PASSWORD is not set" in (result.error or "")


# -- admin construction and queue kinds -------------------------------------------------------------------


def test_admin_needs_a_broker_url_and_normalises_queue_names() -> None:
    """memory:// is a configuration error; Q and Q.dead name the same queue; no queues means the default."""
    with pytest.raises(ConfigurationError, match="dead letters live in RabbitMQ"):
        DeadLetterAdmin(Settings(url="memory://"), [])
    admin = DeadLetterAdmin(Settings(url="amqp://localhost/"), ["a", "a.dead", "b"])
    assert admin.queues == ["a", "b"]
    assert admin.dead_queues == ["a.dead", "b.dead"]
    assert DeadLetterAdmin(Settings(url="amqp://localhost/", default_queue="jobs"), []).queues == ["jobs"]


def test_queue_kinds() -> None:
    """Work, dead-letter and delay queues are told apart by the fixed naming scheme."""
    assert kind_of("emails") is QueueKind.WORK
    assert kind_of("emails.dead") is QueueKind.DEAD
    assert kind_of("emails.delay.1600") is QueueKind.DELAY
    assert kind_of("emails.delay.soon") is QueueKind.WORK


# -- CLI usage errors (no broker needed) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["dead", "replay"], "give IDs, or --all"),
        (["dead", "replay", "id1", "--all"], "not both"),
        (["dead", "purge", "--all"], "--yes"),
        (["dead", "list", "--since", "soonish"], "--since"),
        (["dead", "list", "--limit", "0"], "--limit"),
        (["dead", "replay", "--all", "--rate", "0"], "--rate"),
    ],
)
def test_cli_usage_errors_exit_2(args: list[str], needle: str) -> None:
    """Bad selections and options are usage errors (exit 2) before any connection is made."""
    result = CliRunner().invoke(main, args, env={"QUEUEABLE_URL": "amqp://guest:guest@127.0.0.1:1/"})
    assert result.exit_code == 2, result.output
    assert needle in result.output


def test_a_reader_that_closes_the_pipe_is_not_reported_as_a_broker_failure(tmp_path: Path) -> None:
    """`queueable dead list --json | head -1`: BrokenPipeError is a ConnectionError, which the commands map to
    'broker unreachable' (exit 3). When stdout is the closed pipe it is a silent exit 141, as for a command
    killed by SIGPIPE; a broken pipe elsewhere (the broker's socket) is still exit 3.
    """
    script = tmp_path / "pipe.py"
    script.write_text(
        "import click\n"
        "from queueable.cli._common import cli_errors\n"
        "@click.command()\n"
        "@cli_errors\n"
        "def command():\n"
        "    raise BrokenPipeError(32, 'Broken pipe')\n"
        "command()\n"
    )
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the command writes
    closed = subprocess.run([sys.executable, str(script)], stdout=write, stderr=subprocess.PIPE, check=False)  # noqa: S603
    os.close(write)
    assert (closed.returncode, closed.stderr) == (141, b"")
    open_pipe = subprocess.run([sys.executable, str(script)], capture_output=True, check=False)  # noqa: S603
    assert open_pipe.returncode == 3
    assert b"broker unreachable" in open_pipe.stderr


@pytest.mark.parametrize("command", [["status"], ["topology", "declare"]])
def test_status_and_topology_take_the_app_from_queueable_app(command: list[str]) -> None:
    """As the dead commands do (docs/operations.md): QUEUEABLE_APP names the app when APP is not given."""
    env = {"QUEUEABLE_URL": "amqp://guest:guest@127.0.0.1:1/", "QUEUEABLE_APP": "no_such_module_qtest:app"}
    result = CliRunner().invoke(main, command, env=env)
    assert result.exit_code == 5, result.output
    assert "cannot import 'no_such_module_qtest'" in result.output


def test_without_any_url_the_error_says_none_is_set() -> None:
    """Not '(got memory://)', which the user never wrote: memory:// is only the fallback."""
    with pytest.raises(ConfigurationError, match=r"\(no URL is set\)"):
        DeadLetterAdmin(Settings(url=None), [])
    with pytest.raises(ConfigurationError, match=r"\(got memory://\)"):
        DeadLetterAdmin(Settings(url="memory://"), [])


def test_a_dry_run_reports_one_line_per_letter(capsys: pytest.CaptureFixture[str]) -> None:
    """pydantic's errors span several lines; the report keeps one line per letter (and '-' for no listener)."""
    from queueable._deadletters import DryRunResult  # noqa: PLC0415
    from queueable.cli.dead import _report_dry_run  # noqa: PLC0415

    schema_error = "1 validation error for CommentPosted\npost_id\n  Field required [type=missing]"
    _report_dry_run(
        [
            DryRunResult(letter("m1"), ok=False, reason="schema", error=schema_error),
            DryRunResult(letter("m2", listener=None), ok=True),  # type: ignore[arg-type]
        ],
        as_json=False,
    )
    lines = capsys.readouterr().out.splitlines()
    failed = "FAIL  m1  mailer:notify  schema: 1 validation error for CommentPosted post_id Field required"
    assert lines == [f"{failed} [type=missing]", "ok    m2  -"]


def test_cli_memory_url_is_a_configuration_error() -> None:
    """Without a broker URL the dead commands exit 5 with one line."""
    result = CliRunner().invoke(main, ["dead", "list"], env={"QUEUEABLE_URL": "memory://"})
    assert result.exit_code == 5
    assert "dead letters live in RabbitMQ" in result.output


# -- status through the management API --------------------------------------------------------------------


@pytest.fixture(name="management")
def fixture_management() -> Any:
    """A local stand-in for RabbitMQ's management API that answers GET /api/queues/<vhost>."""
    import threading  # noqa: PLC0415
    from http.server import BaseHTTPRequestHandler, HTTPServer  # noqa: PLC0415

    seen: list[tuple[str, str | None]] = []
    queues = [
        {"name": "jobs", "messages_ready": 4, "messages_unacknowledged": 2, "consumers": 3},
        {"name": "jobs.dead", "messages_ready": 1, "messages_unacknowledged": 0, "consumers": 0, "type": "quorum"},
        {"name": "jobs.delay.1000", "messages_ready": 7, "messages_unacknowledged": 0, "consumers": 0},
        {"name": "jobs.delay.250", "messages_ready": 1, "messages_unacknowledged": 0, "consumers": 0},
        {"name": "other.delay.250", "messages_ready": 9, "messages_unacknowledged": 0, "consumers": 0},
    ]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append((self.path, self.headers.get("Authorization")))
            answer: Any = {"rabbitmq_version": "4.0.5"} if self.path == "/api/overview" else queues
            body = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://admin:s3cret@127.0.0.1:{server.server_port}", seen
    server.shutdown()
    server.server_close()


def test_management_status_adds_unacked_and_delay_queues(management: Any) -> None:
    """The management API fills in unacked counts and lists this queue's delay queues, sorted by delay."""
    from queueable.cli.status import management_status  # noqa: PLC0415

    url, seen = management
    rows = [
        QueueStatus("jobs", QueueKind.WORK, exists=True, ready=4, consumers=3),
        QueueStatus("jobs.dead", QueueKind.DEAD, exists=True, ready=1, consumers=0),
    ]
    completed = management_status(url, "/", ["jobs"], rows)
    assert [(r.name, r.ready, r.unacked) for r in completed] == [
        ("jobs", 4, 2),
        ("jobs.dead", 1, 0),
        ("jobs.delay.250", 1, 0),
        ("jobs.delay.1000", 7, 0),
    ]
    path, auth = seen[0]
    assert path.startswith("/api/queues/%2F?")
    assert auth == "Basic YWRtaW46czNjcmV0"


def test_management_status_warns_of_a_delivery_limit_that_drops_dead_letters(management: Any) -> None:
    """With ``warnings``, the broker's version is asked too: RabbitMQ 4's default limit applies to jobs.dead."""
    from queueable.cli.status import management_status  # noqa: PLC0415

    url, seen = management
    rows = [QueueStatus("jobs.dead", QueueKind.DEAD, exists=True, ready=1, consumers=0)]
    warnings: list[str] = []
    management_status(url, "/", ["jobs"], rows, warnings=warnings)
    assert [path for path, _ in seen] == [seen[0][0], "/api/overview"]
    assert len(warnings) == 1
    assert "jobs.dead has no delivery limit of its own" in warnings[0]
    assert "default of 20" in warnings[0]
    assert "delivery-limit: -1" in warnings[0]


@pytest.mark.parametrize(
    ("version", "info", "expected"),
    [
        ("3.10.8", {"type": "quorum"}, None),  # 3.x: no limit unless set
        ("3.13.7", {"type": "quorum", "arguments": {"x-delivery-limit": -1}}, "only from RabbitMQ 4.0 on"),
        (
            "3.10.8",
            {"type": "quorum", "effective_policy_definition": {"delivery-limit": 2}},
            "limit of 2 (from a policy)",
        ),
        ("4.0.5", {"type": "quorum"}, "default of 20"),
        ("4.1.0", {"type": "quorum", "effective_policy_definition": {"delivery-limit": -1}}, None),
        ("4.1.0", {"type": "quorum", "arguments": {"x-delivery-limit": -1}}, None),
        (
            "4.1.0",
            {
                "type": "quorum",
                "arguments": {"x-delivery-limit": 50},
                "effective_policy_definition": {"delivery-limit": 5},
            },
            "limit of 5 (from a policy)",
        ),
        ("4.1.0", {"type": "classic"}, None),  # classic queues have no delivery limit
        (None, {"type": "quorum"}, None),  # version unknown: only an explicit limit is reported
        (None, {"type": "quorum", "arguments": {"x-delivery-limit": 3}}, "limit of 3 (from its x-delivery-limit"),
    ],
)
def test_dead_letter_limit_warnings(version: str | None, info: dict[str, Any], expected: str | None) -> None:
    """A dead-letter queue is safe to read only without a delivery limit: what counts as one on each version."""
    from queueable.cli.status import dead_letter_limit_warnings  # noqa: PLC0415

    found = dead_letter_limit_warnings(
        version, {"jobs.dead": {"name": "jobs.dead", **info}}, ["jobs.dead", "gone.dead"]
    )
    if expected is None:
        assert found == []
    else:
        assert len(found) == 1
        assert expected in found[0]
        assert found[0].startswith("jobs.dead ")


def test_management_status_unreachable_is_a_broker_error() -> None:
    """A management URL that does not answer exits 3 with one line, without the password."""
    from queueable.cli._common import CliError  # noqa: PLC0415
    from queueable.cli.status import management_status  # noqa: PLC0415

    with pytest.raises(CliError) as caught:
        management_status("http://guest:topsecret@127.0.0.1:1", "/", ["jobs"], [])
    assert caught.value.exit_code == 3
    assert "topsecret" not in caught.value.format_message()


# -- progress ---------------------------------------------------------------------------------------------


class FakeTerminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bar is drawn on a terminal stderr for runs longer than one letter, and never otherwise."""
    from queueable.cli.dead import _Progress  # noqa: PLC0415

    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with _Progress("replaying", 3, enabled=True) as step:
        for _ in range(3):
            step(letter())
    assert "replaying" in terminal.getvalue()
    assert "100%" in terminal.getvalue()

    quiet = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    with _Progress("replaying", 3, enabled=False) as step:
        step(letter())
    with _Progress("replaying", 1, enabled=True) as step:
        step(letter())
    assert quiet.getvalue() == ""

    piped = io.StringIO()
    monkeypatch.setattr(sys, "stderr", piped)
    with _Progress("replaying", 3, enabled=True) as step:
        step(letter())
    assert piped.getvalue() == ""
