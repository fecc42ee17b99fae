"""With no configuration the service runs on SQLite and the development mail catcher."""

import shutil
from datetime import UTC, datetime
from email import message_from_bytes, policy
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import text

from config import Settings
from db import make_engine, run_migrations
from mailer import SMTPMailer
from main import create_app
from schemas import HistoryCursor
from tests.conftest import ADMIN_KEY, AUTH, BOOKING, Settled, migrate_to

CONFIG_VARIABLES = ("DATABASE_URL", "SMTP_HOST", "SMTP_PORT", "SMTP_USER", "SMTP_PASSWORD")


@pytest.fixture(scope="module")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite database at the newest migration, made once for the module."""
    path = tmp_path_factory.mktemp("sqlite") / "notifications.db"
    engine = make_engine(Settings(_env_file=None, database_url=f"sqlite:///{path}"))
    run_migrations(engine)
    engine.dispose()
    return path


@pytest.fixture
def migrated_sqlite(tmp_path: Path, sqlite_template: Path) -> None:
    """`tmp_path / "notifications.db"` at the newest migration, so the app's own migration
    at start finds nothing to do: migrating a new database takes 150 to 250 ms, and the
    first start from nothing has a test of its own."""
    shutil.copyfile(sqlite_template, tmp_path / "notifications.db")


def test_defaults_are_sqlite_and_the_mail_catcher(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in CONFIG_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    settings = Settings(_env_file=None)

    assert settings.database_url.startswith("sqlite:///")
    assert settings.uses_dev_mail_catcher
    assert settings.smtp_verify_tls


def test_main_path_on_sqlite_with_the_mail_catcher(tmp_path: Path) -> None:
    settings = Settings(
        _env_file=None,
        database_url=f"sqlite:///{tmp_path / 'var' / 'notifications.db'}",
        smtp_host="",
        dev_mail_dir=tmp_path / "mail",
        dev_api_key_file=tmp_path / "var" / "dev-api-key",
        dev_secret_key_file=tmp_path / "var" / "secret-key",
    )

    with TestClient(create_app(settings)) as client:
        refused = client.post("/notify/email", json=BOOKING)
        # The newcomer's first curl reads the development key the service wrote.
        key = (tmp_path / "var" / "dev-api-key").read_text().strip()
        client.headers["Authorization"] = f"Bearer {key}"
        created = client.post("/notify/email", json=BOOKING)
        second = client.post("/notify/email", json={**BOOKING, "email": "anna@example.com"})
        history = client.get("/notifications", params={"limit": 1})
        rest = client.get("/notifications", params={"cursor": history.json()["next_cursor"]})
        detail = client.get(f"/notifications/{created.json()['id']}")

    assert refused.status_code == 401
    assert created.status_code == 201, created.text
    assert created.json()["status"] == "sent"
    assert second.status_code == 201
    assert [n["id"] for n in history.json()["data"] + rest.json()["data"]] == [
        second.json()["id"],
        created.json()["id"],
    ]
    assert detail.json()["delivery_attempts"][0]["outcome"] == "sent"
    assert detail.json()["created_at"].endswith("Z")
    saved = sorted((tmp_path / "mail").glob("*.eml"))
    assert len(saved) == 2
    subjects = {message_from_bytes(p.read_bytes(), policy=policy.default)["Subject"] for p in saved}
    assert subjects == {BOOKING["subject"]}


@pytest.mark.usefixtures("migrated_sqlite")
def test_the_in_api_worker_delivers_queued_mail_on_sqlite(tmp_path: Path) -> None:
    settings = Settings(
        _env_file=None,
        database_url=f"sqlite:///{tmp_path / 'notifications.db'}",
        smtp_host="",
        dev_mail_dir=tmp_path / "mail",
        dev_api_key_file=tmp_path / "dev-api-key",
        dev_secret_key_file=tmp_path / "secret-key",
        worker_poll_interval=0.05,
    )

    with TestClient(create_app(settings)) as client:
        key = (tmp_path / "dev-api-key").read_text().strip()
        client.headers["Authorization"] = f"Bearer {key}"
        settled = Settled(client.app)
        queued = [
            client.post("/notify/email", json=body, headers={"Prefer": "respond-async"}).json()
            for body in (BOOKING, {**BOOKING, "text": "Код: 123456", "sensitive": True})
        ]
        bulk = client.post(
            "/notify/bulk",
            json={"emails": [f"m{i}@example.com" for i in range(5)], **BOOKING},
        ).json()
        assert settled.wait(7), "the in-API worker never sent everything"
        assert client.get(f"/batches/{bulk['batch']['id']}").json()["counts"]["sent"] == 5
        assert all(
            client.get(f"/notifications/{n['id']}").json()["status"] == "sent" for n in queued
        )
        details = [client.get(f"/notifications/{n['id']}").json() for n in queued]

    for detail in details:
        attempts = [(a["number"], a["outcome"]) for a in detail["delivery_attempts"]]
        assert (detail["attempts"], attempts) == (1, [(1, "sent")])
    assert details[1]["text"] is None and details[1]["text_length"] == len("Код: 123456")
    assert len(list((tmp_path / "mail").glob("*.eml"))) == 7


def test_secrets_stay_out_of_reprs() -> None:
    settings = Settings(
        _env_file=None,
        database_url="postgresql://notify:db-pass-77@db/notify",
        smtp_host="smtp.example.com",
        smtp_user="u",
        smtp_password="hunter2-pass",
        secret_key="hmac-secret-99-long-enough",
    )

    assert "db-pass-77" not in repr(settings)
    assert "hunter2-pass" not in repr(settings)
    assert "hmac-secret-99-long-enough" not in repr(settings)
    assert "hunter2-pass" not in str(settings.model_dump())
    assert "hunter2-pass" not in repr(SMTPMailer.from_settings(settings))


@pytest.mark.parametrize("key", ["", "short-key-15chr"])
def test_an_empty_or_short_secret_key_is_refused(key: str) -> None:
    with pytest.raises(ValidationError, match="SECRET_KEY must be at least 16 characters"):
        Settings(_env_file=None, smtp_host="smtp.example.com", secret_key=key)


def test_upgrading_sqlite_keeps_every_row(tmp_path: Path) -> None:
    # Batch migrations rebuild tables on SQLite; the rebuild must not cascade into attempts.
    engine = make_engine(Settings(_env_file=None, database_url=f"sqlite:///{tmp_path / 'old.db'}"))
    migrate_to(engine, "0002")
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO notifications (id, channel, recipient, subject, text, status,"
                " attempts, created_at, updated_at) VALUES (1, 'email', 'a@example.com', 's',"
                " 't', 'sent', 1, '2026-11-01 10:00:00', '2026-11-01 10:00:00')"
            )
        )
        connection.execute(
            text(
                "INSERT INTO delivery_attempts (notification_id, number, started_at,"
                " finished_at, outcome) VALUES (1, 1, '2026-11-01 10:00:00',"
                " '2026-11-01 10:00:01', 'sent')"
            )
        )

    run_migrations(engine)

    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM delivery_attempts")).scalar() == 1
        assert connection.execute(text("SELECT version FROM notifications")).scalar() == 1
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
    engine.dispose()


TOO_BIG = 2**63


@pytest.mark.usefixtures("migrated_sqlite")
@pytest.mark.parametrize(
    ("method", "path", "params"),
    [
        ("GET", f"/notifications/{TOO_BIG}", {}),
        ("POST", f"/notifications/{TOO_BIG}/retry", {}),
        ("POST", f"/notifications/{TOO_BIG}/cancel", {}),
        ("GET", f"/batches/{TOO_BIG}", {}),
        ("POST", f"/keys/{TOO_BIG}/revoke", {}),
        ("GET", "/notifications", {"batch_id": str(TOO_BIG)}),
        (
            "GET",
            "/notifications",
            {
                "cursor": HistoryCursor.model_construct(
                    created_at=datetime(2026, 11, 25, tzinfo=UTC), id=TOO_BIG
                ).encode()
            },
        ),
        ("GET", "/notifications/0", {}),
        ("GET", f"/notifications/-{TOO_BIG + 1}", {}),
    ],
)
def test_ids_out_of_range_are_a_422_on_sqlite(
    tmp_path: Path, method: str, path: str, params: dict[str, str]
) -> None:
    settings = Settings(
        _env_file=None,
        database_url=f"sqlite:///{tmp_path / 'notifications.db'}",
        smtp_host="",
        dev_mail_dir=tmp_path / "mail",
        dev_api_key_file=tmp_path / "dev-api-key",
        dev_secret_key_file=tmp_path / "secret-key",
        bootstrap_api_key=ADMIN_KEY,
        worker_in_api=False,
    )

    with TestClient(create_app(settings), headers=AUTH) as client:
        response = client.request(method, path, params=params)

    assert response.status_code == 422, response.text


def embedded(tmp_path: Path) -> Settings:
    """What `make run` runs on: SQLite, the mail catcher and the SMS/Telegram stand-in."""
    return Settings(
        _env_file=None,
        database_url=f"sqlite:///{tmp_path / 'notifications.db'}",
        smtp_host="",
        dev_mail_dir=tmp_path / "mail",
        dev_outbox_dir=tmp_path / "outbox",
        dev_api_key_file=tmp_path / "dev-api-key",
        dev_secret_key_file=tmp_path / "secret-key",
        bootstrap_api_key=ADMIN_KEY,
        worker_in_api=False,
    )


@pytest.mark.usefixtures("migrated_sqlite")
@pytest.mark.parametrize(
    ("contact", "refusal"),
    [
        (
            {"phone": "+7 900 000-00-00"},
            ("sms", 207, "На этот номер (или один из номеров) нельзя отправлять сообщения"),
        ),
        (
            {"telegram_chat_id": "-1"},
            ("telegram", 403, "Forbidden: bot was blocked by the user"),
        ),
    ],
    ids=["sms-number-ending-in-seven-zeros", "telegram-chat-minus-one"],
)
def test_the_stand_ins_test_values_show_a_fallback_to_email(
    tmp_path: Path, contact: dict[str, str], refusal: tuple[str, int, str]
) -> None:
    channel, code, text = refusal
    body = {
        "recipient": {"email": BOOKING["email"], **contact},
        "channels": [channel, "email"],
        "subject": BOOKING["subject"],
        "text": BOOKING["text"],
    }

    with TestClient(create_app(embedded(tmp_path)), headers=AUTH) as client:
        response = client.post("/notify", json=body)

    assert response.status_code == 201, response.text
    sent = response.json()
    assert (sent["status"], sent["channel"], sent["recipient"]) == (
        "sent",
        "email",
        BOOKING["email"],
    )
    attempts = [(a["channel"], a["outcome"], a["code"]) for a in sent["delivery_attempts"]]
    assert attempts == [(channel, "permanent_error", code), ("email", "sent", 250)]
    assert text in sent["delivery_attempts"][0]["error"]
    assert not list((tmp_path / "outbox").glob(f"{channel}/*.json"))
    assert len(list((tmp_path / "mail").glob("*.eml"))) == 1


@pytest.mark.usefixtures("migrated_sqlite")
@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_health_answers_options_with_the_methods_it_allows(tmp_path: Path, path: str) -> None:
    with TestClient(create_app(embedded(tmp_path))) as client:
        response = client.options(path)

    assert response.status_code == 204
    assert response.headers["Allow"] == "GET, HEAD, OPTIONS"
    assert response.content == b""


def test_production_needs_a_secret_key_even_without_smtp(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="SECRET_KEY is required in production"):
        Settings(_env_file=None, environment="production", smtp_host="")


def test_production_without_smtp_has_no_e_mail_and_starts_no_stand_in(tmp_path: Path) -> None:
    """An SMS-only deployment: e-mail is not configured, and nothing local stands in."""
    settings = Settings(
        _env_file=None,
        environment="production",
        database_url=f"sqlite:///{tmp_path / 'notifications.db'}",
        smtp_host="",
        secret_key="production-secret-key-0123",
        bootstrap_api_key=ADMIN_KEY,
        dev_mail_dir=tmp_path / "mail",
        dev_outbox_dir=tmp_path / "outbox",
        dev_api_key_file=tmp_path / "dev-api-key",
    )

    with TestClient(create_app(settings), headers=AUTH) as client:
        email = client.post("/notify/email", json=BOOKING)
        sms = client.post("/notify/sms", json={"phone": "+79161234567", "text": "Код 123456"})

    assert email.status_code == 422
    assert email.json()["detail"][0]["msg"] == "the email channel is not configured"
    assert sms.status_code == 422
    assert sms.json()["detail"][0]["msg"] == "the sms channel is not configured"
    assert not (tmp_path / "mail").exists()
    assert not (tmp_path / "outbox").exists()
    assert not (tmp_path / "dev-api-key").exists()


def test_development_with_an_smtp_server_still_stands_in_for_sms(tmp_path: Path) -> None:
    settings = Settings(
        _env_file=None,
        environment="development",
        database_url=f"sqlite:///{tmp_path / 'notifications.db'}",
        smtp_host="127.0.0.1",
        bootstrap_api_key=ADMIN_KEY,
        dev_outbox_dir=tmp_path / "outbox",
        dev_api_key_file=tmp_path / "dev-api-key",
        dev_secret_key_file=tmp_path / "secret-key",
    )

    with TestClient(create_app(settings), headers=AUTH) as client:
        sms = client.post("/notify/sms", json={"phone": "+79161234567", "text": "Код 123456"})

    assert sms.status_code == 201, sms.text
    assert list((tmp_path / "outbox" / "sms").iterdir())
