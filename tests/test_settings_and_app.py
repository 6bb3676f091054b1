"""Settings from the environment, credential masking, App assembly and loading by module:attribute."""

from __future__ import annotations

import logging
import sys
import textwrap

import pytest

import queueable
from queueable import App, ConfigurationError, Settings, load_app, mask_url
from queueable.transport.memory import MemoryTransport


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("amqp://guest:s3cret@host:5672/vh", "amqp://guest:***@host:5672/vh"),
        ("amqps://u:p%40ss@broker/", "amqps://u:***@broker/"),
        ("amqp://host/", "amqp://host/"),
        ("amqp://user@host/", "amqp://user@host/"),
        ("amqp://u:pw@[::1]:5672/", "amqp://u:***@[::1]:5672/"),
        # schemes urlsplit does not take for schemes (an "_" in the driver's name)
        ("postgresql+psycopg_async://app:s3cret@db/app", "postgresql+psycopg_async://app:***@db/app"),
        ("oracle+cx_oracle://scott:s3cret@db:1521/x", "oracle+cx_oracle://scott:***@db:1521/x"),
        # an unencoded "#" or "?" in the password: urlsplit ends the host there
        ("amqp://guest:12#s3cret@host/", "amqp://***@host/"),
        ("amqp://guest:ab?s3cret@host/vh", "amqp://***@host/vh"),
        (None, "None"),
    ],
)
def test_mask_url_hides_passwords(url, masked):
    """Passwords never survive masking; everything else does."""
    assert mask_url(url) == masked


def test_settings_repr_never_shows_the_password():
    """repr(Settings) is safe to log."""
    settings = Settings(url="amqp://guest:hunter2@localhost/")
    assert "hunter2" not in repr(settings)
    assert "amqp://guest:***@localhost/" in repr(settings)
    assert "hunter2" not in repr(App(settings=settings))


def test_settings_from_env_and_overrides():
    """QUEUEABLE_* variables are read and converted; explicit overrides win."""
    env = {
        "QUEUEABLE_URL": "amqp://h/",
        "QUEUEABLE_QUEUE": "jobs",
        "QUEUEABLE_PREFETCH": "8",
        "QUEUEABLE_QUEUE_TYPE": "classic",
        "QUEUEABLE_REQUIRE_BROKER": "yes",
    }
    settings = Settings.from_env(env, prefetch=16)
    assert (settings.url, settings.default_queue, settings.prefetch) == ("amqp://h/", "jobs", 16)
    assert settings.queue_type == "classic"
    assert settings.require_broker is True


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"QUEUEABLE_PREFETCH": "lots"}, "QUEUEABLE_PREFETCH"),
        ({"QUEUEABLE_URL": "redis://h/"}, "unsupported URL scheme"),
        ({"QUEUEABLE_QUEUE_TYPE": "stream"}, "queue_type"),
        ({"QUEUEABLE_REQUIRE_BROKER": "maybe"}, "expected a boolean"),
    ],
)
def test_bad_settings_fail_early(env, message):
    """Invalid environment values are configuration errors naming the variable or field."""
    with pytest.raises(ConfigurationError, match=message):
        Settings.from_env(env)


def test_unknown_setting_is_refused():
    """merged() with a typo fails instead of being ignored."""
    with pytest.raises(ConfigurationError, match="unknown settings: prefech"):
        Settings().merged(prefech=3)


def test_app_without_url_falls_back_to_memory_with_a_warning(caplog):
    """No broker configured: in-process memory transport, and a warning saying so."""
    with caplog.at_level(logging.WARNING, logger="queueable"):
        transport = App(settings=Settings()).transport
    assert isinstance(transport, MemoryTransport)
    assert transport.autorun is True
    assert "QUEUEABLE_URL is not set" in caplog.text


def test_app_that_requires_a_broker_refuses_to_fall_back():
    """With require_broker, a missing URL is an error, never a silent in-memory queue."""
    with pytest.raises(ConfigurationError, match="a broker is required"):
        _ = App(settings=Settings(require_broker=True)).transport


