"""Queued and scheduled delivery through the PostgreSQL-backed worker."""

import random
import threading
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event, select, update
from sqlalchemy.orm import Session, sessionmaker

import crud
from models import Notification, NotificationStatus
from tests.conftest import (
    BOOKING,
    Clock,
    Settled,
    booking_draft,
    drain,
    drain_in_parallel,
    queue_messages,
)
from tests.faults import wait_for
from tests.smtpd import ScriptedHandler
from worker import Worker

ASYNC = {"Prefer": "respond-async"}


@pytest.fixture
def queue_client(make_client: Callable[..., TestClient]) -> TestClient:
    """The API without its own worker thread: tests run workers explicitly."""
    return make_client(worker_in_api=False, queue_retry_initial_wait=0, queue_retry_max_wait=0)


def status_of(client: TestClient, notification_id: int) -> dict[str, object]:
    body: dict[str, object] = client.get(f"/notifications/{notification_id}").json()
    return body


def test_respond_async_queues_and_a_worker_sends(
    queue_client: TestClient,
    smtp: ScriptedHandler,
    db: sessionmaker[Session],
    make_worker: Callable[..., Worker],
) -> None:
    response = queue_client.post("/notify/email", json=BOOKING, headers=ASYNC)

    assert response.status_code == 202
    assert response.headers["preference-applied"] == "respond-async"
    body = response.json()
    assert (body["status"], body["attempts"]) == ("queued", 0)
    assert smtp.received == []

    assert make_worker().run_once() == 1

    stored = status_of(queue_client, body["id"])
    assert (stored["status"], stored["attempts"]) == ("sent", 1)
    [received] = smtp.received
    assert received.message["Message-ID"] == body["message_id"]


def test_scheduled_message_waits_for_send_at(
    queue_client: TestClient,
    smtp: ScriptedHandler,
    db: sessionmaker[Session],
    make_worker: Callable[..., Worker],
) -> None:
    clock = Clock()
    send_at = datetime.now(UTC) + timedelta(seconds=1)
    worker = make_worker(now=clock)

    response = queue_client.post("/notify/email", json={**BOOKING, "send_at": send_at.isoformat()})

    assert response.status_code == 202
    assert worker.run_once() == 0
    assert smtp.received == []
    clock.advance(1.05)  # past send_at, by the worker's clock
    assert worker.run_once() == 1
    stored = status_of(queue_client, response.json()["id"])
    assert stored["status"] == "sent"
    assert datetime.fromisoformat(str(stored["sent_at"])) >= send_at
    assert len(smtp.received) == 1


def test_send_at_must_carry_a_timezone(queue_client: TestClient, smtp: ScriptedHandler) -> None:
    response = queue_client.post(
        "/notify/email", json={**BOOKING, "send_at": "2030-01-01T10:00:00"}
    )

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "send_at"]


def test_cancel_before_the_send_wins(
    queue_client: TestClient,
    smtp: ScriptedHandler,
    db: sessionmaker[Session],
    make_worker: Callable[..., Worker],
) -> None:
    queued = queue_client.post("/notify/email", json=BOOKING, headers=ASYNC).json()

    cancelled = queue_client.post(f"/notifications/{queued['id']}/cancel")

    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert make_worker().run_once() == 0
    assert smtp.received == []
    assert queue_client.post(f"/notifications/{queued['id']}/cancel").status_code == 409


def test_cancel_after_the_send_is_a_409(queue_client: TestClient, smtp: ScriptedHandler) -> None:
    sent = queue_client.post("/notify/email", json=BOOKING).json()

    response = queue_client.post(f"/notifications/{sent['id']}/cancel")

    assert response.status_code == 409
    assert status_of(queue_client, sent["id"])["status"] == "sent"
    assert queue_client.post("/notifications/987654/cancel").status_code == 404


