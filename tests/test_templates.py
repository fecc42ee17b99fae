"""Stored, versioned templates: the sandbox, the API, sending by template over a real SMTP
server and PostgreSQL, the snapshot taken at acceptance, and the shipped catalogue."""

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from catalogue import CATALOGUE_DIR, Catalogue, read_folder
from config import Settings
from mailer import MessageRenderer, _flattened, build_message, new_boundary
from models import Notification, Template, TemplateVersion
from templating import Renderer, TemplateError, Variable
from tests.conftest import Settled
from tests.smtpd import ScriptedHandler

BOOKED = {
    "key": "room_booked",
    "variables": [
        {"name": "name", "example": "Иван"},
        {"name": "room", "example": "Байкал"},
        {"name": "start", "type": "datetime", "example": "2026-11-25T10:00:00+03:00"},
        {"name": "seats", "type": "integer", "example": 2},
    ],
    "content": {
        "ru": {
            "subject": "Забронировано: {{ room }}",
            "text": "Здравствуйте, {{ name }}! «{{ room }}», {{ start|date('d MMMM') }}, "
            "{{ start|time }}, {{ seats|plural('место', 'места', 'мест') }}.",
            "html": "<p>Здравствуйте, {{ name }}! «{{ room }}», {{ seats|plural('место', "
            "'места', 'мест') }}.</p>",
            "sms": "{{ room }}: {{ start|time }}",
        },
        "en": {"subject": "Booked: {{ room }}", "text": "Hello, {{ name }}! {{ room }}."},
    },
}
DATA = {"name": "Иван", "room": "Байкал", "start": "2026-11-25T10:00:00+03:00", "seats": 5}

# Each tries to leave the sandbox, or to exhaust the process; each is a 422.
SSTI = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ self._TemplateReference__context }}",
    "{{ ''|attr('__class__') }}",
    "{{ name['__class__'] }}",
    "{{ lipsum.__globals__ }}",
    "{{ namespace }}",
    "{% for i in range(10**9) %}x{% endfor %}",
    "{{ 'x' * 5000000 }}",
    "{% for i in range(1000) %}{% for j in range(1000) %}xxxxxxxxxx{% endfor %}{% endfor %}",
    "{% include '/etc/passwd' %}",
    "{{ 2 ** 100000 }}",
    "{{ name.format }}{{ name|format(1) }}",
    "{% set a = 'x' * 200000 %}{{ a ~ a }}",
    "{% set a = 'x' * 200000 %}{{ [a, a, a]|join }}",
    "{% set a = ['x' * 262144] * 262144 %}{{ a }}",
    "{% set a = 'x' * 200000 %}{{ [a, a]|upper }}",
    "{{ 'x'.ljust(10**9) }}",
    "{{ '{:>999999999}'.format(1) }}",
    "{{ '%999999999d' % 1 }}",
    "{{ (1).to_bytes(10**9, 'big') }}",
    "{% for i in range(1000) %}{% for j in range(1000) %}{% for k in range(1000) %}"
    "{% endfor %}{% endfor %}{% endfor %}",
    "{% macro m(n) %}{{ m(n) }}{% endmacro %}{{ m(1) }}",
]


def create(client: TestClient, body: dict[str, Any] = BOOKED) -> dict[str, Any]:
    response = client.post("/templates", json=body)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


@pytest.mark.parametrize("source", SSTI)
def test_a_template_escaping_the_sandbox_is_refused_with_a_422(
    client: TestClient, source: str, db: sessionmaker[Session]
) -> None:
    body = {
        "key": "evil",
        "variables": [{"name": "name", "example": "x"}],
        "content": {"ru": {"sms": source}},
    }
    response = client.post("/templates", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][0] == "body"
    with db() as session:
        assert session.scalar(select(func.count()).select_from(Template)) == 0


