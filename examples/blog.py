"""The blog-comment notification from queueable's origin: a comment must not wait for the author's email.

Run the whole flow without a broker (embedded memory:// default)::

    make demo

or against RabbitMQ, in two terminals::

    QUEUEABLE_URL=amqp://guest:guest@127.0.0.1:5672/ queueable-consume examples.blog:app
    QUEUEABLE_URL=amqp://guest:guest@127.0.0.1:5672/ python -m examples.demo
"""

from __future__ import annotations

import asyncio
import logging
import time

from pydantic import BaseModel

from queueable import App, RetryPolicy, event, listener

log = logging.getLogger("examples.blog")


@event("blog.comment_posted")
class CommentPosted(BaseModel):
    """A reader commented on a post."""

    post_id: int
    post_author_email: str
    commenter: str
    text: str


class Mailer:
    """Sends mail (here: pretends to, slowly, as real SMTP servers do)."""

    def __init__(self, delay: float = 0.2) -> None:
        self.delay = delay
        self.sent: list[str] = []

    @listener(queue=True, retry=RetryPolicy(max_attempts=5, initial_delay=2))
    async def notify_author(self, event: CommentPosted) -> None:
        """Tell the post's author about the new comment."""
        started = time.perf_counter()
        await asyncio.sleep(self.delay)
        self.sent.append(event.post_author_email)
        log.warning(
            "mailed %s about a comment by %s on post %d (took %.0f ms, after the response)",
            event.post_author_email,
            event.commenter,
            event.post_id,
            (time.perf_counter() - started) * 1000,
        )


class Stats:
    """An in-process listener: cheap work that may run inside the request."""

    def __init__(self) -> None:
        self.by_post: dict[int, int] = {}

    @property
    def comments(self) -> int:
        """Comments counted so far."""
        return sum(self.by_post.values())

    @listener()
    def count(self, event: CommentPosted) -> None:
        """Count comments per post (in-process, immediately)."""
        self.by_post[event.post_id] = self.by_post.get(event.post_id, 0) + 1


app = App()
app.service("mailer")(Mailer)
app.service("stats")(Stats)
