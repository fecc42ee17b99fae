"""Writes the database could not take when they were made, kept in memory and made as
soon as it answers again.

When the database fails after a provider has answered, the outcome is not dropped: it is
kept (`Unrecorded`) and stored well within the lease, so no other sender takes the
notification over and sends it again. A failed COMMIT may have been made all the same
(only its answer was lost): a kept transition names its attempt (a worker's pending row,
a synchronous send's attempt number), and storing it again finds that attempt stored and
changes nothing twice. Likewise a request answered 503 because its COMMIT failed may
still have stored its notification: it is failed, unsent, once the database is back, so
it is never sent later. Only a process that dies while it still holds unrecorded writes
leaves them to the takeover (see README: "Database outages").
"""

import logging
import threading
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

import crud
from db import DATABASE_UNAVAILABLE
from lifecycle import Transition

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LateWrite:
    """A write the database could not take: `what` it is about, and how to make it."""

    what: str
    write: Callable[[Session], object]


class Unrecorded:
    """Writes the database could not take (an outcome after a provider answered, a
    withdrawal after a commit whose answer was lost), kept until it can."""

    def __init__(self) -> None:
        self._writes: list[LateWrite] = []
        self._lock = threading.Lock()
        # The recorder thread and the in-API worker both flush: one write, made once.
        self._flushing = threading.Lock()
        self.waiting = threading.Event()

    def __len__(self) -> int:
        with self._lock:
            return len(self._writes)

    def keep(self, what: str, write: Callable[[Session], object]) -> None:
        with self._lock:
            self._writes.append(LateWrite(what, write))
        self.waiting.set()

    def flush(self, session_factory: sessionmaker[Session]) -> int:
        """Make the kept writes, oldest first; how many were made. Raises while the
        database is still down, keeping the rest."""
        with self._flushing:
            return self._flush(session_factory)

    def _flush(self, session_factory: sessionmaker[Session]) -> int:
        made = 0
        while True:
            with self._lock:
                if not self._writes:
                    self.waiting.clear()
                    return made
                late = self._writes[0]
            with session_factory() as session:
                late.write(session)
            with self._lock:
                self._writes.remove(late)
            made += 1
            logger.info("%s: stored late", late.what)

    def run(
        self,
        session_factory: sessionmaker[Session],
        stopping: threading.Event,
        retry_every: float = 0.5,
    ) -> None:
        """Make kept writes as soon as the database takes them, until `stopping`."""
        while not stopping.is_set():
            if not self.waiting.wait(timeout=retry_every):
                continue
            try:
                self.flush(session_factory)
            except Exception as exc:
                logger.warning("%d writes still waiting for the database: %s", len(self), exc)
                stopping.wait(retry_every)
        with suppress(Exception):
            self.flush(session_factory)
        if len(self):
            logger.error(
                "stopping with writes the database never took (%s): after their leases run "
                "out, their notifications will be attempted again",
                "; ".join(late.what for late in self._writes),
            )


def store(session: Session, transitions: list[Transition]) -> set[int]:
    """Store transitions (see `crud.apply_transitions`); the ids whose guard held. If
    their statement fails for another reason than an outage, each is stored on its own,
    so one bad row cannot hold back the rest (it is left to its lease running out). An
    outage raises."""
    try:
        return set(crud.apply_transitions(session=session, transitions=transitions).held)
    except DATABASE_UNAVAILABLE:
        raise
    except Exception:
        logger.exception("a batch's outcomes could not be stored together; one by one")
        session.rollback()
    held: set[int] = set()
    for transition in transitions:
        try:
            held |= set(crud.apply_transitions(session=session, transitions=[transition]).held)
        except DATABASE_UNAVAILABLE:
            raise
        except Exception:
            logger.exception("notification %d: outcome not stored", transition.notification_id)
            session.rollback()
    return held


def store_late(session: Session, transitions: list[Transition]) -> set[int]:
    """Store transitions kept through an outage (once, if their first commit was made
    after all and only its answer was lost); the ids whose guard held."""
    held = store(session, transitions)
    if len(held) < len(transitions):
        logger.warning(
            "%d outcomes no longer held when recorded (taken over, or already stored by a "
            "commit whose answer was lost)",
            len(transitions) - len(held),
        )
    return held


def record_late(session: Session, transition: Transition) -> None:
    """Store one transition kept through an outage."""
    store_late(session, [transition])


def release_late(session: Session, worker_id: str, leased: list[crud.Leased]) -> None:
    """Give back a worker's unattempted notifications after an outage."""
    crud.release(session=session, worker_id=worker_id, leased=leased)


def start_recorder(
    unrecorded: Unrecorded, session_factory: sessionmaker[Session]
) -> Callable[[], None]:
    """Run `unrecorded.run` in a thread; the function that stops it."""
    stopping = threading.Event()
    thread = threading.Thread(
        target=unrecorded.run,
        args=(session_factory, stopping),
        name="outcome-recorder",
        daemon=True,
    )
    thread.start()

    def stop() -> None:
        stopping.set()
        unrecorded.waiting.set()
        thread.join()

    return stop