@pytest.fixture(name="app_module")
def fixture_app_module(tmp_path, monkeypatch):
    source = textwrap.dedent(
        """
        from queueable import App, Settings
        app = App(settings=Settings(url="memory://"))
        def make_app():
            return App(settings=Settings(url="memory://", default_queue="made"))
        not_an_app = 42
        """
    )
    (tmp_path / "my_events_app.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_events_app"
    sys.modules.pop("my_events_app", None)


def test_load_app_by_module_attribute(app_module):
    """module:attribute, module alone (attribute app) and a factory all load."""
    assert isinstance(load_app(f"{app_module}:app"), App)
    assert load_app(app_module) is load_app(f"{app_module}:app")
    assert load_app(f"{app_module}:make_app").settings.default_queue == "made"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_xyz:app", "cannot import 'no_such_module_xyz'"),
        ("{mod}:missing", "has no attribute 'missing'"),
        ("{mod}:not_an_app", "not a queueable.App"),
        (":app", "expected module:attribute"),
    ],
)
def test_load_app_errors_are_clear(app_module, spec, message):
    """Each way of naming the app wrongly gets its own message."""
    with pytest.raises(ConfigurationError, match=message):
        load_app(spec.format(mod=app_module))


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("app = App(\n", r"importing 'broken_app_\w+' failed: SyntaxError: .*broken_app_\w+\.py, line 1"),
        ("import os\nDSN = os.environ['NO_SUCH_VAR_XYZ']\n", r"failed: KeyError: 'NO_SUCH_VAR_XYZ' \(at .*:2\)"),
        (
            "from queueable import App\ndef app():\n    raise RuntimeError('no config')\n",
            r":app\(\) failed: RuntimeError: no config \(at .*:3\)",
        ),
    ],
    ids=["syntax-error", "error-at-import", "factory-raises"],
)
def test_an_app_whose_own_code_fails_is_a_configuration_error_on_one_line(tmp_path, monkeypatch, source, message):
    """The CLIs turn ConfigurationError into exit 5 and one ``error:`` line: an app that does not import (or
    whose factory raises) says where, instead of a traceback and exit 1.
    """
    name = f"broken_app_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(ConfigurationError, match=message) as caught:
            load_app(f"{name}:app")
    finally:
        sys.modules.pop(name, None)
    assert "\n" not in str(caught.value)


def test_public_api_is_pinned():
    """The exported names are deliberate; a change here is a change to the public API."""
    assert sorted(queueable.__all__) == sorted(
        [
            "App",
            "ConfigurationError",
            "Container",
            "DeadLetter",
            "DeadReason",
            "EventDispatcher",
            "Handled",
            "IncomingMessage",
            "Listener",
            "ListenerProvider",
            "MessageTooLargeError",
            "Outcome",
            "OutgoingMessage",
            "Processor",
            "PublishError",
            "QueueableError",
            "Reject",
            "Retry",
            "RetryLater",
            "RetryPolicy",
            "SerializationError",
            "Settings",
            "Stoppable",
            "SvcsContainer",
            "TransportClosedError",
            "UnknownServiceError",
            "correlation_id",
            "event",
            "event_name",
            "event_version",
            "listener",
            "load_app",
            "mask_url",
        ]
    )
    for name in queueable.__all__:
        assert getattr(queueable, name) is not None


def test_error_hierarchy():
    """Library errors share one base and the stdlib bases users already catch."""
    from queueable import errors  # noqa: PLC0415

    assert issubclass(errors.ConfigurationError, ValueError)
    assert issubclass(errors.SerializationError, ValueError)
    assert issubclass(errors.UnknownServiceError, LookupError)
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.QueueableError)
    with pytest.raises(ValueError, match=">= 0"):
        errors.Retry(delay=-1)


def test_public_submodules_export_what_they_document():
    """The documented entry points of the optional features import from public modules."""
    from queueable import asgi, deadletters, outbox, sync, testing  # noqa: PLC0415

    assert deadletters.DeadLetterAdmin.__module__ == "queueable._deadletters"
    assert {"DeadFilter", "DeadLetterAdmin", "parse_since"} <= set(deadletters.__all__)
    assert hasattr(asgi, "DeferredDispatchMiddleware")
    assert hasattr(sync, "SyncDispatcher")
    assert hasattr(outbox, "Outbox")
    assert {"TestTransport", "ManualClock", "MemoryTransport"} <= set(testing.__all__)


