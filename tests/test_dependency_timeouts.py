"""Every dependency has a timeout: a Redis or PostgreSQL that accepts connections and never
answers is a prompt 503 naming it (and /readyz names it), with nothing half done."""

import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
from fastapi.testclient import TestClient
from limits.errors import StorageError
from sqlalchemy import func, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from config import Settings
from db import make_engine, migration_connection
from models import Notification
from tests.conftest import BOOKING
from tests.faults import CuttableLink, StallingListener
from tests.smtpd import ScriptedHandler, free_port
from wiring import build_limiter

# An answer within this is an answer within the timeouts (1 s for Redis and for the
# database here), on a busy machine; without them a stalled dependency holds it until
# the listener hangs up.
PROMPT = 3.0
HANG_UP_AFTER = 10.0
T = TypeVar("T")
# The rest of the suite waits longer for Redis (conftest), so a busy event loop is no fault.
QUICK_REDIS = {"redis_connect_timeout": 1.0, "redis_socket_timeout": 1.0}
# A Redis that never answers: the timeout is the outcome expected, so a short one cannot
# be a false alarm (connecting to the listener succeeds at once, in its backlog).
STALLED_REDIS = {"redis_connect_timeout": 1.0, "redis_socket_timeout": 0.25}
STORAGE_DOWN = "rate-limit storage unavailable, try again later"
DATABASE_DOWN = "database unavailable, try again later"


@pytest.fixture
def stalled() -> Iterator[StallingListener]:
    listener = StallingListener(hang_up_after=HANG_UP_AFTER)
    yield listener
    listener.close()


def timed(call: Callable[[], T]) -> tuple[T, float]:
    """What `call` returns, and how many seconds it took."""
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def stored(db: sessionmaker[Session]) -> int:
    with db() as session:
        return session.scalar(select(func.count()).select_from(Notification)) or 0


def test_a_stalled_rate_limit_storage_is_a_prompt_503_naming_it_and_nothing_is_stored(
    make_client: Callable[..., TestClient],
    stalled: StallingListener,
    db: sessionmaker[Session],
    smtp: ScriptedHandler,
) -> None:
    client = make_client(rate_limit_storage=f"redis://127.0.0.1:{stalled.port}/0", **STALLED_REDIS)

    response, took = timed(lambda: client.post("/notify/email", json=BOOKING))
    ready, ready_took = timed(lambda: client.get("/readyz"))

    assert (response.status_code, response.json()["detail"]) == (503, STORAGE_DOWN)
    assert response.headers["retry-after"]
    assert took < PROMPT
    assert (ready.status_code, ready.json()["detail"]) == (503, "rate-limit storage unavailable")
    assert ready_took < PROMPT
    assert stored(db) == 0
    assert smtp.received == []


@pytest.mark.slow
def test_a_rate_limit_storage_that_stops_answering_is_a_prompt_503_naming_it(
    make_client: Callable[..., TestClient],
    db: sessionmaker[Session],
    smtp: ScriptedHandler,
) -> None:
    link = CuttableLink(("127.0.0.1", 6379))
    # Redis stalls with connections open: what a request sends is never answered, until
    # the link is cut (a client without a timeout answers then).
    hang_up = threading.Timer(HANG_UP_AFTER, link.cut)
    hang_up.daemon = True
    try:
        client = make_client(rate_limit_storage=f"redis://127.0.0.1:{link.port}/0", **QUICK_REDIS)
        assert client.post("/notify/email", json=BOOKING).status_code == 201
        link.deaf.set()
        hang_up.start()

        response, took = timed(lambda: client.post("/notify/email", json=BOOKING))
        ready = client.get("/readyz")
    finally:
        hang_up.cancel()
        link.close()

    assert (response.status_code, response.json()["detail"]) == (503, STORAGE_DOWN)
    assert took < PROMPT
    assert (ready.status_code, ready.json()["detail"]) == (503, "rate-limit storage unavailable")
    assert stored(db) == 1
    assert len(smtp.received) == 1


def test_a_refused_rate_limit_storage_is_a_503_naming_it(
    make_client: Callable[..., TestClient], db: sessionmaker[Session], smtp: ScriptedHandler
) -> None:
    client = make_client(rate_limit_storage=f"redis://127.0.0.1:{free_port()}/0", **QUICK_REDIS)

    response = client.post("/notify/email", json=BOOKING)
    ready = client.get("/readyz")

    assert (response.status_code, response.json()["detail"]) == (503, STORAGE_DOWN)
    assert (ready.status_code, ready.json()["detail"]) == (503, "rate-limit storage unavailable")
    assert stored(db) == 0
    assert smtp.received == []


def test_every_call_of_the_limiter_on_a_stalled_redis_gives_up_promptly(
    settings: Settings, stalled: StallingListener
) -> None:
    limiter = build_limiter(
        settings.model_copy(
            update={"rate_limit_storage": f"redis://127.0.0.1:{stalled.port}/0", **STALLED_REDIS}
        )
    )
    one = ["ivan@example.com"]
    many = ["ivan@example.com", "anna@example.com"]
    calls: dict[str, Callable[[], object]] = {
        "one recipient": lambda: limiter.take_recipients(one, 10),
        # A pipeline of the moving-window script, one per recipient.
        "a bulk": lambda: limiter.take_recipients(many, 10),
        "a revocation": lambda: limiter.mark_revoked(7, seconds=60),
    }

    for what, call in calls.items():
        started = time.monotonic()
        with pytest.raises(StorageError):
            call()
        assert time.monotonic() - started < PROMPT, what
    healthy, took = timed(limiter.storage.check)
    assert healthy is False
    assert took < PROMPT


@pytest.mark.slow
def test_a_stalled_database_is_a_prompt_503_naming_it(
    make_client: Callable[..., TestClient], stalled: StallingListener, smtp: ScriptedHandler
) -> None:
    client = make_client(
        database_url=f"postgresql://postgres@127.0.0.1:{stalled.port}/notifications",
        database_connect_timeout=1,
        worker_in_api=False,
    )

    response, took = timed(lambda: client.post("/notify/email", json=BOOKING))
    ready = client.get("/readyz")

    assert (response.status_code, response.json()["detail"]) == (503, DATABASE_DOWN)
    assert took < PROMPT
    assert (ready.status_code, ready.json()["detail"]) == (503, "database unavailable")
    assert smtp.received == []


def test_a_statement_is_cancelled_after_the_statement_timeout_except_in_migrations(
    database_url: str,
) -> None:
    engine = make_engine(
        Settings(_env_file=None, database_url=database_url, database_statement_timeout=0.2)
    )
    try:
        with engine.connect() as connection:
            started = time.monotonic()
            with pytest.raises(OperationalError, match="statement timeout"):
                # The server's own wait: what a statement stuck on a lock looks like.
                connection.execute(text("SELECT pg_sleep(5)"))
            took = time.monotonic() - started
        with migration_connection(engine) as connection:
            in_migration = connection.scalar(text("SHOW statement_timeout"))
        with engine.connect() as connection:
            after_migration = connection.scalar(text("SHOW statement_timeout"))
    finally:
        engine.dispose()

    assert took < PROMPT
    assert in_migration == "0"
    assert after_migration == "200ms"
