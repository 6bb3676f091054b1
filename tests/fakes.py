"""Events, services and recorders shared by the unit tests."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydantic import BaseModel, field_serializer

from queueable import Stoppable, event

if TYPE_CHECKING:
    from collections.abc import Sequence

    from queueable import OutgoingMessage


@event("blog.comment_posted")
class CommentPosted(BaseModel):
    post_id: int
    author: str
    text: str


class SpamCommentPosted(CommentPosted):
    score: float = 0.9


@event("blog.post_published", version=2)
class PostPublished(Stoppable):
    post_id: int
    title: str


class Broken(BaseModel):
    """Serializes to JSON that its own model rejects (a string where an int belongs)."""

    value: int

    @field_serializer("value")
    def _broken(self, value: int) -> str:
        return "not a number"


class NotAModel:
    """An event that is not a pydantic model (fine in-process, not for queues)."""


@dataclass
class Recorder:
    """Collects calls as (listener name, event) in order, with the thread each ran on."""

    calls: list[tuple[str, object]] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)

    def record(self, name: str, event: object) -> None:
        self.calls.append((name, event))
        self.threads.append(threading.get_ident())

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


class Mailer:
    """A service with async and sync listener methods and one that fails a set number of times."""

    def __init__(self, recorder: Recorder | None = None, failures: int = 0) -> None:
        self.recorder = recorder or Recorder()
        self.failures = failures

    async def notify_author(self, event: CommentPosted) -> None:
        self.recorder.record("notify_author", event)
        if self.failures > 0:
            self.failures -= 1
            msg = "smtp unavailable"
            raise ConnectionError(msg)

    def notify_sync(self, event: CommentPosted) -> None:
        self.recorder.record("notify_sync", event)

    async def always_fails(self, event: CommentPosted) -> None:
        self.recorder.record("always_fails", event)
        msg = f"cannot mail about post {event.post_id}"
        raise RuntimeError(msg)

    def takes_nothing(self) -> None:
        """Not a valid listener: no event parameter."""

    def takes_post(self, event: PostPublished) -> None:
        """A listener for another event type."""


class RecordingTransport:
    """A Transport that records each publish call (a batch of messages) and can be told to fail."""

    def __init__(self) -> None:
        self.batches: list[list[OutgoingMessage]] = []
        self.fail_with: Exception | None = None
        self.closed = False

    async def publish(self, messages: Sequence[OutgoingMessage]) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.batches.append(list(messages))

    async def close(self) -> None:
        self.closed = True

    @property
    def messages(self) -> list[OutgoingMessage]:
        return [m for batch in self.batches for m in batch]
