"""Fixtures: a throw-away PostgreSQL database, real SMTP servers, and the app wired to them."""

import os
import ssl
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import trustme
from alembic import command
from fastapi.testclient import TestClient
from sqlalchemy import Engine, insert, make_url, text
from sqlalchemy.orm import Session, sessionmaker

from config import Settings
from db import (
    alembic_config,
    make_engine,
    make_session_factory,
    migration_connection,
    run_migrations,
)
from lifecycle import Draft, Transition
from main import create_app
from models import Base, Channel, Notification, NotificationStatus, utcnow
from tests.providers import Outbox, start_outbox
from tests.smtpd import Credentials, ScriptedHandler, start_server
from wiring import build_deliverer
from worker import Worker

ADMIN_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
# Rate-limit windows: every process of the service shares them through Redis.
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
SECRET_KEY = "test-secret-key-for-hmacs"
SMTP_USER = "booking-service"
SMTP_PASSWORD = "s3cret-smtp-pass"
# Every scope; the clients below send it unless a test says otherwise.
ADMIN_KEY = "ntf_test-bootstrap-key-0123456789abcdefghijklmnopqrstu"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests first: spread over `make test`'s workers, none is left for the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def _admin_connection() -> Any:
    url = make_url(ADMIN_URL)
    try:
        connection = psycopg2.connect(
            host=url.host,
            port=url.port or 5432,
            user=url.username,
            password=url.password,
            dbname=url.database,
            connect_timeout=5,
        )
    except psycopg2.OperationalError as exc:
        # Never a skip: a suite whose database tests did not run has not passed.
        pytest.fail(f"PostgreSQL at {ADMIN_URL} is not reachable: {exc}".strip(), pytrace=False)
    connection.autocommit = True
    return connection


@pytest.fixture(scope="session")
def create_database() -> Iterator[Callable[[], str]]:
    """Makes fresh, migrated PostgreSQL databases; drops them after the run."""
    admin = _admin_connection()
    names: list[str] = []

    def create() -> str:
        name = f"notify_test_{uuid.uuid4().hex[:12]}"
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
            # Commits need not wait for the disk here: a test database dies with the run.
            cursor.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
        names.append(name)
        url = make_url(ADMIN_URL).set(drivername="postgresql+psycopg2", database=name)
        return url.render_as_string(hide_password=False)

    yield create
    with admin.cursor() as cursor:
        for name in names:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


@pytest.fixture(scope="session")
def database_url(create_database: Callable[[], str]) -> str:
    url = create_database()
    engine = make_engine(Settings(_env_file=None, database_url=url))
    run_migrations(engine)
    engine.dispose()
    return url


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(Settings(_env_file=None, database_url=database_url))
    yield engine
    engine.dispose()


@pytest.fixture
def db(engine: Engine) -> Iterator[sessionmaker[Session]]:
    """A session factory on clean tables."""
    # Every table of the models, so a new one cannot carry rows from test to test, and
    # its ids start again at 1: what TRUNCATE ... RESTART IDENTITY does, in a millisecond
    # on tables this small instead of 50 (TRUNCATE gives every table new files).
    with engine.begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            connection.execute(table.delete())
        connection.execute(RESTART_SEQUENCES)
    yield make_session_factory(engine)


RESTART_SEQUENCES = text(
    "SELECT setval(format('%I.%I', schemaname, sequencename), start_value, false)"
    " FROM pg_sequences WHERE schemaname = current_schema()"
)


@pytest.fixture(scope="session", autouse=True)
def trust_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The system's trust store, as the tests see it: one CA that signed nothing.

    Every TLS context the service makes (each SMTP mailer, each SMS.ru and Bot API client)
    loads the trust store as it is built, whether TLS is used or not: the system's takes
    about 30 ms, and an app makes up to three. No test reaches a real TLS server, and what
    the tests' own CA (`tls`) signed stays untrusted unless a test names that CA.
    """
    path = tmp_path_factory.mktemp("trust-store") / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    # Read by OpenSSL's default paths (ssl.create_default_context) and by httpx.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SSL_CERT_FILE", str(path))
        yield


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, Path]:
    """A server TLS context for 127.0.0.1 and the file of the CA that signed it."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    ca_file = tmp_path_factory.mktemp("tls") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return context, ca_file


@pytest.fixture
def smtp() -> Iterator[ScriptedHandler]:
    """A plain SMTP server; its handler records what arrives."""
    handler = ScriptedHandler()
    start_server(handler)
    yield handler
    handler.stop()


@pytest.fixture
def settings(database_url: str, smtp: ScriptedHandler) -> Settings:
    """Settings pointing at the test database and SMTP server, with retries that never sleep."""
    return Settings(
        _env_file=None,
        database_url=database_url,
        auto_migrate=False,
        smtp_host="127.0.0.1",
        smtp_port=smtp.port,
        smtp_timeout=5,
        email_from="Coworking <noreply@coworking.test>",
        retry_attempts=3,
        retry_initial_wait=0,
        retry_max_wait=0,
        retry_jitter=0,
        bootstrap_api_key=ADMIN_KEY,
        secret_key=SECRET_KEY,
        rate_limit_storage=REDIS_URL,
        # Generous: 12 sends at once on two busy cores can keep the event loop from a
        # Redis connect for over 0.5 s. The timeout tests set their own.
        redis_connect_timeout=5,
        redis_socket_timeout=5,
        # Each test counts from zero; the apps of one test share their counts.
        rate_limit_prefix=f"notify-test-{uuid.uuid4().hex[:12]}",
        # Tests send many messages to one address; the limit tests lower it again.
        rate_limit_per_recipient_per_hour=100_000,
        rate_limit_requests_per_minute=100_000,
        # The catalogue's tests install it themselves.
        templates_install=False,
    )


