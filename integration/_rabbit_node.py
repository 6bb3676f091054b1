"""A private, throw-away RabbitMQ node for broker-restart tests (no Docker needed).

::

    node = RabbitNode(base_dir)      # its own node name, ports, data dir, cookie and config
    node.start()                     # blocks until the node answers the AMQP handshake
    node.url                         # amqp://guest:guest@127.0.0.1:<port>/
    node.restart()                   # graceful stop, start again with the same data (durable queues survive)
    node.kill()                      # SIGKILL of the node's own process group: a broker crash
    node.stop()

It runs ``rabbitmq-server`` in the foreground as our child, in its own session, so we own its pid and never
touch the machine's shared node on 5672 (which ``rabbitmqctl -n <our node>`` cannot address by mistake). It
shares the system epmd on 4369, which serves many nodes. Adapted from the research prototype
(``scratch/research/rabbit_node.py``): a cold start takes about 4 s, a graceful stop about 1.5 s.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types import TracebackType

SBIN = Path(os.environ.get("RABBITMQ_SBIN", "/usr/lib/rabbitmq/bin"))
_AMQP_HEADER = b"AMQP\x00\x00\x09\x01"


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def available() -> bool:
    """Whether a RabbitMQ server installation exists to run a private node from."""
    return (SBIN / "rabbitmq-server").exists() and (SBIN / "rabbitmqctl").exists()


class RabbitNode:
    """One private RabbitMQ node: ``start()``, ``stop()``, ``restart()`` (keeping data), ``kill()``, ``url``."""

    def __init__(self, base_dir: str | os.PathLike[str] | None = None, *, name: str | None = None) -> None:
        self._own_dir = base_dir is None
        self.base = Path(base_dir) if base_dir is not None else Path(tempfile.mkdtemp(prefix="qtest-rabbit-"))
        self.port = free_port()
        self.dist_port = free_port()
        self.nodename = f"{name or 'qtest-' + uuid.uuid4().hex[:8]}@localhost"
        self.proc: subprocess.Popen[bytes] | None = None
        self._prepare()

    def _prepare(self) -> None:
        for sub in ("mnesia", "log", "home"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        cookie = self.base / "home" / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(uuid.uuid4().hex.upper())
            cookie.chmod(0o400)
        (self.base / "enabled_plugins").write_text("[].\n")
        (self.base / "rabbitmq-env.conf").write_text("")  # shadows /etc/rabbitmq/rabbitmq-env.conf
        conf = {
            "listeners.tcp.1": f"127.0.0.1:{self.port}",
            "loopback_users.guest": "true",
            "log.console": "false",
            "log.file.level": "info",
        }
        (self.base / "rabbitmq.conf").write_text("".join(f"{k} = {v}\n" for k, v in conf.items()))

    @property
    def env(self) -> dict[str, str]:
        """The environment of the server and of ``rabbitmqctl`` for this node (never the shared one's)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
        env.update(
            {
                "HOME": str(self.base / "home"),  # the erlang cookie, for the server and the CLI
                "RABBITMQ_NODENAME": self.nodename,
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(self.port),
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_CONF_ENV_FILE": str(self.base / "rabbitmq-env.conf"),
                "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.base / "advanced.config"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
                "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
                "RABBITMQ_LOG_BASE": str(self.base / "log"),
                "RABBITMQ_PID_FILE": str(self.base / "rabbit.pid"),
                "ERL_EPMD_ADDRESS": "127.0.0.1",
                "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            }
        )
        return env

    @property
    def url(self) -> str:
        """The AMQP URL of this node."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``rabbitmqctl -n <this node> *args``."""
        return subprocess.run(
            [str(SBIN / "rabbitmqctl"), "-n", self.nodename, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self, timeout: float = 60) -> float:
        """Start the node and block until it answers the AMQP handshake; returns the seconds it took."""
        if self.running:
            msg = f"node {self.nodename} is already running"
            raise RuntimeError(msg)
        started = time.monotonic()
        with (self.base / "log" / "stdout.log").open("ab") as out:
            self.proc = subprocess.Popen(
                [str(SBIN / "rabbitmq-server")],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.base,
                start_new_session=True,  # its own process group: kill() reaches beam and nothing else
            )
        while not self._amqp_ready():
            if self.proc.poll() is not None:
                msg = f"rabbitmq-server exited with {self.proc.returncode}; see {self.base / 'log'}"
                raise RuntimeError(msg)
            if time.monotonic() - started > timeout:
                self._signal_group(signal.SIGKILL)
                msg = f"node {self.nodename} not ready after {timeout} s; see {self.base / 'log'}"
                raise TimeoutError(msg)
            time.sleep(0.1)
        return time.monotonic() - started

    def _amqp_ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(_AMQP_HEADER)
                frame = sock.recv(7)
        except OSError:
            return False
        return len(frame) == 7 and frame[0] == 1  # a method frame: Connection.Start

    def stop(self, timeout: float = 60) -> float:
        """Stop gracefully (``rabbitmqctl stop``), else SIGTERM/SIGKILL our own process group."""
        started = time.monotonic()
        if not self.running:
            return 0.0
        assert self.proc is not None
        result = self.ctl("stop", timeout=timeout)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGTERM)
        if result.returncode != 0 and self.running:
            self._signal_group(signal.SIGTERM)
        self._wait_port_closed(10)
        return time.monotonic() - started

    def kill(self) -> None:
        """A broker crash: SIGKILL the node's process group."""
        self._signal_group(signal.SIGKILL)
        self._wait_port_closed(10)

    def restart(self) -> tuple[float, float]:
        """Graceful stop, then start with the same data directory; returns (stop seconds, start seconds)."""
        return self.stop(), self.start()

    def _signal_group(self, sig: signal.Signals) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def _wait_port_closed(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            except OSError:
                return
            time.sleep(0.1)

    def cleanup(self) -> None:
        """Stop the node and remove its directory if this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> RabbitNode:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RabbitNode {self.nodename} port={self.port} {state}>"
