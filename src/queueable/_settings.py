"""``Settings``: connection and behaviour knobs, from code or from ``QUEUEABLE_*`` environment variables."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from queueable._consumer import DEFAULT_MAX_BODY_SIZE
from queueable._provider import DEFAULT_QUEUE
from queueable.errors import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Settings", "mask_url"]

QueueType = Literal["quorum", "classic"]


#: A scheme as urlsplit takes it (RFC 3986: a letter, then letters, digits, "+", "-" and ".").
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*")


def mask_url(url: str | None) -> str:
    """``url`` with its password replaced by ``***``; safe for logs, errors and reprs."""
    if not url:
        return repr(url)
    scheme, sep, rest = url.partition("://")
    if sep and not _SCHEME.fullmatch(scheme):
        # urlsplit reads a scheme with other characters (SQLAlchemy's "postgresql+psycopg_async") as a path and
        # would find no password: mask the URL under a plain scheme, then put the real one back.
        return scheme + mask_url("x://" + rest)[1:]
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a port that is not a number in range
    except ValueError:  # malformed: mask everything up to the last "@" (a password may hold "/" or "@")
        return re.sub(r"://.*@", "://***@", url, flags=re.DOTALL)
    if "@" not in parts.netloc and "@" in url:
        # An "@" past the host: a password holding "#", "?" or "/" unencoded ("u:12#s3cret@host" reads as host
        # "u", port 12): other readers of the URL may take it for the password, so hide all of it.
        return re.sub(r"://.*@", "://***@", url, flags=re.DOTALL)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}"
    if port is not None:
        netloc += f":{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _check_url(url: str) -> None:
    """``ConfigurationError`` for a broker URL that cannot be used as written (scheme, port, brackets)."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # a port that is not a number in 0-65535
    except ValueError:
        # Not urllib's own message: it quotes the text it could not read as a port, which can be part of a
        # password holding "/" or "?" (quote those as %2F and %3F).
        msg = (
            f"malformed broker URL {mask_url(url)}: the port must be a number from 0 to 65535, an IPv6 host "
            "needs its [brackets], and '/', '?', '#' and '@' in a user name or password must be %-encoded"
        )
        raise ConfigurationError(msg) from None
    if parts.scheme not in ("amqp", "amqps", "memory"):
        msg = f"unsupported URL scheme in {mask_url(url)}: use amqp://, amqps:// or memory://"
        raise ConfigurationError(msg)


@dataclass(frozen=True, slots=True)
class Settings:
    """How queueable talks to the broker. ``Settings.from_env()`` reads ``QUEUEABLE_URL`` and friends.

    ``url``: ``amqp://user:pass@host:5672/vhost`` or ``amqps://…`` for TLS; ``memory://`` runs queued listeners
    in-process (no durability). ``None`` falls back to ``memory://`` with a warning, unless
    ``require_broker`` (``QUEUEABLE_REQUIRE_BROKER=1``) makes that an error, as it should be in production.
    """

    url: str | None = None
    default_queue: str = DEFAULT_QUEUE
    exchange: str = "queueable"
    queue_type: QueueType = "quorum"
    delivery_limit: int = 20
    max_body_size: int = DEFAULT_MAX_BODY_SIZE
    publish_timeout: float = 30.0
    connect_timeout: float = 10.0
    prefetch: int = 64
    require_broker: bool = False
    tls: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.queue_type not in ("quorum", "classic"):
            msg = f"queue_type must be 'quorum' or 'classic', got {self.queue_type!r}"
            raise ConfigurationError(msg)
        for name in ("max_body_size", "prefetch", "delivery_limit"):
            if getattr(self, name) < 1:
                msg = f"{name} must be >= 1, got {getattr(self, name)}"
                raise ConfigurationError(msg)
        if self.url is not None:
            _check_url(self.url)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``QUEUEABLE_URL``, ``QUEUEABLE_QUEUE``, ``QUEUEABLE_EXCHANGE``,
        ``QUEUEABLE_QUEUE_TYPE``, ``QUEUEABLE_PREFETCH``, ``QUEUEABLE_MAX_BODY_SIZE``,
        ``QUEUEABLE_PUBLISH_TIMEOUT``, ``QUEUEABLE_REQUIRE_BROKER``, ``QUEUEABLE_DELIVERY_LIMIT``,
        ``QUEUEABLE_CONNECT_TIMEOUT`` and ``QUEUEABLE_TLS_*``; explicit ``overrides`` win.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        mapping: dict[str, tuple[str, Callable[[str], Any]]] = {
            "QUEUEABLE_URL": ("url", str),
            "QUEUEABLE_QUEUE": ("default_queue", str),
            "QUEUEABLE_EXCHANGE": ("exchange", str),
            "QUEUEABLE_QUEUE_TYPE": ("queue_type", str),
            "QUEUEABLE_PREFETCH": ("prefetch", int),
            "QUEUEABLE_MAX_BODY_SIZE": ("max_body_size", int),
            "QUEUEABLE_PUBLISH_TIMEOUT": ("publish_timeout", float),
            "QUEUEABLE_REQUIRE_BROKER": ("require_broker", _flag),
            "QUEUEABLE_DELIVERY_LIMIT": ("delivery_limit", int),
            "QUEUEABLE_CONNECT_TIMEOUT": ("connect_timeout", float),
        }
        for var, (name, convert) in mapping.items():
            raw = env.get(var)
            if raw:
                try:
                    values[name] = convert(raw)
                except ValueError as exc:
                    msg = f"{var}: {exc}"
                    raise ConfigurationError(msg) from exc
        # amqps:// options (see queueable.transport.rabbitmq.ssl_context): QUEUEABLE_TLS_CAFILE, _CERTFILE,
        # _KEYFILE, _VERIFY (default true).
        tls: dict[str, Any] = {}
        for key in ("cafile", "certfile", "keyfile"):
            if env.get(f"QUEUEABLE_TLS_{key.upper()}"):
                tls[key] = env[f"QUEUEABLE_TLS_{key.upper()}"]
        if env.get("QUEUEABLE_TLS_VERIFY"):
            try:
                tls["verify"] = _flag(env["QUEUEABLE_TLS_VERIFY"])
            except ValueError as exc:
                msg = f"QUEUEABLE_TLS_VERIFY: {exc}"
                raise ConfigurationError(msg) from exc
        if tls:
            values["tls"] = tls
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def merged(self, **changes: Any) -> Settings:
        """A copy with ``changes`` (``None`` values ignored)."""
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            msg = f"unknown settings: {', '.join(sorted(unknown))}"
            raise ConfigurationError(msg)
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def scheme(self) -> str:
        """``amqp``, ``amqps`` or ``memory``."""
        return urlsplit(self.url).scheme if self.url else "memory"

    def __repr__(self) -> str:
        return (
            f"Settings(url={mask_url(self.url)}, default_queue={self.default_queue!r}, "
            f"exchange={self.exchange!r}, queue_type={self.queue_type!r})"
        )


def _flag(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    msg = f"expected a boolean, got {raw!r}"
    raise ValueError(msg)