@pytest.fixture
def make_client(
    settings: Settings, db: sessionmaker[Session]
) -> Iterator[Callable[..., TestClient]]:
    """Starts the app (lifespan included) with `settings` changed by keyword arguments."""
    with ExitStack() as stack:

        def make(**changes: Any) -> TestClient:
            changed = Settings(_env_file=None, **(settings.model_dump() | changes))
            app = create_app(changed)
            client = TestClient(
                app,
                raise_server_exceptions=False,
                headers=AUTH,
            )
            return stack.enter_context(client)

        yield make


@pytest.fixture
def make_worker(settings: Settings, db: sessionmaker[Session]) -> Iterator[Callable[..., Worker]]:
    """Workers on the test database and SMTP server, `settings` changed by keyword."""
    made: list[tuple[Worker, Callable[[], None]]] = []

    def make(now: Callable[[], datetime] = utcnow, **changes: object) -> Worker:
        base = {"queue_retry_initial_wait": 0, "queue_retry_max_wait": 0}
        changed = Settings(_env_file=None, **(settings.model_dump() | base | changes))
        deliverer, stop_deliverer = build_deliverer(changed, now=now)
        worker = Worker(session_factory=db, deliverer=deliverer, settings=changed, now=now)
        made.append((worker, stop_deliverer))
        return worker

    yield make
    for worker, stop_deliverer in made:
        worker.close()
        stop_deliverer()


class Clock:
    """A clock for leases that moves only when told: `clock()` is its time."""

    def __init__(self) -> None:
        # Started after the rows a test queues: what is due now is due by this clock.
        self.time = utcnow()
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self.time

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.time += timedelta(seconds=seconds)


class Settled:
    """A transition hook: `wait(n)` returns once `n` notifications have been stored as
    sent, by whichever thread sends them (the in-API worker's, say)."""

    def __init__(self, app: Any) -> None:
        self._sent = 0
        self._changed = threading.Condition()
        app.state.deliverer.hooks.append(self)

    def __call__(self, transitions: Sequence[Transition]) -> None:
        with self._changed:
            self._sent += sum(t.status == NotificationStatus.SENT for t in transitions)
            self._changed.notify_all()

    def wait(self, sent: int, timeout: float = 15) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._sent >= sent, timeout)


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    """The SMS.ru and Bot API stand-in on loopback (any key); its requests are recorded."""
    box = start_outbox(tmp_path / "outbox")
    yield box
    box.stop()


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


BOOKING = {
    "email": "ivan.petrov@example.com",
    "subject": "Бронирование подтверждено: переговорная «Байкал»",
    "text": (
        "Здравствуйте, Иван!\n\nПереговорная «Байкал» забронирована на 25 ноября, 10:00–12:00.\n"
    ),
}


def booking_draft() -> Draft:
    """The BOOKING e-mail, as the routes store it."""
    return Draft(
        route=[(Channel.EMAIL, BOOKING["email"])], text=BOOKING["text"], subject=BOOKING["subject"]
    )


@pytest.fixture
def credentials() -> Credentials:
    return Credentials(SMTP_USER, SMTP_PASSWORD)


def queue_messages(db: sessionmaker[Session], count: int, prefix: str = "queued") -> list[str]:
    """Insert `count` queued, due e-mail notifications; their Message-IDs."""
    now = utcnow()
    message_ids = [f"<{prefix}-{i}@coworking.test>" for i in range(count)]
    rows = [
        {
            "channel": Channel.EMAIL,
            "recipient": f"member{i}@example.com",
            "subject": "Зона закрыта на уборку",
            "text": "Зона «Open space» закрыта с 18:00 до 20:00.",
            "status": NotificationStatus.QUEUED,
            "attempts": 0,
            "message_id": message_id,
            "next_attempt_at": now,
            "created_at": now,
            "updated_at": now,
        }
        for i, message_id in enumerate(message_ids)
    ]
    with db() as session:
        session.execute(insert(Notification), rows)
        session.commit()
    return message_ids


def migrate_to(engine: Engine, revision: str) -> None:
    """Bring `engine`'s database to an older `revision`, to test the upgrade from there."""
    config = alembic_config()
    with migration_connection(engine) as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def drain(worker: Worker) -> None:
    """Run `worker` until a round finds nothing to do."""
    while worker.run_once():
        pass


def drain_in_parallel(workers: list[Worker], timeout: float) -> None:
    """Run the workers side by side, each until it finds nothing to do."""
    threads = [threading.Thread(target=drain, args=(worker,)) for worker in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