def test_worker_backs_off_on_transient_errors_then_sends(
    queue_client: TestClient,
    smtp: ScriptedHandler,
    db: sessionmaker[Session],
    make_worker: Callable[..., Worker],
) -> None:
    queued = queue_client.post("/notify/email", json=BOOKING, headers=ASYNC).json()
    smtp.data_replies.append("451 4.3.0 Try again later")
    slow = make_worker(queue_retry_initial_wait=60, queue_retry_max_wait=60)

    assert slow.run_once() == 1
    waiting = status_of(queue_client, queued["id"])
    assert (waiting["status"], waiting["attempts"]) == ("queued", 1)
    assert datetime.fromisoformat(str(waiting["next_attempt_at"])) > datetime.now(UTC)
    assert slow.run_once() == 0, "claimed again before its backoff ran out"

    with db() as session:
        session.execute(
            update(Notification)
            .where(Notification.id == queued["id"])
            .values(next_attempt_at=datetime.now(UTC))
        )
        session.commit()
    assert slow.run_once() == 1
    done = status_of(queue_client, queued["id"])
    assert (done["status"], done["attempts"]) == ("sent", 2)


def test_worker_fails_after_its_attempts_run_out(
    queue_client: TestClient,
    smtp: ScriptedHandler,
    db: sessionmaker[Session],
    make_worker: Callable[..., Worker],
) -> None:
    queued = queue_client.post("/notify/email", json=BOOKING, headers=ASYNC).json()
    smtp.data_replies.extend(["451 4.3.0 one", "452 4.3.1 two"])
    worker = make_worker(queue_max_attempts=2)

    worker.run_once()
    worker.run_once()

    failed = status_of(queue_client, queued["id"])
    assert (failed["status"], failed["attempts"]) == ("failed", 2)
    assert failed["error_message"] == "452 4.3.1 two"
    assert smtp.received == []


def test_expired_lease_is_taken_over(
    queue_client: TestClient,
    smtp: ScriptedHandler,
    db: sessionmaker[Session],
    make_worker: Callable[..., Worker],
) -> None:
    queued = queue_client.post("/notify/email", json=BOOKING, headers=ASYNC).json()
    clock = Clock()
    with db() as session:
        # A worker claims it and dies before sending.
        [claimed] = crud.claim_due(
            session=session, worker_id="dead", lease=timedelta(seconds=0.2), limit=10, now=clock
        )
    survivor = make_worker(now=clock)
    assert claimed.notification.id == queued["id"]
    assert survivor.run_once() == 0, "a live lease must be respected"

    clock.advance(0.3)

    assert survivor.run_once() == 1
    stored = status_of(queue_client, queued["id"])
    assert (stored["status"], stored["attempts"]) == ("sent", 2)
    # The dead worker's pending attempt is the abandoned one; no third row.
    attempts = stored["delivery_attempts"]
    assert isinstance(attempts, list)
    assert [(a["number"], a["outcome"]) for a in attempts] == [(1, "abandoned"), (2, "sent")]
    assert len(smtp.received) == 1


def test_a_batch_is_written_pending_before_it_is_sent_and_settled_together(
    queue_client: TestClient,
    smtp: ScriptedHandler,
    db: sessionmaker[Session],
    make_worker: Callable[..., Worker],
) -> None:
    ids = [
        queue_client.post("/notify/email", json=BOOKING, headers=ASYNC).json()["id"]
        for _ in range(6)
    ]
    smtp.gate = threading.Event()
    worker = make_worker(smtp_pool_size=3)
    runner = threading.Thread(target=worker.run_once)
    runner.start()
    assert smtp.data_started.wait(5)

    # Mid-batch: every attempt of the batch is stored, pending, before its send.
    mid = [status_of(queue_client, i) for i in ids]
    smtp.gate.set()
    runner.join(10)

    assert [(n["status"], n["attempts"]) for n in mid] == [("sending", 1)] * 6
    for notification in mid:
        attempts = notification["delivery_attempts"]
        assert isinstance(attempts, list)
        [attempt] = attempts
        assert (attempt["outcome"], attempt["finished_at"]) == ("pending", None)
    after = [status_of(queue_client, i) for i in ids]
    assert [(n["status"], n["attempts"]) for n in after] == [("sent", 1)] * 6
    for notification in after:
        attempts = notification["delivery_attempts"]
        assert isinstance(attempts, list)
        [attempt] = attempts
        assert (attempt["number"], attempt["outcome"], attempt["smtp_code"]) == (1, "sent", 250)
        assert attempt["finished_at"] is not None
    assert len(smtp.received) == 6