@pytest.mark.parametrize(
    ("count", "ru", "en"),
    [
        (1, "1 место", "1 seat"),
        (2, "2 места", "2 seats"),
        (5, "5 мест", "5 seats"),
        (11, "11 мест", "11 seats"),
        (21, "21 место", "21 seats"),
    ],
)
def test_plural_forms_follow_the_locale(count: int, ru: str, en: str) -> None:
    renderer = Renderer(brand={}, layouts={})
    content = {
        "ru": {"sms": "{{ n|plural('место', 'места', 'мест') }}"},
        "en": {"sms": "{{ n|plural('seat', 'seats') }}"},
    }
    variables = [Variable("n", "integer")]
    for locale, expected in (("ru", ru), ("en", en)):
        rendered = renderer.render(content, variables, {"n": count}, locale=locale)
        assert rendered[next(iter(rendered))].text == expected


def test_a_missing_or_ill_typed_variable_names_it() -> None:
    renderer = Renderer(brand={}, layouts={})
    variables = [Variable("n", "integer"), Variable("when", "datetime")]
    content = {"ru": {"sms": "{{ n }} {{ when|time }}"}}
    with pytest.raises(TemplateError) as missing:
        renderer.render(content, variables, {"n": 1}, locale="ru")
    assert missing.value.field == "data.when"
    with pytest.raises(TemplateError) as ill_typed:
        renderer.render(content, variables, {"n": "two", "when": "x"}, locale="ru")
    assert ill_typed.value.field == "data.n"


def test_templates_are_created_versioned_activated_under_if_match_and_previewed(
    client: TestClient,
) -> None:
    created = create(client)
    assert created["active_version"] == 1 and created["version"]["number"] == 1
    read = client.get("/templates/room_booked")
    etag = read.headers["ETag"]
    added = client.post(
        "/templates/room_booked/versions",
        json={"variables": BOOKED["variables"], "content": {"ru": {"sms": "v2 {{ room }}"}}},
    )
    assert added.status_code == 201 and added.json()["number"] == 2
    assert "declared but not used" in added.json()["warnings"][0]
    # Adding a version changed the template: the ETag read before it is stale.
    stale = client.post("/templates/room_booked/versions/2/activate", headers={"If-Match": etag})
    assert stale.status_code == 412
    missing = client.post("/templates/room_booked/versions/2/activate")
    assert missing.status_code == 428
    fresh = client.get("/templates/room_booked").headers["ETag"]
    activated = client.post(
        "/templates/room_booked/versions/2/activate", headers={"If-Match": fresh}
    )
    assert activated.status_code == 200 and activated.json()["active_version"] == 2
    versions = client.get("/templates/room_booked/versions").json()
    assert [v["number"] for v in versions] == [1, 2]
    preview = client.post("/templates/room_booked/preview", json={"version": 1, "data": DATA})
    assert preview.status_code == 200, preview.text
    body = preview.json()
    assert body["email"]["subject"] == "Забронировано: Байкал"
    assert "5 мест" in body["email"]["text"] and "5 мест" in body["email"]["html"]
    assert body["sms"] == {
        "text": "Байкал: 10:00",
        "encoding": "ucs2",
        "segments": 1,
        "characters": 13,
    }
    # The first version is unchanged by the second.
    assert client.get("/templates/room_booked/versions/1").json()["content"]["ru"]["sms"] == (
        "{{ room }}: {{ start|time }}"
    )


