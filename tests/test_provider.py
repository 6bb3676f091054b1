"""ListenerProvider: registration checks, MRO matching, ordering."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from queueable import ConfigurationError, Container, ListenerProvider, RetryPolicy, listener
from tests.fakes import CommentPosted, Mailer, NotAModel, PostPublished, SpamCommentPosted


def on_comment(event: CommentPosted) -> None:
    """A module-level listener."""


def on_anything(event: object) -> None:
    """A firehose listener."""


def test_listeners_match_along_the_mro(provider: ListenerProvider):
    """A listener on a base class receives subclass events; one on object receives everything."""
    base = provider.add_listener(on_comment)
    firehose = provider.add_listener(on_anything)

    assert provider.listeners_for(SpamCommentPosted(post_id=1, author="a", text="t", score=1)) == (
        base,
        firehose,
    )
    assert provider.listeners_for(PostPublished(post_id=1, title="x")) == (firehose,)
    assert provider.listeners_for(NotAModel()) == (firehose,)


def test_order_is_priority_then_registration(provider: ListenerProvider):
    """Higher priority runs first; equal priorities keep registration order."""
    first = provider.add_listener(on_comment, id="first")
    second = provider.add_listener(on_comment, id="second")
    urgent = provider.add_listener(on_anything, priority=10)
    late = provider.add_listener(on_comment, priority=-5, id="late")

    event = CommentPosted(post_id=1, author="a", text="t")
    assert provider.listeners_for(event) == (urgent, first, second, late)


def test_cache_is_invalidated_by_new_registrations(provider: ListenerProvider):
    """A listener added after a lookup is seen by the next lookup."""
    event = CommentPosted(post_id=1, author="a", text="t")
    assert provider.listeners_for(event) == ()
    entry = provider.add_listener(on_comment)
    assert provider.listeners_for(event) == (entry,)


def test_event_type_is_inferred_from_the_annotation(provider: ListenerProvider):
    """Without event_type, the event parameter's annotation decides."""
    assert provider.add_listener(on_comment).event_type is CommentPosted
    assert provider.add_listener_service("typed_mailer", "notify_author").event_type is CommentPosted


def test_unannotated_listener_needs_an_event_type(provider: ListenerProvider):
    """A listener whose event type cannot be inferred is rejected with advice."""

    def bare(event):  # type: ignore[no-untyped-def]
        return None

    with pytest.raises(ConfigurationError, match="annotate its event parameter"):
        provider.add_listener(bare)


def test_unknown_service_id_is_an_error_at_registration(provider: ListenerProvider):
    """Registering a listener on a service the container does not know fails at once."""
    with pytest.raises(ConfigurationError, match="no service registered with id 'nope'"):
        provider.add_listener_service("nope", "run", CommentPosted)


def test_missing_method_is_an_error_at_registration(provider: ListenerProvider):
    """A method the service class does not have is reported with the methods it does have."""
    with pytest.raises(ConfigurationError, match=r"has no method 'notify_autor'.*notify_author"):
        provider.add_listener_service("typed_mailer", "notify_autor")


def test_method_that_cannot_take_the_event_is_an_error(provider: ListenerProvider):
    """A method without an event parameter is rejected at registration."""
    with pytest.raises(ConfigurationError, match="cannot be called with a single event argument"):
        provider.add_listener_service("typed_mailer", "takes_nothing", CommentPosted)


def test_method_annotated_for_another_event_is_an_error(provider: ListenerProvider):
    """Registering a PostPublished listener for CommentPosted is a type mismatch caught early."""
    with pytest.raises(ConfigurationError, match="takes PostPublished"):
        provider.add_listener_service("typed_mailer", "takes_post", CommentPosted)


def test_private_methods_cannot_be_listeners(provider: ListenerProvider):
    """Only public methods may be invoked by a message."""
    with pytest.raises(ConfigurationError, match="must be public"):
        provider.add_listener_service("typed_mailer", "__init__", CommentPosted)


def test_queued_lambda_needs_a_stable_id(provider: ListenerProvider):
    """A lambda cannot be found by a worker unless it has an explicit id."""
    with pytest.raises(ConfigurationError, match="stable id="):
        provider.add_listener(lambda event: None, CommentPosted, queue=True)
    entry = provider.add_listener(lambda event: None, CommentPosted, queue=True, id="audit")
    assert provider.queued("audit") == (entry,)


def test_queued_listener_needs_a_pydantic_event(provider: ListenerProvider):
    """Queued events travel as JSON, so a non-model event type is refused."""
    with pytest.raises(ConfigurationError, match="not a pydantic model"):
        provider.add_listener(on_anything, queue=True)


def test_duplicate_queued_registration_is_refused(provider: ListenerProvider):
    """The same listener id for the same event type twice would be ambiguous on the wire."""
    provider.add_listener_service("typed_mailer", "notify_author", queue=True)
    with pytest.raises(ConfigurationError, match="already registered"):
        provider.add_listener_service("typed_mailer", "notify_author", queue=True)


def test_queued_allow_list_holds_only_queued_listeners(provider: ListenerProvider):
    """The consumer's allow-list knows queued ids and nothing else."""
    provider.add_listener_service("typed_mailer", "notify_sync")
    queued = provider.add_listener_service("typed_mailer", "notify_author", queue=True, queue_name="mail")

    assert provider.queued("typed_mailer:notify_author") == (queued,)
    assert provider.queued("typed_mailer:notify_sync") == ()
    assert provider.queued("os:system") == ()
    assert provider.queue_names == ["mail"]