def test_stopping_worker_releases_the_rest_of_its_batch(
    queue_client: TestClient,
    smtp: ScriptedHandler,
    db: sessionmaker[Session],
    make_worker: Callable[..., Worker],
) -> None:
    ids = [
        queue_client.post("/notify/email", json=BOOKING, headers=ASYNC).json()["id"]
        for _ in range(5)
    ]
    smtp.gate = threading.Event()
    # One connection: one message in hand when the worker is stopped.
    worker = make_worker(smtp_pool_size=1)
    runner = threading.Thread(target=worker.run_once)
    runner.start()
    assert smtp.data_started.wait(5)

    worker.stop()
    smtp.gate.set()
    runner.join(10)

    with db() as session:
        rows = session.scalars(select(Notification).where(Notification.id.in_(ids))).all()
    statuses = Counter(n.status for n in rows)
    assert statuses == {NotificationStatus.SENT: 1, NotificationStatus.QUEUED: 4}
    assert all(n.leased_by is None and n.lease_expires_at is None for n in rows)


@pytest.mark.slow
def test_two_workers_deliver_2000_messages_exactly_once(
    queue_client: TestClient,
    smtp: ScriptedHandler,
    db: sessionmaker[Session],
    make_worker: Callable[..., Worker],
) -> None:
    queue_messages(db, 2000)
    drain_in_parallel([make_worker(worker_batch_size=50) for _ in range(2)], timeout=120)

    delivered = Counter(r.message_id for r in smtp.received)
    assert len(delivered) == 2000
    assert max(delivered.values()) == 1
    with db() as session:
        by_worker = Counter(
            session.scalars(select(Notification.attempts).where(Notification.status == "sent"))
        )
    assert by_worker == {1: 2000}


def test_the_api_runs_its_own_worker_by_default(
    make_client: Callable[..., TestClient], smtp: ScriptedHandler
) -> None:
    client = make_client(worker_poll_interval=0.05)
    settled = Settled(client.app)

    queued = client.post("/notify/email", json=BOOKING, headers=ASYNC).json()

    assert settled.wait(1), "the in-API worker never sent it"
    assert status_of(client, queued["id"])["status"] == "sent"
    assert len(smtp.received) == 1