def test_a_templated_html_mail_arrives_as_text_then_html(
    client: TestClient, smtp: ScriptedHandler, db: sessionmaker[Session]
) -> None:
    create(client)
    response = client.post(
        "/notify/email",
        json={"email": "ivan@example.com", "template": "room_booked", "data": DATA},
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["template_key"], body["template_version"], body["locale"]) == (
        "room_booked",
        1,
        "ru",
    )
    [received] = smtp.received
    message = received.message
    assert message["Subject"] == "Забронировано: Байкал"
    assert message.get_content_type() == "multipart/alternative"
    parts = list(message.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert isinstance(parts[0], EmailMessage) and isinstance(parts[1], EmailMessage)
    assert "25 ноября, 10:00, 5 мест" in parts[0].get_content()
    assert "<p>Здравствуйте, Иван!" in parts[1].get_content()


def test_a_missing_variable_is_a_422_and_nothing_is_stored(
    client: TestClient, smtp: ScriptedHandler, db: sessionmaker[Session]
) -> None:
    create(client)
    data = {k: v for k, v in DATA.items() if k != "room"}
    response = client.post(
        "/notify/email", json={"email": "ivan@example.com", "template": "room_booked", "data": data}
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "data", "room"]
    both = client.post(
        "/notify/email",
        json={"email": "i@example.com", "subject": "s", "text": "t", "template": "room_booked"},
    )
    assert both.status_code == 422
    unknown = client.post(
        "/notify/email", json={"email": "i@example.com", "template": "nope", "data": {}}
    )
    assert unknown.status_code == 422
    with db() as session:
        assert session.scalar(select(func.count()).select_from(Notification)) == 0
    assert smtp.received == []


def test_an_edit_and_activation_after_queueing_do_not_change_what_is_sent(
    make_client: Callable[..., TestClient], smtp: ScriptedHandler
) -> None:
    client = make_client(worker_in_api=False)
    create(client)
    queued = client.post(
        "/notify/email",
        json={"email": "ivan@example.com", "template": "room_booked", "data": DATA},
        headers={"Prefer": "respond-async"},
    )
    assert queued.status_code == 202
    changed = {
        "variables": BOOKED["variables"],
        "content": {"ru": {"subject": "ИЗМЕНЕНО {{ room }}", "text": "ИЗМЕНЕНО {{ name }}"}},
    }
    added = client.post("/templates/room_booked/versions", json=changed)
    etag = client.get("/templates/room_booked").headers["ETag"]
    assert added.status_code == 201
    activated = client.post(
        f"/templates/room_booked/versions/{added.json()['number']}/activate",
        headers={"If-Match": etag},
    )
    assert activated.status_code == 200
    # Deleting it too: the queued notification holds its own snapshot.
    assert client.delete("/templates/room_booked").status_code == 204
    worker_client = make_client()
    settled = Settled(worker_client.app)
    assert settled.wait(1)
    [received] = smtp.received
    assert received.message["Subject"] == "Забронировано: Байкал"
    assert b"=D0=98=D0=97" not in received.raw  # "ИЗ", of ИЗМЕНЕНО, in quoted-printable
    history = client.get(f"/notifications/{queued.json()['id']}").json()
    assert history["status"] == "sent" and history["template_key"] == "room_booked"


def test_a_sensitive_template_erases_every_rendered_part_after_sending(
    client: TestClient, smtp: ScriptedHandler, db: sessionmaker[Session]
) -> None:
    create(
        client,
        {
            "key": "code",
            "sensitive": True,
            "variables": [{"name": "code", "example": "123456"}],
            "content": {
                "ru": {
                    "subject": "Ваш код",
                    "text": "Код: {{ code }}",
                    "html": "<b>Код: {{ code }}</b>",
                }
            },
        },
    )
    response = client.post(
        "/notify/email",
        json={"email": "ivan@example.com", "template": "code", "data": {"code": "482913"}},
    )
    assert response.status_code == 201
    assert "482913" not in response.text
    assert b"482913" in smtp.received[0].raw
    with db() as session:
        stored = session.scalars(select(Notification)).one()
        assert stored.sensitive and stored.text == "" and stored.content is None
        assert stored.text_hmac is not None


def test_a_bulk_of_1000_takes_per_recipient_data(
    make_client: Callable[..., TestClient], smtp: ScriptedHandler, db: sessionmaker[Session]
) -> None:
    client = make_client()
    create(client)
    emails = [
        {"email": f"member{i}@example.com", "data": {"name": f"Участник {i}", "seats": i}}
        for i in range(1000)
    ]
    shared = {"room": "Байкал", "start": "2026-11-25T10:00:00+03:00"}
    response = client.post(
        "/notify/bulk", json={"template": "room_booked", "data": shared, "emails": emails}
    )
    assert response.status_code == 202, response.text
    assert response.json()["batch"]["accepted"] == 1000
    with db() as session:
        rows = session.execute(select(Notification.recipient, Notification.text)).all()
    texts = dict(rows)
    assert "Участник 21" in texts["member21@example.com"]
    assert "21 место" in texts["member21@example.com"]
    assert "22 места" in texts["member22@example.com"]


def test_the_multipart_renderer_matches_the_email_package_byte_for_byte() -> None:
    renderer = MessageRenderer("Coworking <noreply@coworking.test>")
    date = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
    cases = [
        ("Привет\nFrom here", "<p>Привет</p>\n" + "<p>длинная строка</p>" * 20),
        ("a", "<b>x</b>"),
        ("x" * 200, "=\n.\n"),
    ]
    for boundary in (new_boundary(), "short", "b" * 40):
        for text, html in cases:
            args: dict[str, Any] = {
                "recipient": "ivan@example.com",
                "subject": "Бронирование",
                "text": text,
                "message_id": "<1@coworking.test>",
                "date": date,
                "html": html,
                "boundary": boundary,
            }
            fast = renderer.render(**args)
            assert fast == _flattened(build_message(sender=renderer.sender, **args))
    assert renderer.fallbacks == {}


def test_the_catalogue_installs_once_and_again_only_when_a_file_changed(
    db: sessionmaker[Session], tmp_path: Any
) -> None:
    catalogue = Catalogue(Renderer(brand=Settings(_env_file=None).brand()))
    with db() as session:
        installed = catalogue.install(session)
        assert len(installed) == 8 and all(i.endswith("v1") for i in installed)
        assert catalogue.install(session) == []
    # A copy with one file changed: a second version of that template only.
    copy = tmp_path / "templates"
    for folder in CATALOGUE_DIR.iterdir():
        (copy / folder.name).mkdir(parents=True)
        for path in folder.iterdir():
            (copy / folder.name / path.name).write_bytes(path.read_bytes())
    welcome = copy / "welcome" / "ru.sms"
    welcome.write_text(welcome.read_text() + " Ждём вас!")
    with db() as session:
        assert catalogue.install(session, copy) == ["welcome v2"]
        template = session.scalars(select(Template).where(Template.key == "welcome")).one()
        assert template.active_version == 2
        assert session.scalar(select(func.count()).select_from(TemplateVersion)) == 9


def test_every_shipped_template_renders_its_examples_in_both_locales() -> None:
    renderer = Renderer(brand=Settings(_env_file=None).brand())
    for folder in sorted(p for p in CATALOGUE_DIR.iterdir() if not p.name.startswith("_")):
        data, digest = read_folder(folder)
        assert set(data.content) == {"ru", "en"}, folder.name
        variables = [Variable(**v.model_dump()) for v in data.variables]
        checked = renderer.check({k: v.model_dump() for k, v in data.content.items()}, variables)
        examples = {v.name: v.example for v in variables}
        for locale in ("ru", "en"):
            rendered = renderer.render(checked.content, variables, examples, locale=locale)
            assert len(rendered) == 3, (folder.name, locale)
        assert len(digest) == len(hashlib.sha256().hexdigest())


@pytest.mark.parametrize(
    "reply", ["552 5.3.4 Message size exceeds fixed limit", "452 4.3.4 Message too big for system"]
)
def test_a_message_too_large_for_the_server_fails_at_once_without_retries(
    client: TestClient, smtp: ScriptedHandler, reply: str
) -> None:
    smtp.data_replies.append(reply)
    response = client.post(
        "/notify/email",
        json={"email": "ivan@example.com", "subject": "Большое письмо", "text": "вложения"},
    )
    assert response.status_code == 502
    body = response.json()
    assert (body["status"], body["attempts"]) == ("failed", 1)
    assert body["delivery_attempts"][0]["outcome"] == "permanent_error"
    assert body["delivery_attempts"][0]["code"] == int(reply[:3])


def test_a_452_for_storage_is_still_retried(client: TestClient, smtp: ScriptedHandler) -> None:
    smtp.data_replies.append("452 4.3.1 Insufficient system storage")
    response = client.post(
        "/notify/email", json={"email": "ivan@example.com", "subject": "s", "text": "t"}
    )
    assert response.status_code == 201
    assert [a["outcome"] for a in response.json()["delivery_attempts"]] == [
        "transient_error",
        "sent",
    ]


def test_a_telegram_html_template_escapes_its_data() -> None:
    renderer = Renderer(brand={}, layouts={})
    content = {"ru": {"telegram": "<b>{{ room }}</b>"}}
    rendered = renderer.render(
        content, [Variable("room")], {"room": "<script>"}, locale="ru", telegram_html=True
    )
    [telegram] = rendered.values()
    assert (telegram.text, telegram.parse_mode) == ("<b>&lt;script&gt;</b>", "HTML")
    plain = renderer.render(content, [Variable("room")], {"room": "<i>"}, locale="ru")
    assert next(iter(plain.values())).text == "<b><i></b>"


def test_a_version_with_html_only_gets_a_readable_text_twin() -> None:
    renderer = Renderer(brand={}, layouts={})
    content = {
        "ru": {
            "subject": "Бронь",
            "html": "<h1>Бронь</h1><p>Зал «{{ room }}»</p><p><a href='https://x.test/b'>Открыть</a></p>",
        }
    }
    [email] = renderer.render(content, [Variable("room")], {"room": "Байкал"}, locale="ru").values()
    assert email.text.splitlines()[0] == "Бронь"
    assert "Зал «Байкал»" in email.text and "https://x.test/b" in email.text
    assert "<" not in email.text


def test_plural_forms_are_cached_by_the_number_as_written() -> None:
    renderer = Renderer(brand={}, layouts={})
    content = {"ru": {"sms": "{{ n|plural('место', 'места', 'мест') }}"}}

    def sms(value: object) -> str:
        [rendered] = renderer.render(
            content, [Variable("n", type="number")], {"n": value}, locale="ru"
        ).values()
        return rendered.text

    # Equal as Decimals, not one plural category: CLDR counts the written fraction digits.
    assert [sms(4), sms("4.0"), sms(4), sms(21)] == ["4 места", "4 места", "4 места", "21 место"]
    assert [sms(5), sms(1.5), sms(11)] == ["5 мест", "1,5 места", "11 мест"]
    with pytest.raises(TemplateError, match="not a number a message shows"):
        sms("1e999999999")


def test_a_shipped_sensitive_template_keeps_its_code_out_of_every_stored_field(
    make_client: Callable[..., TestClient], smtp: ScriptedHandler, db: sessionmaker[Session]
) -> None:
    client = make_client(templates_install=True)
    response = client.post(
        "/notify/email",
        json={
            "email": "ivan@example.com",
            "template": "email_confirmation_code",
            "data": {"code": "482913", "minutes": 15},
        },
    )

    assert response.status_code == 201, response.text
    assert "482913" not in response.text
    assert b"482913" in smtp.received[0].raw
    with db() as session:
        stored = session.scalars(select(Notification)).one()
        columns = {c.key: getattr(stored, c.key) for c in Notification.__table__.columns}
    assert "482913" not in repr(columns)
    assert client.get(f"/notifications/{stored.id}").json()["subject"] is None


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"name": "Я" * 1000, "room": "Байкал", "seats": 1}, "template.subject"),
        ({"name": "\\ud800", "room": "Байкал", "seats": 1}, "data.name"),
    ],
)
def test_data_that_cannot_be_sent_is_a_422_naming_it(
    client: TestClient, db: sessionmaker[Session], data: dict[str, Any], field: str
) -> None:
    create(
        client,
        {
            "key": "hello",
            "variables": [
                {"name": "name", "example": "Иван"},
                {"name": "room", "example": "Байкал"},
                {"name": "seats", "type": "integer", "example": 1},
            ],
            "content": {"ru": {"subject": "{{ name }}: {{ room }}", "text": "{{ seats }}"}},
        },
    )
    body = json.dumps({"email": "ivan@example.com", "template": "hello", "data": data})

    response = client.post(
        "/notify/email",
        content=body.replace("\\\\ud800", "\\ud800"),
        headers={"Content-Type": "application/json"},
    )

    assert response.status_code == 422, response.text
    assert [e["loc"] for e in response.json()["detail"]] == [["body", *field.split(".")]]
    with db() as session:
        assert session.scalar(select(func.count()).select_from(Notification)) == 0


@pytest.mark.parametrize(("if_match", "status"), [(None, 428), ('W/"1"', 412), ("1", 412)])
def test_an_activation_needs_the_strong_etag(
    client: TestClient, if_match: str | None, status: int
) -> None:
    create(client)
    headers = {"If-Match": if_match} if if_match is not None else {}

    response = client.post("/templates/room_booked/versions/1/activate", headers=headers)

    assert response.status_code == status
    etag = client.get("/templates/room_booked").headers["ETag"]
    assert (
        client.post(
            "/templates/room_booked/versions/1/activate", headers={"If-Match": etag}
        ).status_code
        == 200
    )
