"""Dispatch a few comments as a web request would and show that the request does not wait for the mail."""

from __future__ import annotations

import asyncio
import logging
import time

from examples.blog import CommentPosted, app


async def handle_comment_request(post_id: int, text: str) -> float:
    """What a web handler does: save the comment (omitted), dispatch the event, respond."""
    started = time.perf_counter()
    await app.dispatch(
        CommentPosted(post_id=post_id, post_author_email="author@example.com", commenter="reader", text=text)
    )
    return (time.perf_counter() - started) * 1000


async def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    async with app:  # on exit, waits for queued listeners (embedded mode) and closes connections
        for post_id in (1, 2, 3):
            elapsed = await handle_comment_request(post_id, "Great post!")
            print(f"request for post {post_id} answered in {elapsed:.2f} ms (the mail is queued)")
        print(f"comments counted in-process: {app.container.get('stats').comments}")  # type: ignore[attr-defined]
    print(f"transport: {app.transport!r}")


if __name__ == "__main__":
    asyncio.run(main())