def test_a_worker_whose_lease_ran_out_does_not_overwrite_the_new_owner(
    queue_client: TestClient,
    smtp: ScriptedHandler,
    db: sessionmaker[Session],
    make_worker: Callable[..., Worker],
) -> None:
    queued = queue_client.post("/notify/email", json=BOOKING, headers=ASYNC).json()
    smtp.gate = threading.Event()
    slow = make_worker(worker_lease=60)
    slow_run = threading.Thread(target=slow.run_once)
    slow_run.start()
    assert smtp.data_started.wait(5)
    # The slow worker's lease runs out mid-send, as if its process had stalled past it
    # (a live one renews it every half lease).
    with db() as session:
        session.execute(
            update(Notification).values(lease_expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
        session.commit()
    smtp.data_started.clear()
    owner = make_worker()
    owner_run = threading.Thread(target=owner.run_once)
    owner_run.start()
    assert smtp.data_started.wait(5), "the new owner never claimed it"

    smtp.gate.set()
    slow_run.join(10)
    owner_run.join(10)

    stored = status_of(queue_client, queued["id"])
    assert (stored["status"], stored["attempts"]) == ("sent", 2)
    # At-least-once: both sends reached the server, and the history says so: the slow
    # worker's late outcome fills the attempt the takeover had recorded as abandoned.
    attempts = stored["delivery_attempts"]
    assert isinstance(attempts, list)
    assert [(a["number"], a["outcome"]) for a in attempts] == [(1, "sent"), (2, "sent")]
    assert len(smtp.received) == 2


def test_smtp_down_for_a_while_then_back_delivers_everything(
    smtp: ScriptedHandler, db: sessionmaker[Session], make_worker: Callable[..., Worker]
) -> None:
    message_ids = queue_messages(db, 20)
    worker = make_worker()
    smtp.go_down()

    assert worker.run_once() == 20
    assert worker.run_once() == 20
    smtp.come_back()
    drain(worker)

    assert sorted(r.message["Message-ID"] for r in smtp.received) == sorted(message_ids)
    with db() as session:
        for notification in session.scalars(select(Notification)):
            outcomes = [a.outcome for a in notification.delivery_attempts]
            assert outcomes == ["transient_error", "transient_error", "sent"]
            assert "ConnectionRefusedError" in str(notification.delivery_attempts[0].error)
            assert notification.status == NotificationStatus.SENT


def leases(db: sessionmaker[Session], worker_id: str) -> list[datetime | None]:
    """When the leases `worker_id` holds run out."""
    with db() as session:
        return list(
            session.scalars(
                select(Notification.lease_expires_at).where(Notification.leased_by == worker_id)
            )
        )


def renewed(db: sessionmaker[Session], worker: Worker, lease: timedelta) -> Callable[[], bool]:
    """Whether `worker` holds leases and has renewed them all from its clock's time now."""

    def condition() -> bool:
        ends = leases(db, worker.worker_id)
        return bool(ends) and all(end is not None and end >= worker.now() + lease for end in ends)

    return condition


def test_a_slow_batch_outliving_its_lease_is_not_sent_twice(
    smtp: ScriptedHandler, db: sessionmaker[Session], make_worker: Callable[..., Worker]
) -> None:
    # A batch of ten sent one at a time outlives its lease: the lease on the rest is
    # renewed once half of it has passed, so no other worker gets any of it, and what was
    # taken over before the renewal (as if the first worker had stalled) is skipped.
    message_ids = queue_messages(db, 10)
    clock = Clock()
    lease = timedelta(seconds=0.5)
    smtp.gate = threading.Event()
    # A send held at the gate must not time out first.
    first = make_worker(
        worker_lease=0.5, worker_batch_size=10, smtp_pool_size=1, smtp_timeout=30, now=clock
    )
    runner = threading.Thread(target=drain, args=(first,))
    runner.start()
    assert smtp.data_started.wait(5)  # the first message is being sent, nine wait
    taken = message_ids[-3:]
    with db() as session:
        session.execute(
            update(Notification)
            .where(Notification.message_id.in_(taken))
            .values(lease_expires_at=clock() - timedelta(seconds=1))
        )
        session.commit()
        other = crud.claim_due(
            session=session, worker_id="other", lease=timedelta(minutes=1), limit=10, now=clock
        )
    assert sorted(item.notification.message_id or "" for item in other) == sorted(taken)

    clock.advance(0.3)  # past half the lease
    wait_for(renewed(db, first, lease), 10, "the first worker to renew its leases")
    clock.advance(0.3)  # past the claim's lease: only the renewal holds the batch
    assert make_worker(now=clock).run_once() == 0, "taken from a live worker"
    smtp.gate.set()
    runner.join(10)

    delivered = Counter(r.message["Message-ID"] for r in smtp.received)
    assert set(delivered) == set(message_ids) - set(taken)
    assert max(delivered.values()) == 1


def test_a_send_longer_than_the_lease_keeps_it_while_the_worker_lives(
    smtp: ScriptedHandler, db: sessionmaker[Session], make_worker: Callable[..., Worker]
) -> None:
    # One message held by the server for three leases: the worker renews its lease while
    # it waits for the send, so a second worker never takes the message over.
    [message_id] = queue_messages(db, 1)
    clock = Clock()
    lease = timedelta(seconds=0.4)
    smtp.gate = threading.Event()
    # A send held at the gate must not time out first.
    slow = make_worker(worker_lease=0.4, smtp_timeout=30, now=clock)
    runner = threading.Thread(target=slow.run_once)
    runner.start()
    assert smtp.data_started.wait(5)

    other = make_worker(worker_lease=0.4, now=clock)
    for _ in range(4):
        clock.advance(0.3)  # past half the lease; from the second time on, past the claim's
        assert other.run_once() == 0, "taken over from a live worker"
        wait_for(renewed(db, slow, lease), 10, "the lease to be renewed")
    smtp.gate.set()
    runner.join(10)

    assert [r.message["Message-ID"] for r in smtp.received] == [message_id]
    with db() as session:
        [notification] = session.scalars(select(Notification)).all()
        assert (notification.status, notification.attempts) == (NotificationStatus.SENT, 1)


def test_a_released_synchronous_send_is_due_again(
    queue_client: TestClient,
    smtp: ScriptedHandler,
    db: sessionmaker[Session],
    make_worker: Callable[..., Worker],
) -> None:
    with db() as session:
        # A synchronous send whose process died: no next_attempt_at, its lease run out.
        notification = crud.create_notification(
            session=session,
            draft=booking_draft(),
            message_id="<sync-died@coworking.test>",
            queued=False,
            lease=timedelta(seconds=-1),
        )
        # A worker takes it over and is stopped before sending it.
        leased = crud.claim_due(
            session=session, worker_id="stopping", lease=timedelta(seconds=60), limit=10
        )
        assert [item.notification.id for item in leased] == [notification.id]
        assert crud.release(session=session, worker_id="stopping", leased=leased) == 1

    assert make_worker().run_once() == 1
    stored = status_of(queue_client, notification.id)
    assert stored["status"] == "sent"
    attempts = stored["delivery_attempts"]
    assert isinstance(attempts, list)
    assert [(a["number"], a["outcome"]) for a in attempts] == [(1, "abandoned"), (2, "sent")]


# Where the worker's claim lands in the cancel request, and what the cancel must answer.
# "inside the write": the cancel's UPDATE holds the row, uncommitted; the claim skips it.
CANCEL_RACE = {
    ("before the read", "sending"): "sending",
    ("before the read", "sent"): "sent",
    ("between the read and the write", "sending"): "sending",
    ("between the read and the write", "sent"): "sent",
    ("inside the write", "sending"): "cancelled",
    ("inside the write", "sent"): "cancelled",
    ("after the answer", "sending"): "cancelled",
    ("after the answer", "sent"): "cancelled",
}


def test_cancel_racing_a_worker_names_the_true_state_every_time(
    queue_client: TestClient,
    smtp: ScriptedHandler,
    db: sessionmaker[Session],
    make_worker: Callable[..., Worker],
) -> None:
    """The worker's claim is placed at each point of the cancel request (by statement
    listeners, not by timing), with the send held in DATA ("sending") or let through."""
    worker = make_worker(worker_batch_size=1)
    engine: Engine = queue_client.app.state.session_factory.kw["bind"]  # type: ignore[attr-defined]
    outcomes: Counter[str] = Counter()
    racers: set[int] = set()
    armed: list[str] = []  # the point the next claim waits for, while a round is on
    rounds = [point for point in CANCEL_RACE for _ in range(5)]
    random.Random(300).shuffle(rounds)

    def claim() -> threading.Thread:
        """Start the worker; return once it has finished, or is held in DATA."""
        ready = threading.Event()
        if smtp.gate is not None:
            smtp.data_started = ready

        def run() -> None:
            racers.add(threading.get_ident())
            worker.run_once()
            ready.set()

        racer = threading.Thread(target=run)
        racer.start()
        assert ready.wait(10), "the worker neither sent nor finished"
        return racer

    started: list[threading.Thread] = []

    def fire(point: str) -> None:
        if threading.get_ident() not in racers and armed == [point]:
            armed.clear()
            started.append(claim())

    def before(_c: Any, _k: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().startswith("SELECT") and "FROM notifications" in statement:
            fire("before the read")
        elif "UPDATE notifications" in statement:
            fire("between the read and the write")

    def after(_c: Any, _k: Any, statement: str, *_: Any) -> None:
        if "UPDATE notifications" in statement:
            fire("inside the write")

    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "after_cursor_execute", after)
    try:
        for point, send in rounds:
            queued = queue_client.post("/notify/email", json=BOOKING, headers=ASYNC).json()
            smtp.gate = threading.Event() if send == "sending" else None
            started.clear()
            armed[:] = [point]
            answer = queue_client.post(f"/notifications/{queued['id']}/cancel")
            armed.clear()
            if point == "after the answer":
                started.append(claim())
            if smtp.gate is not None:
                smtp.gate.set()
            assert len(started) == 1, (point, send)
            started[0].join(10)
            final = status_of(queue_client, queued["id"])["status"]
            if answer.status_code == 200:
                assert answer.json()["status"] == "cancelled" == final
                outcomes["cancelled"] += 1
                assert CANCEL_RACE[point, send] == "cancelled", (point, send)
                continue
            assert answer.status_code == 409
            # The worker had it: sending, or already sent, never "cancelled" or "queued".
            named = answer.json()["detail"].split()[2].rstrip(",")
            assert named in {"sending", "sent"}, answer.json()
            assert final == "sent"
            outcomes[named] += 1
            assert CANCEL_RACE[point, send] == named, (point, send)
    finally:
        event.remove(engine, "before_cursor_execute", before)
        event.remove(engine, "after_cursor_execute", after)

    sent = sum(1 for r in smtp.received)
    print("FIGURES cancel racing a worker:", dict(outcomes))
    assert sent == outcomes["sending"] + outcomes["sent"]
    assert outcomes["cancelled"] + sent == len(rounds)


def test_a_synchronous_send_whose_process_died_is_taken_over_with_its_lost_attempt(
    queue_client: TestClient,
    smtp: ScriptedHandler,
    db: sessionmaker[Session],
    make_worker: Callable[..., Worker],
) -> None:
    # A synchronous send whose process died before it recorded anything.
    with db() as session:
        notification = crud.create_notification(
            session=session,
            draft=booking_draft(),
            message_id="<lost@coworking.test>",
            queued=False,
            lease=timedelta(seconds=-1),
        )

    assert make_worker().run_once() == 1

    detail = status_of(queue_client, notification.id)
    assert detail["status"] == "sent"
    assert detail["attempts"] == 2
    attempts = detail["delivery_attempts"]
    assert isinstance(attempts, list)
    assert [(a["number"], a["outcome"]) for a in attempts] == [(1, "abandoned"), (2, "sent")]
    assert "may have been delivered" in attempts[0]["error"]


def test_send_at_in_the_past_is_due_at_once(
    queue_client: TestClient, smtp: ScriptedHandler, make_worker: Callable[..., Worker]
) -> None:
    an_hour_ago = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    queued = queue_client.post("/notify/email", json={**BOOKING, "send_at": an_hour_ago})

    assert queued.status_code == 202
    assert make_worker().run_once() == 1
    assert len(smtp.received) == 1


@pytest.mark.parametrize(
    "send_at",
    [
        1764046800000,
        "1764046800",
        "2026-11-25T06:00:00",
        "9999-12-31T23:59:59+00:00",
        "0001-01-01T00:00:00+00:00",
        (datetime.now(UTC) + timedelta(days=400)).isoformat(),
    ],
    ids=["epoch-ms", "epoch-s", "no-offset", "year-9999", "year-1", "in-400-days"],
)
def test_send_at_must_be_an_iso_string_with_an_offset_within_the_horizon(
    queue_client: TestClient, smtp: ScriptedHandler, send_at: object
) -> None:
    response = queue_client.post("/notify/email", json={**BOOKING, "send_at": send_at})

    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][-1] == "send_at"
    assert queue_client.get("/notifications").json()["data"] == []
