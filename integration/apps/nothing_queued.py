"""An app with an in-process listener and no queued one: ``queueable-consume`` must refuse to run it."""

from __future__ import annotations

from pydantic import BaseModel

from queueable import App


class Noted(BaseModel):
    text: str


def note(event: Noted) -> None:
    """Runs in the request, never in a worker."""


app = App()
app.add_listener(note, Noted)
