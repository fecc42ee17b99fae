"""API keys and scopes, rate limits, sensitive notifications, and hostile input."""

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit
from uuid import uuid4

import limits
import limits.storage.redis
import pytest
from fastapi.testclient import TestClient
from limits import RateLimitItemPerSecond
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session, sessionmaker

import cli
import lifecycle
import ratelimits
from config import Settings
from models import ApiKey, IdempotencyKey, Notification
from tests.conftest import ADMIN_KEY, BOOKING, SECRET_KEY
from tests.faults import CuttableLink
from tests.smtpd import ScriptedHandler

OPEN = {"/healthz", "/readyz"}
# Reached from a recipient's mail client: a token in the URL is its only credential.
PUBLIC = {"/unsubscribe/{token}"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def new_key(client: TestClient, scopes: list[str], **limits: int) -> str:
    response = client.post(
        "/keys", json={"name": f"caller-{'-'.join(scopes)}", "scopes": scopes, **limits}
    )
    assert response.status_code == 201, response.text
    key: str = response.json()["key"]
    return key


def endpoints(client: TestClient) -> list[tuple[str, str, str | None]]:
    """Every operation the app itself publishes, with the scope it declares."""
    schema = client.app.openapi()  # type: ignore[attr-defined]
    found = []
    for path, operations in schema["paths"].items():
        if path in OPEN or path in PUBLIC:
            continue
        concrete = path.replace("{notification_id}", "1").replace("{batch_id}", "1")
        concrete = concrete.replace("{key_id}", "1").replace("{suppression_id}", "1")
        for method, operation in operations.items():
            declared = [s for r in operation.get("security", []) for s in r.get("ApiKey", [])]
            found.append((method.upper(), concrete, next(iter(declared), None)))
    return found


def call(client: TestClient, method: str, path: str, **kwargs: Any) -> int:
    return client.request(method, path, **kwargs).status_code


def test_no_endpoint_but_health_answers_without_a_valid_key(client: TestClient) -> None:
    routes = endpoints(client)
    assert len(routes) >= 10  # the enumeration found the API

    for method, path, _ in routes:
        anonymous = client.request(method, path, headers={"Authorization": ""})
        assert anonymous.status_code == 401, (method, path)
        assert anonymous.headers["www-authenticate"] == "Bearer"
        assert call(client, method, path, headers=bearer("ntf_not-a-key")) == 401, (method, path)
        assert call(client, method, path, headers={"Authorization": f"Basic {ADMIN_KEY}"}) == 401
    for path in OPEN:
        assert call(client, "GET", path, headers={"Authorization": ""}) == 200
    # Without a key, a link that is not ours is a 404 (never a 401 asking for a key).
    for method in ("GET", "POST"):
        assert call(client, method, "/unsubscribe/forged", headers={"Authorization": ""}) == 404


def test_every_endpoint_demands_its_scope(client: TestClient) -> None:
    scopes = ("send", "read", "recipients", "templates", "suppressions", "admin")
    keys = {scope: new_key(client, [scope]) for scope in scopes}
    # An operator (admin) may also correct a recipient's contacts, manage templates and
    # suppressions.
    implied = {"recipients": {"admin"}, "templates": {"admin"}, "suppressions": {"admin"}}

    for method, path, scope in endpoints(client):
        assert scope in keys, (method, path, "has no scope")
        for other, key in keys.items():
            status = call(client, method, path, headers=bearer(key))
            if other == scope or other in implied.get(scope, ()):
                assert status != 403, (method, path, other)
            else:
                assert status == 403, (method, path, other)


def test_a_revoked_key_fails_at_once(client: TestClient, db: sessionmaker[Session]) -> None:
    key = new_key(client, ["read"])
    assert call(client, "GET", "/notifications", headers=bearer(key)) == 200
    key_id = client.get("/keys").json()[-1]["id"]

    revoked = client.post(f"/keys/{key_id}/revoke")

    assert revoked.json()["revoked_at"] is not None
    assert call(client, "GET", "/notifications", headers=bearer(key)) == 401


def test_a_key_revoked_through_one_process_fails_at_once_in_another(
    make_client: Callable[..., TestClient],
) -> None:
    # Two API processes sharing the database and the rate-limit storage.
    first, second = make_client(), make_client()
    key = new_key(first, ["read"])
    assert call(first, "GET", "/notifications", headers=bearer(key)) == 200  # cached here
    key_id = second.get("/keys").json()[-1]["id"]

    assert second.post(f"/keys/{key_id}/revoke").status_code == 200

    assert call(first, "GET", "/notifications", headers=bearer(key)) == 401
    assert call(first, "GET", "/notifications", headers=bearer(key)) == 401


def test_a_known_key_costs_no_database_round_trip_before_the_route(client: TestClient) -> None:
    key = new_key(client, ["read"])
    assert call(client, "GET", "/notifications", headers=bearer(key)) == 200
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    state = client.app.state  # type: ignore[attr-defined]
    engines = [state.session_factory.kw["bind"], state.read_session_factory.kw["bind"]]
    for engine in engines:
        event.listen(engine, "before_cursor_execute", record)
    try:
        assert call(client, "GET", "/notifications", headers=bearer(key)) == 200
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", record)

    # The page's query and nothing else: the key came from this process's cache.
    assert len(statements) == 1 and "FROM notifications" in statements[0], statements


def test_keys_are_stored_only_as_hashes_and_listed_without_them(
    client: TestClient, db: sessionmaker[Session]
) -> None:
    key = new_key(client, ["send"])

    with db() as session:
        [stored] = session.scalars(select(ApiKey)).all()
    assert stored.key_hash == hashlib.sha256(key.encode()).hexdigest()
    assert key not in {stored.name, stored.prefix, stored.scopes}
    assert key.startswith(stored.prefix)
    listing = client.get("/keys").text
    assert key not in listing and stored.key_hash not in listing
    assert len(key) >= 40
    assert client.post("/keys", json={"name": stored.name, "scopes": ["send"]}).status_code == 409
    assert client.post("/keys", json={"name": "x", "scopes": ["root"]}).status_code == 422


def test_the_request_rate_per_key_is_limited(client: TestClient) -> None:
    key = new_key(client, ["read"], requests_per_minute=3)

    statuses = [call(client, "GET", "/notifications", headers=bearer(key)) for _ in range(4)]

    assert statuses == [200, 200, 200, 429]
    response = client.get("/notifications", headers=bearer(key))
    assert 1 <= int(response.headers["retry-after"]) <= 60


def test_one_message_over_the_per_address_limit_is_a_429_and_not_sent(
    make_client: Callable[..., TestClient], smtp: ScriptedHandler, db: sessionmaker[Session]
) -> None:
    # Two replicas on one database share the counters.
    first, second = (
        make_client(rate_limit_per_recipient_per_hour=2),
        make_client(rate_limit_per_recipient_per_hour=2),
    )
    assert first.post("/notify/email", json=BOOKING).status_code == 201
    assert second.post("/notify/email", json=BOOKING).status_code == 201

    over = first.post("/notify/email", json=BOOKING)
    other_address = second.post("/notify/email", json={**BOOKING, "email": "anna@example.com"})

    assert over.status_code == 429
    assert 1 <= int(over.headers["retry-after"]) <= 3600
    assert other_address.status_code == 201
    assert len(smtp.received) == 3
    with db() as session:
        assert session.scalar(select(func.count()).select_from(Notification)) == 3


def test_a_callers_own_recipient_limit_applies_to_bulk_items(
    client: TestClient, smtp: ScriptedHandler
) -> None:
    key = new_key(client, ["send"], recipient_hourly_limit=1)
    client.post("/notify/email", json=BOOKING, headers=bearer(key))
    body = {"emails": [BOOKING["email"], "anna@example.com"], "subject": "Тест", "text": "Текст"}

    response = client.post("/notify/bulk", json=body, headers=bearer(key))

    assert response.status_code == 202
    assert response.json()["batch"]["accepted"] == 1
    [limited] = response.json()["rejected"]
    assert (limited["index"], limited["error"]) == (0, ratelimits.RECIPIENT_LIMITED)


def test_a_sensitive_text_is_never_shown_and_erased_after_delivery(
    client: TestClient,
    smtp: ScriptedHandler,
    db: sessionmaker[Session],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    code: dict[str, Any] = {
        "email": "ivan.petrov@example.com",
        "subject": "Код подтверждения",
        "text": "Ваш код: 482913",
        "sensitive": True,
    }

    sent = client.post("/notify/email", json=code)

    assert sent.status_code == 201
    assert sent.json()["text"] is None
    assert "482913" in smtp.received[0].message.get_content()
    assert client.get(f"/notifications/{sent.json()['id']}").json()["text"] is None
    assert all(n["text"] is None for n in client.get("/notifications").json()["data"])
    with db() as session:
        stored = session.get(Notification, sent.json()["id"])
        assert stored is not None
        assert stored.text == ""
        assert stored.text_length == len(code["text"])
        assert stored.text_hmac == lifecycle.text_hmac(SECRET_KEY.encode(), code["text"])
    assert "482913" not in caplog.text


def test_a_failed_sensitive_notification_is_erased_and_cannot_be_resent(
    client: TestClient, smtp: ScriptedHandler, db: sessionmaker[Session]
) -> None:
    smtp.rcpt_replies.append("550 5.7.1 Refused by policy")
    failed = client.post("/notify/email", json={**BOOKING, "sensitive": True}).json()

    with db() as session:
        stored = session.get(Notification, failed["id"])
        assert stored is not None and stored.text == ""
    assert client.post(f"/notifications/{failed['id']}/retry").status_code == 409


def test_a_queued_sensitive_text_is_kept_until_it_is_sent(
    client: TestClient, db: sessionmaker[Session]
) -> None:
    queued = client.post(
        "/notify/email", json={**BOOKING, "sensitive": True}, headers={"Prefer": "respond-async"}
    ).json()

    assert queued["text"] is None
    with db() as session:
        stored = session.get(Notification, queued["id"])
        assert stored is not None and stored.text == BOOKING["text"]


@pytest.mark.parametrize(
    ("content", "headers"),
    [
        (b'{"email": "ivan@example.com", "subject": "x", ', {"Content-Type": "application/json"}),
        (
            b'{"email": "ivan@example.com", "subject": "\xff\xfe", "text": "x"}',
            {"Content-Type": "application/json"},
        ),
        (
            b"email=ivan@example.com&subject=x&text=y",
            {"Content-Type": "application/x-www-form-urlencoded"},
        ),
        (b"[]", {"Content-Type": "application/json"}),
        (
            b'{"email": "ivan@example.com", "subject": "' + b"x" * 1000 + b'", "text": "y"}',
            {"Content-Type": "application/json"},
        ),
        (
            b'{"email": "' + b"a" * 400 + b'@example.com", "subject": "s", "text": "y"}',
            {"Content-Type": "application/json"},
        ),
    ],
    ids=[
        "malformed-json",
        "invalid-utf8",
        "form-encoded",
        "not-an-object",
        "long-subject",
        "long-address",
    ],
)
def test_hostile_bodies_are_a_4xx_and_nothing_is_sent(
    client: TestClient,
    smtp: ScriptedHandler,
    db: sessionmaker[Session],
    content: bytes,
    headers: dict[str, str],
) -> None:
    response = client.post("/notify/email", content=content, headers=headers)

    assert 400 <= response.status_code < 500, response.text
    assert smtp.received == []
    with db() as session:
        assert session.scalar(select(func.count()).select_from(Notification)) == 0


def test_a_body_over_the_size_limit_is_a_413(
    make_client: Callable[..., TestClient], smtp: ScriptedHandler
) -> None:
    client = make_client(max_body_bytes=2048)
    big = {**BOOKING, "text": "x" * 4000}

    declared = client.post("/notify/email", json=big)

    def chunks() -> Any:
        yield b'{"email": "ivan@example.com", "subject": "s", "text": "'
        yield b"x" * 4000
        yield b'"}'

    streamed = client.post(
        "/notify/email", content=chunks(), headers={"Content-Type": "application/json"}
    )

    assert (declared.status_code, streamed.status_code) == (413, 413)
    assert smtp.received == []


def test_keys_can_be_managed_from_the_command_line(
    settings: Settings,
    db: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    make_client: Callable[..., TestClient],
) -> None:
    # The service's own environment, as the command line is run in production.
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    monkeypatch.setenv("AUTO_MIGRATE", "false")
    monkeypatch.setenv("RATE_LIMIT_STORAGE", settings.rate_limit_storage)
    monkeypatch.setenv("RATE_LIMIT_PREFIX", settings.rate_limit_prefix)

    cli.main(["keys", "create", "booking-service", "--scopes", "send,read"])
    key = capsys.readouterr().out.strip()
    cli.main(["keys", "list"])
    listing = capsys.readouterr().out
    client = make_client()
    ok = call(client, "GET", "/notifications", headers=bearer(key))
    cli.main(["keys", "revoke", "booking-service"])

    assert key.startswith("ntf_")
    assert "booking-service" in listing and "send read" in listing and key not in listing
    assert ok == 200
    assert call(client, "GET", "/notifications", headers=bearer(key)) == 401


def test_secrets_stay_out_of_reprs_and_logs(
    settings: Settings, client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client.get("/notifications", headers=bearer("ntf_wrong-key-that-must-not-be-logged"))

    assert ADMIN_KEY not in repr(settings)
    assert "ntf_wrong-key-that-must-not-be-logged" not in caplog.text
    assert ADMIN_KEY not in caplog.text


def test_case_variants_of_one_address_are_one_recipient(client: TestClient) -> None:
    key = new_key(client, ["send"], recipient_hourly_limit=1)
    variants = ["ivan@example.com", "Ivan@example.com", "IVAN@EXAMPLE.COM", "iVaN@example.com"]
    body = {"emails": variants, "subject": "Тест", "text": "Текст"}

    response = client.post("/notify/bulk", json=body, headers=bearer(key))

    assert response.json()["batch"]["accepted"] == 1
    assert {r["error"] for r in response.json()["rejected"]} == {"duplicate of item 0"}


@pytest.mark.parametrize(
    ("path", "content"),
    [
        ("/notify/email", '{"email": "\\ud800@example.com", "subject": "s", "text": "t"}'),
        ("/notify/email", '{"email": "a@example.com", "subject": "\\ud800", "text": "t"}'),
        (
            "/notify/email",
            '{"email": "a@example.com", "subject": "s", "text": "t",'
            ' "send_at": "0001-01-01T00:00:00+14:00"}',
        ),
        (
            "/notify/bulk",
            '{"emails": ["a@example.com"], "subject": "s", "text": "t",'
            ' "send_at": "9999-12-31T23:59:59-23:59"}',
        ),
    ],
    ids=["surrogate-address", "surrogate-subject", "send-at-underflow", "send-at-overflow"],
)
def test_unencodable_or_out_of_range_input_is_a_422_not_a_500(
    client: TestClient, smtp: ScriptedHandler, path: str, content: str
) -> None:
    response = client.post(path, content=content, headers={"Content-Type": "application/json"})

    assert response.status_code == 422, response.text
    assert smtp.received == []


def test_a_surrogate_in_a_bulk_item_is_reported_not_a_500(client: TestClient) -> None:
    content = '{"emails": ["a@example.com", "\\ud800@example.com"], "subject": "s", "text": "t"}'

    response = client.post(
        "/notify/bulk", content=content, headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 202
    assert response.json()["rejected"][0]["email"] == "\\ud800@example.com"


@pytest.mark.parametrize(
    "query",
    [
        {"recipient": "a\x00b@example.com"},
        {"created_from": "9999-12-31T23:59:59-23:59"},
        {"created_to": "0001-01-01T00:00:00+14:00"},
    ],
)
def test_hostile_history_filters_are_a_422(client: TestClient, query: dict[str, str]) -> None:
    assert client.get("/notifications", params=query).status_code == 422


def test_a_refused_sensitive_request_does_not_echo_its_text(client: TestClient) -> None:
    code = {**BOOKING, "text": "Ваш код: 482913\x07", "sensitive": True}

    response = client.post("/notify/email", json=code)

    assert response.status_code == 422
    assert "482913" not in response.text
    assert response.json()["detail"][0]["loc"] == ["body", "text"]


@pytest.mark.parametrize(
    "content",
    [b'{"email": "broken', b"x" * 10_000],
    ids=["malformed-json", "over-the-size-limit"],
)
def test_without_a_key_the_body_is_never_read(
    make_client: Callable[..., TestClient], content: bytes
) -> None:
    client = make_client(max_body_bytes=2048)

    response = client.post(
        "/notify/email",
        content=content,
        headers={"Authorization": "Bearer ntf_unknown", "Content-Type": "application/json"},
    )

    assert response.status_code == 401
    assert call(client, "GET", "/openapi.json", headers={"Authorization": ""}) == 200


class WindowClock:
    """`time.time` as the rate-limit storage reads it, moved by the test instead of slept."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


def test_a_moving_window_lets_no_second_burst_through_at_a_window_boundary(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    limiter = ratelimits.RateLimiter(settings.rate_limit_storage, prefix=f"boundary-{uuid4()}")
    ten_per_two_seconds = RateLimitItemPerSecond(10, 2)
    # The library stamps each hit with the client's time.time() (the Redis script keeps
    # those stamps), and the limiter takes no clock of its own: this one stands in.
    clock = WindowClock(2 * (time.time() // 2) + 1.7)
    monkeypatch.setattr(limits.storage.redis, "time", clock)
    # Just before a two-second boundary, then just after it: a fixed window would count
    # the two bursts in different windows and let all twenty through.
    before = [limiter.hit(ten_per_two_seconds, "key:1") is None for _ in range(10)]
    clock.now += 0.35
    after = [limiter.hit(ten_per_two_seconds, "key:1") is None for _ in range(10)]

    assert before == [True] * 10
    assert after == [False] * 10
    clock.now += 2
    assert limiter.hit(ten_per_two_seconds, "key:1") is None


def test_racing_requests_meet_the_limit_exactly(client: TestClient) -> None:
    key = new_key(client, ["read"], requests_per_minute=50)
    statuses: list[int] = []

    def caller() -> None:
        for _ in range(5):
            statuses.append(call(client, "GET", "/notifications", headers=bearer(key)))

    callers = [threading.Thread(target=caller) for _ in range(16)]
    for thread in callers:
        thread.start()
    for thread in callers:
        thread.join(60)

    assert len(statuses) == 80
    assert (statuses.count(200), statuses.count(429)) == (50, 30)


def test_sub_addresses_and_letter_case_share_one_recipient_limit(
    client: TestClient, smtp: ScriptedHandler
) -> None:
    key = new_key(client, ["send"], recipient_hourly_limit=3)
    variants = ["victim@example.org"] + [f"Victim+{i}@example.org" for i in range(1, 6)]

    statuses = [
        call(client, "POST", "/notify/email", json={**BOOKING, "email": e}, headers=bearer(key))
        for e in variants
    ]

    assert statuses == [201, 201, 201, 429, 429, 429]
    assert len(smtp.received) == 3


@pytest.mark.slow
def test_an_erased_code_cannot_be_found_by_trying_every_code(
    client: TestClient, db: sessionmaker[Session]
) -> None:
    code = {**BOOKING, "subject": "Код", "text": "Ваш код: 482913", "sensitive": True}
    sent = client.post("/notify/email", json=code, headers={"Idempotency-Key": "otp-1"})
    assert sent.status_code == 201
    with db() as session:
        stored = session.get(Notification, sent.json()["id"])
        assert stored is not None
        evidence = stored.text_hmac
        fingerprint = session.scalars(select(IdempotencyKey.fingerprint)).one()
    assert evidence is not None

    # What an attacker with the database (and not SECRET_KEY) would try: every code, as
    # the text alone and as the request whose fingerprint the key stores.
    request = json.dumps(
        {
            "body": {**code, "send_at": None, "email": BOOKING["email"]},
            "endpoint": "/notify/email",
            "queued": False,
        },
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    head, tail = request.split("482913")
    # The same two hashes of each code, compared as bytes: two million of them, so no
    # string is formatted or hex-encoded that need not be.
    text_head, before, after = "Ваш код: ".encode(), head.encode(), tail.encode()
    evidence_digest, fingerprint_digest = bytes.fromhex(evidence), bytes.fromhex(fingerprint)
    found = [
        n
        for n in range(1_000_000)
        if hashlib.sha256(text_head + b"%06d" % n).digest() == evidence_digest
        or hashlib.sha256(before + b"%06d" % n + after).digest() == fingerprint_digest
    ]

    assert found == []
    # The same request is still recognised as a repeat.
    again = client.post("/notify/email", json=code, headers={"Idempotency-Key": "otp-1"})
    assert again.headers["idempotent-replayed"] == "true"
    # And the evidence still proves what was sent, to whoever holds the key.
    assert evidence == lifecycle.text_hmac(SECRET_KEY.encode(), "Ваш код: 482913")


def test_a_queued_send_counts_its_key_and_recipient_in_one_redis_round_trip(
    make_client: Callable[..., TestClient], settings: Settings
) -> None:
    redis = urlsplit(settings.rate_limit_storage)
    assert redis.hostname is not None and redis.port is not None
    link = CuttableLink((redis.hostname, redis.port))
    try:
        client = make_client(rate_limit_storage=f"redis://127.0.0.1:{link.port}{redis.path}")
        headers = bearer(new_key(client, ["send"])) | {"Prefer": "respond-async"}
        # The first loads the scripts and opens the connection.
        assert client.post("/notify/email", json=BOOKING, headers=headers).status_code == 202
        before = link.turns

        statuses = [
            client.post(
                "/notify/email", json={**BOOKING, "email": f"m{i}@example.org"}, headers=headers
            ).status_code
            for i in range(5)
        ]

        assert statuses == [202] * 5
        assert link.turns - before == 5
    finally:
        link.close()


def test_a_bulk_counted_many_keys_per_script_answers_as_the_librarys_own_hits(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Repeated addresses across the chunks' edges, some over their limit of 2 an hour.
    monkeypatch.setattr(ratelimits, "ACQUIRE_CHUNK", 3)
    addresses = [f"m{n % 4}@example.org" for n in range(11)] + ["M1@Example.org"]
    ours = ratelimits.RateLimiter(settings.rate_limit_storage, prefix=f"ours-{uuid4().hex}")
    theirs = ratelimits.RateLimiter(settings.rate_limit_storage, prefix=f"theirs-{uuid4().hex}")
    storage = ours.storage
    assert isinstance(storage, limits.storage.RedisStorage)
    # As Redis is the first time a bulk comes, or after a restart and one send: the
    # library's script there, ours not.
    redis = storage.get_connection()
    redis.script_flush()  # type: ignore[attr-defined]
    redis.script_load(limits.storage.RedisStorage.SCRIPT_ACQUIRE_MOVING_WINDOW)  # type: ignore[attr-defined]
    key = ratelimits.KeyCount(ApiKey(id=987654, name="bulk"), limit=5)
    try:
        granted, wait = ours.take_recipients(addresses, 2, key=key)
        item = limits.RateLimitItemPerHour(2)
        expected = [
            theirs.strategy.hit(item, f"rcpt:{ratelimits.recipient_subject(a, 'email')}")
            for a in addresses
        ]

        assert granted == expected
        assert granted.count(True) == 8  # two for each of the four
        assert 3590 < wait <= 3600
        # The key's request counted once, though the recipients' script was sent twice.
        assert ours.strategy.get_window_stats(*key.window).remaining == 4
    finally:
        ours.storage.reset()
        theirs.storage.reset()


def test_a_send_answered_before_it_counts_still_counts_against_its_key(
    client: TestClient,
) -> None:
    key = new_key(client, ["send"], requests_per_minute=2)
    invalid = {**BOOKING, "email": "not an address"}

    statuses = [
        call(client, "POST", "/notify/email", json=invalid, headers=bearer(key)) for _ in range(2)
    ]

    assert statuses == [422, 422]
    assert call(client, "POST", "/notify/email", json=BOOKING, headers=bearer(key)) == 429


def test_a_send_over_its_keys_limit_does_not_count_against_its_recipient(
    client: TestClient, smtp: ScriptedHandler
) -> None:
    limited = new_key(client, ["send"], requests_per_minute=1, recipient_hourly_limit=1)
    other = new_key(client, ["send", "read"], recipient_hourly_limit=1)
    anna = {**BOOKING, "email": "anna@example.com"}
    assert call(client, "POST", "/notify/email", json=BOOKING, headers=bearer(limited)) == 201

    over = client.post("/notify/email", json=anna, headers=bearer(limited))

    assert over.status_code == 429
    assert "per minute for this API key" in over.json()["detail"]
    # Anna's one message an hour is still hers to get, once.
    assert call(client, "POST", "/notify/email", json=anna, headers=bearer(other)) == 201
    assert call(client, "POST", "/notify/email", json=anna, headers=bearer(other)) == 429
    assert len(smtp.received) == 2


def test_a_send_with_a_key_revoked_through_another_process_is_a_401(
    make_client: Callable[..., TestClient], smtp: ScriptedHandler
) -> None:
    first, second = make_client(), make_client()
    key = new_key(first, ["send", "read"])
    assert call(first, "GET", "/notifications", headers=bearer(key)) == 200  # cached here
    key_id = second.get("/keys").json()[-1]["id"]
    assert second.post(f"/keys/{key_id}/revoke").status_code == 200

    for _ in range(2):
        refused = first.post("/notify/email", json=BOOKING, headers=bearer(key))
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == "Bearer"
    assert smtp.received == []
