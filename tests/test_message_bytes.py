"""MessageRenderer: the very bytes smtplib sends for build_message, made without the email
package's header registry, and sent with sendmail."""

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from email import message_from_bytes, policy
from email.generator import BytesGenerator
from email.message import EmailMessage
from email.utils import getaddresses, make_msgid
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from hypothesis import given, settings
from hypothesis import strategies as st

from mailer import (
    MessageRenderer,
    OutgoingMessage,
    PermanentDeliveryError,
    SMTPMailer,
    build_message,
)
from tests.conftest import BOOKING
from tests.smtpd import ScriptedHandler, start_server

SENDER = "Coworking <noreply@coworking.test>"
RECIPIENT = "ivan.petrov@example.com"
MESSAGE_ID = "<176404530012.4242.12345678901234567890@coworking.test>"
DATE = datetime(2025, 11, 25, 9, 15, 30, tzinfo=UTC)

# (id, subject, parsed back as it was given: no encoded-word lookalikes or controls)
SUBJECTS = [
    ("booking", BOOKING["subject"], True),
    ("ascii", "Booking confirmed", True),
    (
        "ascii-moves-to-next-line",
        "Reminder: your booking of room Baikal starts at 10:00 today",
        True,
    ),
    (
        "ascii-folds",
        "Reminder: your booking of meeting room Baikal on 25 November starts at 10:00 "
        "sharp, please arrive a few minutes early so that the room can be handed over",
        True,
    ),
    ("cyrillic-folds", "Напоминание: " + "переговорная «Байкал» забронирована, " * 8, True),
    ("mixed", "Room «Байкал» is booked — see you at 10:00 (Moscow time)", True),
    ("specials", 'Re: "Quoted", colon: semi; <angle> [square] (round) back\\slash @ at...', True),
    ("specials-cyrillic", 'Бронь: "Байкал", 10:00–12:00; <корпус А> (этаж 3) = ок?', True),
    ("equals-and-question", "Is 2+2=4? Answer = yes ?= no", True),
    ("long-ascii-word", "x" * 120, True),
    ("long-cyrillic-word", "ж" * 120, True),
    ("long-url", "Ссылка: https://coworking.test/bookings/" + "a1b2c3d4" * 12 + "?confirm=1", True),
    ("empty", "", True),
    ("only-spaces", "   ", True),
    ("leading-trailing-spaces", "  Бронь подтверждена  ", True),
    ("tabs", "Бронь\tподтверждена\t10:00", True),
    ("no-break-spaces", "10\xa0000\xa0₽ за «Байкал»\xa0— оплачено", True),
    ("emoji", "Бронь подтверждена 🎉✅", True),
    ("many-emoji", "👍" * 40, True),
    ("cjk", "会议室已预订：贝加尔湖", True),
    ("998-characters", ("Переговорная «Байкал» " * 50)[:998], True),
    ("encoded-word-lookalike", "=?utf-8?q?not_an_encoded_word?=", False),
    ("encoded-word-marker", "Price =? see inside", False),
]
TEXTS = [
    ("booking", BOOKING["text"]),
    ("ascii", "Your room is booked.\n"),
    ("empty", ""),
    ("no-final-newline", "Без перевода строки в конце"),
    ("long-ascii-line", "word " * 60 + "\n"),
    ("long-cyrillic-line", "слово " * 60 + "\n"),
    ("trailing-spaces", "line with spaces   \nline with a tab\t\n \n\t\n"),
    ("from-lines", "From the desk:\nFrom 10:00 to 12:00\n From indented\nFromage\n"),
    ("dot-lines", ".\n..\n.hidden\nend.\n"),
    ("crlf", "one\r\ntwo\r\n\r\nthree"),
    ("cr", "one\rtwo\r\rthree\r"),
    ("mixed-line-ends", "a\r\nb\rc\nd\n\re"),
    ("tabs", "Время:\t10:00\tЗал:\t«Байкал»\n"),
    ("emoji", "Ждём вас! 🎉✅👍\n"),
    ("equals", "a=b==c=\n=\n" + "=" * 100 + "\n"),
    ("line-lengths", "".join("ж" * n + "\n" + "x" * n + " \n" for n in range(20, 30))),
    ("qp-boundaries", "".join("a" * n + "=ж \n" for n in range(70, 80))),
    ("long-text", "Длинный текст, который не кэшируется. " * 500),
]
RECIPIENTS = [
    ("plain", RECIPIENT, True),
    ("atext", "o'brien+tag_1!#$%&*/^`{|}~-x@sub.example.co.uk", True),
    ("upper-case", "IVAN@EXAMPLE.COM", True),
    ("74-characters", "a" * 62 + "@example.com", True),
    ("75-characters", "a" * 63 + "@example.com", False),
    ("quoted-local-part", '"ivan petrov"@example.com', False),
    ("equals-in-local-part", "a=b@example.com", False),
    ("non-ascii", "иван@пример.рф", False),
]
DATES = [
    ("utc", DATE, True),
    ("moscow", datetime(2025, 11, 25, 12, 15, 30, tzinfo=timezone(timedelta(hours=3))), True),
    (
        "india",
        datetime(2025, 11, 25, 14, 45, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        True,
    ),
    ("behind", datetime(2025, 1, 2, 3, 4, 5, 678, tzinfo=timezone(timedelta(hours=-9))), True),
    ("naive", datetime(2025, 11, 25, 9, 15, 30), True),
    (
        "offset-with-seconds",
        datetime(2025, 11, 25, 9, 15, tzinfo=timezone(timedelta(seconds=30))),
        False,
    ),
    ("long-ago", datetime(1850, 1, 1, tzinfo=UTC), False),
]
MESSAGE_IDS = [
    ("make-msgid", make_msgid(domain="coworking.test"), True),
    ("ours", MESSAGE_ID, True),
    ("long-domain", make_msgid(domain="mail." + "sub." * 15 + "coworking.test"), False),
    ("domain-literal", "<abc.def@[127.0.0.1]>", False),
]


def sent_by_smtplib(
    *,
    sender: str = SENDER,
    recipient: str,
    subject: str,
    text: str,
    message_id: str,
    date: datetime,
    **more: Any,
) -> OutgoingMessage:
    """The envelope and bytes `smtplib.SMTP.send_message(build_message(...))` hands to
    sendmail: its own steps, for a message without Sender, Cc, Bcc or Resent- fields."""
    message = build_message(
        sender=sender,
        recipient=recipient,
        subject=subject,
        text=text,
        message_id=message_id,
        date=date,
        **more,
    )
    from_addr = getaddresses([message["From"]])[0][1]
    to_addrs = tuple(address for _, address in getaddresses([message["To"]]))
    international = not "".join((from_addr, *to_addrs)).isascii()
    with io.BytesIO() as buffer:
        if international:
            # send_message's own: the message's policy, with utf8.
            generator = BytesGenerator(buffer, policy=message.policy.clone(utf8=True))  # type: ignore[call-arg]
        else:
            generator = BytesGenerator(buffer)
        generator.flatten(message, linesep="\r\n")
        return OutgoingMessage(from_addr, to_addrs, buffer.getvalue(), international)


def fields(**changes: Any) -> dict[str, Any]:
    return {
        "recipient": RECIPIENT,
        "subject": BOOKING["subject"],
        "text": BOOKING["text"],
        "message_id": MESSAGE_ID,
        "date": DATE,
    } | changes


def outcome(make: Callable[[], OutgoingMessage]) -> OutgoingMessage | tuple[type, str]:
    """What `make` returns, or the type and text of what it raises."""
    try:
        return make()
    except Exception as exc:  # the email package raises all sorts for odd values
        return type(exc), str(exc)


@pytest.fixture
def renderer() -> MessageRenderer:
    return MessageRenderer(SENDER)


@pytest.mark.parametrize(
    "subject", [case[1] for case in SUBJECTS], ids=[case[0] for case in SUBJECTS]
)
def test_subjects_render_as_smtplib_sends_them(renderer: MessageRenderer, subject: str) -> None:
    rendered = renderer.render(**fields(subject=subject))

    assert rendered == sent_by_smtplib(**fields(subject=subject))
    # The subject is folded by the email package (once, then cached): never a fallback.
    assert not renderer.fallbacks


@pytest.mark.parametrize("html", [None, "<p>Бронь <b>подтверждена</b></p>"], ids=["text", "html"])
def test_list_unsubscribe_goes_unfolded_and_unencoded_either_way(
    renderer: MessageRenderer, html: str | None
) -> None:
    url = "https://notify.coworking.test/unsubscribe/" + "WyJlbWFpbCIsImEiXQ" * 8
    headers = (
        ("List-Unsubscribe", f"<{url}>"),
        ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
    )
    extra = {"headers": headers, "html": html, "boundary": "==============1234567890=="}

    rendered = renderer.render(**fields(**extra))

    assert rendered == sent_by_smtplib(**fields(**extra))
    assert f"\r\nList-Unsubscribe: <{url}>\r\n".encode() in rendered.data
    assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n" in rendered.data
    assert not renderer.fallbacks


@pytest.mark.parametrize("text", [case[1] for case in TEXTS], ids=[case[0] for case in TEXTS])
def test_texts_render_as_smtplib_sends_them(renderer: MessageRenderer, text: str) -> None:
    rendered = renderer.render(**fields(text=text))

    assert rendered == sent_by_smtplib(**fields(text=text))
    assert not renderer.fallbacks


@pytest.mark.parametrize(
    ("recipient", "fast"), [case[1:] for case in RECIPIENTS], ids=[case[0] for case in RECIPIENTS]
)
def test_recipients_render_as_smtplib_sends_them(
    renderer: MessageRenderer, recipient: str, fast: bool
) -> None:
    rendered = renderer.render(**fields(recipient=recipient))

    assert rendered == sent_by_smtplib(**fields(recipient=recipient))
    assert rendered.smtputf8 is (not recipient.isascii())
    assert dict(renderer.fallbacks) == ({} if fast else {"message": 1})


@pytest.mark.parametrize(
    ("date", "fast"), [case[1:] for case in DATES], ids=[case[0] for case in DATES]
)
def test_dates_render_as_smtplib_sends_them(
    renderer: MessageRenderer, date: datetime, fast: bool
) -> None:
    rendered = renderer.render(**fields(date=date))

    assert rendered == sent_by_smtplib(**fields(date=date))
    assert dict(renderer.fallbacks) == ({} if fast else {"date": 1})


@pytest.mark.parametrize(
    ("message_id", "fast"),
    [case[1:] for case in MESSAGE_IDS],
    ids=[case[0] for case in MESSAGE_IDS],
)
def test_message_ids_render_as_smtplib_sends_them(
    renderer: MessageRenderer, message_id: str, fast: bool
) -> None:
    rendered = renderer.render(**fields(message_id=message_id))

    assert rendered == sent_by_smtplib(**fields(message_id=message_id))
    assert dict(renderer.fallbacks) == ({} if fast else {"message-id": 1})


@pytest.mark.parametrize(
    "sender",
    [
        "noreply@coworking.test",
        "Coworking <noreply@coworking.test>",
        "Коворкинг «Байкал» <noreply@coworking.test>",
        '"Coworking, Moscow" <noreply@coworking.test>',
        "Коворкинг <почта@коворкинг.рф>",
    ],
)
def test_senders_render_as_smtplib_sends_them(sender: str) -> None:
    renderer = MessageRenderer(sender)

    rendered = renderer.render(**fields())

    assert rendered == sent_by_smtplib(sender=sender, **fields())
    address = getaddresses([sender])[0][1]
    assert rendered.sender == address
    # A non-ASCII address needs SMTPUTF8 on every message: left to the email package.
    assert rendered.smtputf8 is (not address.isascii())
    assert dict(renderer.fallbacks) == ({} if address.isascii() else {"message": 1})


@pytest.mark.parametrize(
    ("changes", "refused"),
    [
        ({"subject": "two\nlines"}, True),
        ({"subject": "carriage\rreturn"}, True),
        ({"subject": "trailing line feed\n"}, False),
        ({"subject": "form\x0cfeed"}, True),
        ({"subject": "control \x01 character"}, False),
        ({"subject": "lone surrogate \udc80"}, False),
        ({"recipient": "a@example.com\nBcc: b@example.com"}, True),
        ({"recipient": "a@example.com, b@example.com"}, False),
        ({"text": "lone surrogate \udc80"}, True),
    ],
)
def test_odd_values_end_as_with_the_email_package(
    renderer: MessageRenderer, changes: dict[str, str], refused: bool
) -> None:
    expected = outcome(lambda: sent_by_smtplib(**fields(**changes)))

    assert outcome(lambda: renderer.render(**fields(**changes))) == expected
    assert isinstance(expected, tuple) is refused


SAMPLE = (
    "абвгдеёжзийклмнопрстуфхцчшщъыьэюяАБВЖЯ"
    "abcxyzABCXYZ0123456789"
    " \t\xa0\u3000"
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
    "«»—–№₽€"
    "🎉👍✅"
    "\r\n"
)
FRAGMENTS = ["From ", ".", "=?", "?=", "=\n", " \n", "\t\n", "\r\n", "x" * 80, "ж" * 40, "  "]
random_strings = st.lists(
    st.sampled_from(FRAGMENTS) | st.text(alphabet=SAMPLE, max_size=12), max_size=30
).map("".join)
# One for all examples, so they also go through its caches.
RENDERER = MessageRenderer(SENDER)


@settings(max_examples=400, derandomize=True, database=None, deadline=None)
@given(subject=random_strings, text=random_strings)
def test_random_subjects_and_texts_render_as_smtplib_sends_them(subject: str, text: str) -> None:
    rendered = outcome(lambda: RENDERER.render(**fields(subject=subject, text=text)))

    assert rendered == outcome(lambda: sent_by_smtplib(**fields(subject=subject, text=text)))


@settings(max_examples=200, derandomize=True, database=None, deadline=None)
@given(
    local_part=st.text(alphabet="abcXYZ019.!#$%&'*+/=?^_`{|}~-\"@ ", min_size=1, max_size=20),
    domain=st.text(alphabet="abc019.-[]", min_size=1, max_size=12),
)
def test_random_addresses_render_as_smtplib_sends_them(local_part: str, domain: str) -> None:
    recipient = f"{local_part}@{domain}"

    rendered = outcome(lambda: RENDERER.render(**fields(recipient=recipient)))

    assert rendered == outcome(lambda: sent_by_smtplib(**fields(recipient=recipient)))


# Subjects the email package itself does not give back as they were: what it folds to
# next line keeps its leading space, a space between an encoded word and "<" is lost, and
# a long run of encoded words gains a space. The rendered bytes are the same as its own.
CHANGED_BY_A_ROUND_TRIP = {"specials", "specials-cyrillic", "998-characters"}


def round_trips() -> Iterator[Any]:
    for name, subject, fast in SUBJECTS:
        if fast:
            yield pytest.param(fields(subject=subject), name, id=f"subject-{name}")
    for name, text in TEXTS:
        yield pytest.param(fields(text=text), None, id=f"text-{name}")


@pytest.mark.parametrize(("case", "subject_case"), list(round_trips()))
def test_rendered_messages_parse_back_to_their_fields(
    renderer: MessageRenderer, case: dict[str, Any], subject_case: str | None
) -> None:
    parsed = message_from_bytes(renderer.render(**case).data, policy=policy.default)
    reference = message_from_bytes(sent_by_smtplib(**case).data, policy=policy.default)
    assert isinstance(parsed, EmailMessage) and isinstance(reference, EmailMessage)

    for name in ("Subject", "From", "To", "Message-ID", "Date"):
        assert parsed[name] == reference[name], name
    assert parsed.get_content() == reference.get_content()
    if subject_case not in CHANGED_BY_A_ROUND_TRIP and case["subject"] == case["subject"].strip():
        # Unfolding keeps all but leading and trailing whitespace.
        assert parsed["Subject"] == case["subject"]
    assert parsed["From"] == SENDER
    assert parsed["To"] == case["recipient"]
    assert parsed["Message-ID"] == case["message_id"]
    assert parsed["Date"].datetime == case["date"]
    # set_content keeps the lines, each ending in a line break (CRLF on the wire), and the
    # generator smtplib uses writes a line starting "From " as ">From ".
    lines = [">" + line if line.startswith("From ") else line for line in case["text"].splitlines()]
    expected = "".join(f"{line}\n" for line in lines) or "\n"
    assert parsed.get_content().replace("\r\n", "\n") == expected


@dataclass
class OptionsHandler(ScriptedHandler):
    """Also records the MAIL FROM options of every message."""

    smtputf8: bool = False  # whether the server offers SMTPUTF8
    mail_options: list[list[str]] = field(default_factory=list)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.mail_options.append(list(envelope.mail_options))
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture(params=[False, True], ids=["plain-server", "smtputf8-server"])
def server(request: pytest.FixtureRequest) -> Iterator[OptionsHandler]:
    handler = OptionsHandler(smtputf8=request.param)
    start_server(handler, smtputf8=handler.smtputf8)
    yield handler
    handler.stop()


@pytest.fixture
def mailer(server: OptionsHandler) -> Iterator[SMTPMailer]:
    mailer = SMTPMailer(host="127.0.0.1", port=server.port)
    yield mailer
    mailer.close()


def test_the_server_receives_the_same_message_either_way(
    renderer: MessageRenderer, server: OptionsHandler, mailer: SMTPMailer
) -> None:
    cases = [fields(subject=subject) for _, subject, _ in SUBJECTS[:8]]
    cases += [fields(text=text) for _, text in TEXTS if "From " in text or text.startswith(".")]
    for case in cases:
        mailer.send(build_message(sender=SENDER, **case))
        mailer.send(renderer.render(**case))

    assert len(server.received) == 2 * len(cases)
    for n, case in enumerate(cases):
        by_email_package, rendered = server.received[2 * n : 2 * n + 2]
        assert rendered.raw == by_email_package.raw
        assert rendered.raw == renderer.render(**case).data
        assert rendered.mail_from == by_email_package.mail_from == "noreply@coworking.test"
        assert rendered.rcpt_tos == by_email_package.rcpt_tos == [RECIPIENT]
        assert server.mail_options[2 * n] == server.mail_options[2 * n + 1]
    assert not any("SMTPUTF8" in options for options in server.mail_options)
    assert len({received.peer for received in server.received}) == 1


def test_a_non_ascii_address_goes_with_smtputf8_or_is_refused_either_way(
    renderer: MessageRenderer, server: OptionsHandler, mailer: SMTPMailer
) -> None:
    case = fields(recipient="иван@пример.рф")
    message, rendered = build_message(sender=SENDER, **case), renderer.render(**case)
    errors = []
    for outgoing in (message, rendered):
        try:
            mailer.send(outgoing)
        except PermanentDeliveryError as exc:
            errors.append(str(exc))
    mailer.send(renderer.render(**fields()))  # the connection is still good

    if server.smtputf8:
        assert not errors
        by_email_package, by_renderer, _ = server.received
        assert by_renderer.raw == by_email_package.raw == rendered.data
        assert by_renderer.rcpt_tos == by_email_package.rcpt_tos == ["иван@пример.рф"]
        assert server.mail_options[1] == server.mail_options[0]
        assert {"SMTPUTF8", "BODY=8BITMIME"} <= set(server.mail_options[0])
    else:
        assert len(errors) == 2 and errors[0] == errors[1]
        assert "SMTPUTF8" in errors[0]
        assert len(server.received) == 1
    assert len({received.peer for received in server.received}) == 1