def test_quiet_repeats_lets_one_library_line_through_per_window_and_counts_the_rest():
    """Runs of the same aio-pika/aiormq line collapse; queueable's own lines and other templates pass."""
    import logging  # noqa: PLC0415

    from queueable.cli._common import QuietRepeats  # noqa: PLC0415

    now = [0.0]
    quiet = QuietRepeats(window=60, clock=lambda: now[0])

    def record(name: str, msg: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, args, None)

    attempt = "Connection attempt to %s failed: %s"
    assert quiet.filter(record("aio_pika.robust_connection", attempt, "amqp://h", "refused"))
    for second in range(1, 60):
        now[0] = second
        assert not quiet.filter(record("aio_pika.robust_connection", attempt, "amqp://h", "refused"))
        assert quiet.filter(record("queueable.worker", "still here"))
    assert quiet.filter(record("aiormq.connection", "error when creating transport: %r", "refused"))
    now[0] = 60
    shown = record("aio_pika.robust_connection", attempt, "amqp://h", "timeout")
    assert quiet.filter(shown)
    assert shown.getMessage() == (
        "Connection attempt to amqp://h failed: timeout [59 more like this since the last one shown]"
    )


def test_quiet_repeats_turns_a_library_traceback_into_one_line():
    """aiormq logs a broker outage with a 20-line traceback; the worker's own line says what happens next."""
    import logging  # noqa: PLC0415
    import sys  # noqa: PLC0415

    from queueable.cli._common import QuietRepeats  # noqa: PLC0415

    def reset() -> None:
        raise ConnectionResetError(104, "Connection reset by peer (100% gone)")

    try:
        reset()
    except ConnectionResetError:
        exc_info = sys.exc_info()
    quiet = QuietRepeats()
    error = logging.ERROR
    with_args = logging.LogRecord(
        "aiormq.connection", logging.ERROR, __file__, 1, "Unexpected %s", ("close",), exc_info
    )
    without = logging.LogRecord(
        "aio_pika.tools", logging.ERROR, __file__, 1, "Callback 50% failed", None, exc_info
    )
    ours = logging.LogRecord("queueable.worker", error, __file__, 1, "listener failed", None, exc_info)
    for record in (with_args, without, ours):
        assert quiet.filter(record)
    formatter = logging.Formatter("%(message)s")
    assert formatter.format(with_args) == (
        "Unexpected close (ConnectionResetError: [Errno 104] Connection reset by peer (100% gone))"
    )
    assert formatter.format(without) == (
        "Callback 50% failed (ConnectionResetError: [Errno 104] Connection reset by peer (100% gone))"
    )
    assert "Traceback" in formatter.format(ours)  # queueable's own records keep theirs


@pytest.mark.parametrize(
    "url",
    [
        "amqp://u:s3cret@127.0.0.1:notaport/",
        "amqp://u:s3cret@127.0.0.1:99999/",
        "amqp://u:s3cret@[::1:5672/",
        "amqp://u:s3cr/et@host/",  # a "/" in the password ends the netloc: urllib reads 's3cr' as the port
        "amqp://u:s3cr?et@host:1",
    ],
)
def test_a_malformed_broker_url_is_a_configuration_error_that_hides_the_password(url):
    """A port that is not a number, out of range, or a broken IPv6 bracket: one clear error (the CLIs' exit 5),
    where ``mask_url`` itself used to raise and the commands printed a traceback. No piece of the password
    shows, not even the one urllib's own message would quote.
    """
    assert "s3cr" not in mask_url(url)
    with pytest.raises(ConfigurationError, match="malformed broker URL") as caught:
        Settings(url=url)
    assert "s3cr" not in str(caught.value)


def test_threads_that_reach_a_new_app_at_once_share_one_transport_and_dispatcher(monkeypatch):
    """A SyncDispatcher in a threaded server: the first requests make the app's transport and dispatcher at
    the same moment. Exactly one of each is made (a second transport would be a connection nobody closes).
    """
    import threading  # noqa: PLC0415
    import time  # noqa: PLC0415

    app = App(settings=Settings(url="amqp://guest:guest@127.0.0.1:1/"))
    made: list[object] = []
    real = app._make_transport

    def slow_make() -> object:
        time.sleep(0.05)  # widen the window in which a second thread would make its own
        transport = real()
        made.append(transport)
        return transport

    monkeypatch.setattr(app, "_make_transport", slow_make)
    barrier = threading.Barrier(8)
    seen: list[object] = []

    def first_use() -> None:
        barrier.wait()
        seen.append(app.dispatcher)

    threads = [threading.Thread(target=first_use) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert len(made) == 1
    assert len({id(dispatcher) for dispatcher in seen}) == 1
    assert all(dispatcher.transport is made[0] for dispatcher in seen)