def test_queue_names_are_the_queues_listeners_use():
    """A worker consumes ``queue_names``: the default queue is in it only if a listener uses it (another app's
    messages there would be dead-lettered as unknown listeners), or while no queued listener exists yet.
    """
    provider = ListenerProvider()
    assert provider.queue_names == ["queueable"]
    provider.add_listener(on_comment, CommentPosted, queue=True, id="a", queue_name="mail")
    assert provider.queue_names == ["mail"]
    assert provider.all_queue_names == ["queueable", "mail"]  # dead letters from before may still be there
    provider.add_listener(on_comment, CommentPosted, queue=True, id="b")
    provider.add_listener(on_comment, CommentPosted, queue=True, id="c", queue_name="audit")
    assert provider.queue_names == provider.all_queue_names == ["queueable", "audit", "mail"]


def test_a_worker_may_still_be_told_to_drain_the_default_queue(caplog: pytest.LogCaptureFixture):
    """After every listener moved to a queue of its own, messages published before wait in the default queue
    for listener ids the app still registers: ``-Q queueable`` is allowed (with a warning); another queue that
    no listener uses is still refused.
    """
    from queueable import App, Settings  # noqa: PLC0415
    from queueable.cli.consume import _queues  # noqa: PLC0415

    app = App(settings=Settings(url="amqp://localhost/"))
    app.add_listener(on_comment, CommentPosted, queue=True, id="a", queue_name="mail")
    assert _queues(app, ()) == ("mail",)
    assert _queues(app, ("queueable", "mail")) == ("queueable", "mail")
    assert "no queued listener of this app uses now" in caplog.text
    with pytest.raises(ConfigurationError, match="no queued listener of this app uses queue"):
        _queues(app, ("elsewhere",))


def test_service_decorator_registers_class_and_marked_methods():
    """@provider.service registers the class in the built-in container and each @listener method."""
    container = Container()
    provider = ListenerProvider(container)

    @provider.service("notifier")
    class Notifier:
        @listener(queue=True, retry=RetryPolicy(max_attempts=2))
        async def on_comment(self, event: CommentPosted) -> None: ...

        @listener(PostPublished, priority=3)
        def on_post(self, event: BaseModel) -> None: ...

    assert isinstance(container.get("notifier"), Notifier)
    ids = sorted(entry.id for entry in provider.listeners)
    assert ids == ["notifier:on_comment", "notifier:on_post"]
    (queued,) = provider.queued("notifier:on_comment")
    assert queued.retry.max_attempts == 2
    assert queued.is_async is True


def test_service_decorator_without_marked_methods_is_an_error(provider: ListenerProvider):
    """A class with no @listener method is almost certainly a mistake."""
    with pytest.raises(ConfigurationError, match="no method marked"):
        provider.service("empty")(type("Empty", (), {}))


def test_validate_reports_every_bad_registration():
    """validate() builds the service when its type is unknown and lists each problem."""
    container = Container()
    container.register("mailer", lambda: Mailer())  # noqa: PLW0108 - a lambda hides the type
    provider = ListenerProvider(container)
    provider.add_listener_service("mailer", "notify_author", CommentPosted, queue=True)
    provider.add_listener_service("mailer", "no_such_method", CommentPosted)

    with pytest.raises(ConfigurationError, match="no method 'no_such_method'") as info:
        provider.validate()
    problems = str(info.value).splitlines()[1:]
    assert len(problems) == 1
    assert problems[0].strip().startswith("Mailer (service 'mailer') has no method 'no_such_method'")


def test_repr_reports_counts(provider: ListenerProvider):
    """The repr says how many listeners and how many are queued."""
    provider.add_listener(on_comment)
    provider.add_listener_service("typed_mailer", "notify_author", queue=True)
    assert repr(provider) == "<ListenerProvider listeners=2 queued=1>"


def test_watchers_hear_of_each_new_work_queue_once(provider: ListenerProvider):
    """A registration that adds a queue name notifies watchers; the default queue and repeats do not."""
    heard: list[str] = []
    provider.watch_queues(heard.append)
    provider.add_listener_service("mailer", "notify_author", CommentPosted, queue=True)
    provider.add_listener(lambda e: None, CommentPosted, queue=True, id="a", queue_name="mail")
    provider.add_listener(lambda e: None, PostPublished, queue=True, id="b", queue_name="mail")
    provider.add_listener(lambda e: None, CommentPosted, id="in-process")
    assert heard == ["mail"]


def test_a_watcher_that_raises_leaves_the_listener_fully_registered(provider: ListenerProvider):
    """Watchers run after the registration is complete; their error propagates but registers nothing twice."""

    def broken(name: str) -> None:
        raise RuntimeError(name)

    provider.watch_queues(broken)
    with pytest.raises(RuntimeError, match="mail"):
        provider.add_listener(lambda e: None, CommentPosted, queue=True, id="a", queue_name="mail")
    assert [entry.id for entry in provider.listeners_for(CommentPosted(post_id=1, author="a", text="t"))] == ["a"]
    assert provider.queued("a")
