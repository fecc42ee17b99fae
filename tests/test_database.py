"""The database: outages are a 503 with nothing sent; the schema comes from migrations."""

import hashlib
from collections.abc import Callable, Iterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from fastapi.testclient import TestClient
from sqlalchemy import inspect, make_url, text

import cli
from config import Settings
from db import alembic_config, make_engine, run_migrations
from models import Base
from tests import conftest
from tests.conftest import BOOKING, _admin_connection, migrate_to
from tests.smtpd import ScriptedHandler


class Outage:
    """Makes one PostgreSQL database refuse connections, as if it went away."""

    def __init__(self, url: str) -> None:
        self.name = make_url(url).database
        self.admin = _admin_connection()

    def _run(self, sql: str) -> None:
        with self.admin.cursor() as cursor:
            cursor.execute(sql)

    def start(self) -> None:
        self._run(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS false')
        self._run(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{self.name}' AND pid <> pg_backend_pid()"
        )

    def end(self) -> None:
        self._run(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS true')


@pytest.fixture
def outage_client(
    create_database: Callable[[], str], make_client: Callable[..., TestClient]
) -> Iterator[tuple[TestClient, Outage]]:
    url = create_database()
    client = make_client(database_url=url, auto_migrate=True)
    outage = Outage(url)
    yield client, outage
    outage.end()
    outage.admin.close()


def test_database_down_is_a_503_and_no_email_is_sent(
    outage_client: tuple[TestClient, Outage], smtp: ScriptedHandler
) -> None:
    client, outage = outage_client
    assert client.get("/readyz").status_code == 200

    outage.start()
    response = client.post("/notify/email", json=BOOKING)

    assert response.status_code == 503
    assert response.headers["retry-after"]
    assert "database" in response.json()["detail"]
    assert client.get("/readyz").status_code == 503
    assert client.get("/notifications").status_code == 503
    assert client.get("/healthz").status_code == 200
    assert smtp.received == []

    outage.end()
    assert client.post("/notify/email", json=BOOKING).status_code == 201
    assert len(smtp.received) == 1


def test_unreachable_database_at_request_time_is_a_503(
    make_client: Callable[..., TestClient], smtp: ScriptedHandler
) -> None:
    client = make_client(
        database_url="postgresql://postgres@127.0.0.1:1/nowhere", auto_migrate=False
    )

    assert client.post("/notify/email", json=BOOKING).status_code == 503
    assert client.get("/readyz").status_code == 503
    assert smtp.received == []


def test_start_up_migrates_an_empty_database(
    create_database: Callable[[], str], make_client: Callable[..., TestClient]
) -> None:
    url = create_database()

    client = make_client(database_url=url, auto_migrate=True)

    assert client.post("/notify/email", json=BOOKING).status_code == 201
    engine = make_engine(Settings(_env_file=None, database_url=url))
    tables = set(inspect(engine).get_table_names())
    engine.dispose()
    assert {"notifications", "delivery_attempts", "alembic_version"} <= tables


def test_the_migrate_command_migrates_an_empty_database_before_the_servers_start(
    create_database: Callable[[], str],
    make_client: Callable[..., TestClient],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As the image starts: `python cli.py migrate`, then the servers with AUTO_MIGRATE=false.
    url = create_database()
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("AUTO_MIGRATE", "0")
    engine = make_engine(Settings(_env_file=None, database_url=url))

    cli.main(["migrate", "--if-enabled"])  # off, as the service reads "0"
    left_alone = inspect(engine).get_table_names()
    cli.main(["migrate"])
    client = make_client(database_url=url, auto_migrate=False)

    assert left_alone == []
    assert client.post("/notify/email", json=BOOKING).status_code == 201
    with engine.connect() as connection:
        revision = connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
    engine.dispose()
    assert revision == ScriptDirectory.from_config(alembic_config()).get_current_head()


def test_migrations_match_the_models(database_url: str) -> None:
    engine = make_engine(Settings(_env_file=None, database_url=database_url))
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, Base.metadata)
    engine.dispose()

    assert differences == []


def test_indexes_serve_the_history_queries(database_url: str) -> None:
    engine = make_engine(Settings(_env_file=None, database_url=database_url))
    indexes = {
        tuple(index["column_names"]) for index in inspect(engine).get_indexes("notifications")
    }
    engine.dispose()

    assert {
        ("created_at", "id"),
        ("recipient", "created_at", "id"),
        ("status", "created_at", "id"),
    } <= indexes


def test_bare_postgresql_url_uses_psycopg2() -> None:
    for url in ("postgresql://u@h/db", "postgres://u@h/db"):
        settings = Settings(_env_file=None, database_url=url)
        assert settings.database_url == "postgresql+psycopg2://u@h/db"
        assert make_engine(settings).dialect.driver == "psycopg2"


def test_checking_a_stored_key_while_the_database_is_down_is_a_503(
    outage_client: tuple[TestClient, Outage],
) -> None:
    client, outage = outage_client
    created = client.post("/keys", json={"name": "reader", "scopes": ["read"]}).json()
    reader = {"Authorization": f"Bearer {created['key']}"}
    assert client.get("/notifications", headers=reader).status_code == 200

    outage.start()
    response = client.get("/notifications", headers=reader)
    outage.end()

    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert client.get("/notifications", headers=reader).status_code == 200


def test_an_unreachable_test_database_fails_the_suite_instead_of_skipping(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(conftest, "ADMIN_URL", "postgresql://postgres@127.0.0.1:1/test")

    with pytest.raises(pytest.fail.Exception, match="not reachable"):
        conftest._admin_connection()


def test_upgrading_drops_the_plain_hashes_of_erased_texts(
    create_database: Callable[[], str],
) -> None:
    engine = make_engine(Settings(_env_file=None, database_url=create_database()))
    migrate_to(engine, "0004")
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO notifications (id, channel, recipient, subject, text, sensitive,"
                " text_length, text_sha256, status, attempts, created_at, updated_at)"
                " VALUES (1, 'email', 'ivan@example.com', 'Код', '', true, 15, :sha, 'sent', 1,"
                " now(), now())"
            ),
            {"sha": hashlib.sha256("Ваш код: 482913".encode()).hexdigest()},
        )
        connection.execute(
            text(
                "INSERT INTO idempotency_keys (scope, key, fingerprint, notification_id,"
                " status_code, created_at, expires_at)"
                " VALUES ('key:0', 'otp-1', :sha, 1, 201, now(), now() + interval '1 day')"
            ),
            {"sha": "0" * 64},
        )

    run_migrations(engine)

    columns = {c["name"] for c in inspect(engine).get_columns("notifications")}
    with engine.connect() as connection:
        fingerprint = connection.scalar(text("SELECT fingerprint FROM idempotency_keys"))
        length = connection.scalar(text("SELECT text_length FROM notifications"))
    engine.dispose()
    assert "text_sha256" not in columns
    assert fingerprint == "erased"
    with engine.connect() as connection:
        evidence = connection.scalar(text("SELECT text_hmac FROM notifications"))
    assert evidence == "erased", "an erased text stays erased: it is never resent empty"
    assert length == 15


def test_upgrading_to_channels_keeps_the_smtp_codes_and_counts_unfinished_attempts(
    create_database: Callable[[], str],
) -> None:
    engine = make_engine(Settings(_env_file=None, database_url=create_database()))
    migrate_to(engine, "0006")
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO notifications (id, channel, recipient, subject, text, status,"
                " attempts, created_at, updated_at) VALUES"
                " (1, 'email', 'ivan@example.com', 'Бронь', 'Текст', 'queued', 2, now(), now()),"
                " (2, 'email', 'anna@example.com', 'Бронь', 'Текст', 'sent', 1, now(), now())"
            )
        )
        connection.execute(
            text(
                "INSERT INTO delivery_attempts (notification_id, number, started_at,"
                " finished_at, outcome, smtp_code, error) VALUES"
                " (1, 1, now(), now(), 'transient_error', 451, '451 try later'),"
                " (1, 2, now(), now(), 'transient_error', 421, '421 closing'),"
                " (2, 1, now(), now(), 'sent', 250, NULL)"
            )
        )

    run_migrations(engine)

    with engine.connect() as connection:
        attempts = connection.execute(
            text("SELECT notification_id, channel, code FROM delivery_attempts ORDER BY id")
        ).all()
        counts = connection.execute(
            text("SELECT id, route_position, channel_attempts FROM notifications ORDER BY id")
        ).all()
    engine.dispose()
    assert [tuple(row) for row in attempts] == [
        (1, "email", 451),
        (1, "email", 421),
        (2, "email", 250),
    ]
    # The queued one has used 2 of its attempts on its channel; the sent one is done.
    assert [tuple(row) for row in counts] == [(1, 0, 2), (2, 0, 0)]


def test_upgrading_to_suppressions_turns_the_unreachable_marks_into_suppressions(
    create_database: Callable[[], str],
) -> None:
    engine = make_engine(Settings(_env_file=None, database_url=create_database()))
    migrate_to(engine, "0009")
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO recipients (external_id, phone, telegram_chat_id, unreachable,"
                " created_at, updated_at) VALUES"
                " ('u1', '+79161234567', '42', CAST(:blocked AS json), now(), now()),"
                " ('u2', '+79160000000', NULL, CAST(:stopped AS json), now(), now()),"
                " ('u3', NULL, '7', NULL, now(), now())"
            ),
            {
                "blocked": '{"telegram": "403 Forbidden: bot was blocked by the user"}',
                "stopped": '{"sms": "209 in the stop list"}',
            },
        )

    run_migrations(engine)

    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT channel, address, scope, reason, detail FROM suppressions ORDER BY id")
        ).all()
        columns = {c["name"] for c in inspect(connection).get_columns("recipients")}
    engine.dispose()
    assert [tuple(row) for row in rows] == [
        ("telegram", "42", "all", "telegram_blocked", "403 Forbidden: bot was blocked by the user"),
        ("sms", "+79160000000", "all", "sms_stoplist", "209 in the stop list"),
    ]
    assert "unreachable" not in columns


def test_unreachable_rate_limit_storage_is_a_503_and_not_ready(
    make_client: Callable[..., TestClient], smtp: ScriptedHandler
) -> None:
    client = make_client(rate_limit_storage="redis://127.0.0.1:1/0")

    response = client.post("/notify/email", json=BOOKING)
    ready = client.get("/readyz")

    assert response.status_code == 503
    assert response.headers["retry-after"]
    assert (ready.status_code, ready.json()["detail"]) == (503, "rate-limit storage unavailable")
    assert client.get("/healthz").status_code == 200
    assert smtp.received == []
