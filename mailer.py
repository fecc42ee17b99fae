"""The e-mail channel: `EmailChannel` composes each message (`MessageRenderer`, RFC 5322
and 2047) and hands it to an SMTP server (`SMTPMailer`, the transport); the two stay
apart, so another transport (an HTTP provider) can take the composed bytes.

Everything smtplib, socket and ssl raise is converted here into the errors of
`channels.base`: 4xx replies are transient (421, and refused, reset or timed-out
connections, are `ConnectionLostError`); 5xx replies, failed authentication and an
untrusted TLS certificate are permanent.

Connections are pooled: at most `pool_size` are open at once, and an idle one is reused
for the next message (checked with NOOP when it has been idle a while). A reused
connection that turns out to be broken is replaced and the message sent once more on a
fresh one before the failure counts.

`build_message` makes an `EmailMessage`; `MessageRenderer` goes straight to the bytes that
`smtplib.SMTP.send_message` would send for it (an `OutgoingMessage`), without the email
package's header registry, and falls back to the email package wherever its shortcut
could differ. `SMTPMailer.send` takes either.
"""

import io
import logging
import re
import secrets
import smtplib
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from email import policy, quoprimime
from email.generator import BytesGenerator
from email.message import EmailMessage
from email.utils import format_datetime, getaddresses, make_msgid, parseaddr
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from channels.base import (
    ConnectionLostError,
    DeliveryError,
    File,
    Message,
    PermanentDeliveryError,
    Receipt,
    RecipientUnreachable,
    Scrubber,
    TransientDeliveryError,
)
from config import Settings, SMTPSecurity
from headers import fold_unstructured
from models import SuppressionReason, utcnow

if TYPE_CHECKING:
    # dkimpy and cryptography are 9 MB of memory: loaded only where DKIM is configured.
    from signing import DkimSigner

logger = logging.getLogger(__name__)


def new_message_id(sender: str) -> str:
    """A globally unique Message-ID in the sender's domain."""
    _, address = parseaddr(sender)
    return make_msgid(domain=address.rpartition("@")[2] or None)


def new_message_ids(sender: str, count: int) -> list[str]:
    """`count` globally unique Message-IDs in the sender's domain: one unique one, each
    with its own number (a bulk of 10,000 would spend a fifth of its time on make_msgid)."""
    local, _, domain = new_message_id(sender).removeprefix("<").removesuffix(">").rpartition("@")
    return [f"<{local}.{n}@{domain}>" for n in range(1, count + 1)]


def build_message(
    *,
    sender: str,
    recipient: str,
    subject: str,
    text: str,
    message_id: str,
    date: datetime,
    html: str | None = None,
    boundary: str | None = None,
    attachments: Sequence[File] = (),
    headers: Sequence[tuple[str, str]] = (),
) -> EmailMessage:
    """An RFC 5322 message, with the extra `headers` (ASCII, one line each, written as
    given) after its Message-ID;
    non-ASCII headers become RFC 2047 encoded words. With `html`,
    multipart/alternative: the text part first, then the HTML (RFC 2046 section 5.1.4:
    the last part is the richest), under `boundary` if given. With `attachments`,
    multipart/mixed: that body first, then each file in base64, its name RFC 2231 encoded
    when it is not ASCII (Cyrillic names arrive intact)."""
    message = EmailMessage(policy=_BUILD_POLICY)
    message["From"] = sender
    message["To"] = recipient
    folded = fold_unstructured("Subject", subject)
    if folded is None:
        message["Subject"] = subject
    else:
        # Folded already: the email package writes it as it is, never decoding it.
        message.set_raw("Subject", folded)
    message["Date"] = format_datetime(date)
    message["Message-ID"] = message_id
    for name, value in headers:
        # Written as given: a long URL folded by the email package would become RFC 2047
        # encoded words, which no mail client reads as a List-Unsubscribe URL.
        message.set_raw(name, value)
    # Quoted-printable keeps the body 7-bit: smtplib never asks for 8BITMIME.
    message.set_content(text, charset="utf-8", cte="quoted-printable")
    if html is not None:
        message.add_alternative(html, subtype="html", charset="utf-8", cte="quoted-printable")
        if boundary is not None:
            message.set_boundary(boundary)
    for file in attachments:
        maintype, _, subtype = file.content_type.partition("/")
        message.add_attachment(
            file.data, maintype=maintype, subtype=subtype, filename=file.filename
        )
    return message


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """A message as it goes on the wire, with its SMTP envelope."""

    sender: str  # MAIL FROM
    recipients: tuple[str, ...]  # RCPT TO
    data: bytes  # DATA, lines ending in CRLF, before dot-stuffing
    smtputf8: bool  # an address is not ASCII: the server must offer SMTPUTF8


class MessageRenderer:
    """Renders the messages of one sender to the `OutgoingMessage` that
    `smtplib.SMTP.send_message(build_message(...))` would send, byte for byte.

    What never changes (the From line, the envelope sender, the content headers) is made
    once; each subject is folded into RFC 2047 encoded words by the email package once and
    cached, and so is the quoted-printable body of a repeated text (never a sensitive one:
    it is not kept in memory); the rest is written directly. A message with an address,
    date or Message-ID outside what the shortcut covers is made by the email package
    instead, that header or the whole message; `fallbacks` counts those uses (roughly:
    threads update it unlocked).
    """

    def __init__(self, sender: str, *, subject_cache_size: int = 1024) -> None:
        self.sender = sender
        self.fallbacks: Counter[str] = Counter()
        _, header = _WIRE_POLICY.header_store_parse("From", sender)
        self._from_line = _WIRE_POLICY.fold_binary("From", header)
        # Taken from the parsed header, as send_message does.
        self._mail_from = getaddresses([header])[0][1]
        self._subject_line = lru_cache(maxsize=subject_cache_size)(self._fold_subject)
        # Bulk sends repeat one text; a few entries cover them.
        self._body = lru_cache(maxsize=_BODY_CACHE_SIZE)(_body_bytes)
        # A non-ASCII sender makes every message an SMTPUTF8 one, left to the email package.
        self._fast = self._mail_from.isascii()

    def __repr__(self) -> str:
        return f"MessageRenderer(sender={self.sender!r})"

    def render(
        self,
        *,
        recipient: str,
        subject: str,
        text: str,
        message_id: str,
        date: datetime,
        sensitive: bool = False,
        html: str | None = None,
        boundary: str | None = None,
        attachments: Sequence[File] = (),
        headers: Sequence[tuple[str, str]] = (),
    ) -> OutgoingMessage:
        """The message `build_message` makes of these, as `smtplib` would send it (an HTML
        one under `boundary`, by default a new random one). One with attachments is made
        by the email package: base64 of the files costs more than its headers."""
        if html is not None and boundary is None:
            boundary = new_boundary()
        if self._fast and not attachments:
            outgoing = self._render_fast(
                recipient=recipient,
                subject=subject,
                text=text,
                message_id=message_id,
                date=date,
                cache_body=not sensitive,
                html=html,
                boundary=boundary,
                headers=headers,
            )
            if outgoing is not None:
                return outgoing
        if not attachments:
            self.fallbacks["message"] += 1
        message = build_message(
            sender=self.sender,
            recipient=recipient,
            subject=subject,
            text=text,
            message_id=message_id,
            date=date,
            html=html,
            boundary=boundary,
            attachments=attachments,
            headers=headers,
        )
        return _flattened(message)

    def _render_fast(
        self,
        *,
        recipient: str,
        subject: str,
        text: str,
        message_id: str,
        date: datetime,
        cache_body: bool = True,
        html: str | None = None,
        boundary: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> OutgoingMessage | None:
        if len(recipient) > _MAX_PLAIN_ADDRESS or not _PLAIN_ADDRESS.fullmatch(recipient):
            return None
        if cache_body and len(text) <= _CACHED_TEXT_LENGTH:
            body = self._body(text)
        else:
            body = _body_bytes(text)
        if html is not None:
            assert boundary is not None
            if not _PLAIN_BOUNDARY.fullmatch(boundary):
                return None
            body = _alternative(boundary.encode("ascii"), body, _body_bytes(html))
        data = b"".join(
            (
                self._from_line,
                b"To: " + recipient.encode("ascii") + b"\r\n",
                self._subject_line(subject),
                self._date_line(date),
                self._message_id_line(message_id),
                *(f"{name}: {value}\r\n".encode("ascii") for name, value in headers),
                _CONTENT_HEADERS if html is None else b"",
                body,
            )
        )
        return OutgoingMessage(self._mail_from, (recipient,), data, smtputf8=False)

    @staticmethod
    def _fold_subject(subject: str) -> bytes:
        # Ours when the subject could be read as encoded words (see headers.py), else the
        # email package's folding and encoded words; once per subject.
        folded = fold_unstructured("Subject", subject)
        if folded is None:
            return _header_line("Subject", subject)
        return b"Subject: " + folded.encode("ascii") + b"\r\n"

    def _date_line(self, date: datetime) -> bytes:
        value = format_datetime(date)
        offset = date.utcoffset()
        # The Date header parses the value and formats it again: the same text, unless the
        # offset has seconds or the year is one the parser reads as another.
        if date.year >= 1900 and (
            date.tzinfo is None or (offset is not None and not offset % timedelta(minutes=1))
        ):
            return b"Date: " + value.encode("ascii") + b"\r\n"
        self.fallbacks["date"] += 1
        return _header_line("Date", value)

    def _message_id_line(self, message_id: str) -> bytes:
        if len(message_id) <= _MAX_PLAIN_MESSAGE_ID and _PLAIN_MESSAGE_ID.fullmatch(message_id):
            return b"Message-ID: " + message_id.encode("ascii") + b"\r\n"
        self.fallbacks["message-id"] += 1
        return _header_line("Message-ID", message_id)


def new_boundary() -> str:
    """A MIME boundary as the email package makes one: "=" cannot start a line of a
    quoted-printable body, so no part can contain it."""
    return f"==============={secrets.randbelow(10**19):019d}=="


def _alternative(boundary: bytes, text: bytes, html: bytes) -> bytes:
    """The headers and body `build_message` gives a message with both parts, as the
    generator writes them (the HTML part carries its own MIME-Version, as add_alternative
    leaves it)."""
    delimiter = b"--" + boundary
    content_type = b'Content-Type: multipart/alternative; boundary="' + boundary + b'"'
    if len(content_type) > _MAX_LINE:
        # Folded where the generator folds it: before the parameter.
        content_type = content_type.replace(b"; ", b";\r\n ", 1)
    return b"".join(
        (
            b"MIME-Version: 1.0\r\n",
            content_type,
            b"\r\n\r\n",
            delimiter,
            b'\r\nContent-Type: text/plain; charset="utf-8"\r\n'
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n",
            text,
            b"\r\n",
            delimiter,
            b'\r\nContent-Type: text/html; charset="utf-8"\r\n'
            b"Content-Transfer-Encoding: quoted-printable\r\nMIME-Version: 1.0\r\n\r\n",
            html,
            b"\r\n",
            delimiter,
            b"--\r\n",
        )
    )


def _flattened(message: EmailMessage) -> OutgoingMessage:
    """What `smtplib.SMTP.send_message` sends for `message`, one of `build_message`'s (no
    Sender, Cc, Bcc or Resent- fields)."""
    sender = getaddresses([message["From"]])[0][1]
    recipients = tuple(address for _, address in getaddresses([message["To"]]))
    smtputf8 = not "".join((sender, *recipients)).isascii()
    with io.BytesIO() as buffer:
        if smtputf8:
            # The message's policy (email.policy.default) with utf8=True; CRLF comes below.
            generator = BytesGenerator(buffer, policy=_SMTPUTF8_POLICY)
        else:
            # No policy of its own: the message's, and From_ lines in the body mangled.
            generator = BytesGenerator(buffer)
        generator.flatten(message, linesep="\r\n")
        return OutgoingMessage(sender, recipients, buffer.getvalue(), smtputf8)


def _header_line(name: str, value: str) -> bytes:
    """`name: value` folded by the email package, as the generator writes it."""
    _, header = _WIRE_POLICY.header_store_parse(name, value)
    return _WIRE_POLICY.fold_binary(name, header)


# EmailMessage's policy with the line ends send_message asks for.
_WIRE_POLICY = policy.SMTP
# The messages build_message makes: headers it sets raw are written as they are, however
# long (up to RFC 5322's 998), never refolded into encoded words.
_BUILD_POLICY = policy.default.clone(refold_source="none")
_SMTPUTF8_POLICY = policy.SMTPUTF8.clone(refold_source="none")
_MAX_LINE = 78  # _WIRE_POLICY.max_line_length
_CONTENT_HEADERS = (
    b'Content-Type: text/plain; charset="utf-8"\r\n'
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"MIME-Version: 1.0\r\n"
    b"\r\n"
)
# Dot-atoms without "=" or "?", so the header parser never sees an encoded word in them.
_ATOM = r"[A-Za-z0-9!#$%&'*+/^_`{|}~-]+"
_DOT_ATOM = rf"{_ATOM}(?:\.{_ATOM})*"
_PLAIN_ADDRESS = re.compile(rf"{_DOT_ATOM}@{_DOT_ATOM}")
_PLAIN_MESSAGE_ID = re.compile(rf"<{_DOT_ATOM}@{_DOT_ATOM}>")
# Longer values would be folded.
# A boundary the Content-Type line holds unfolded, quoted as the email package quotes it.
_PLAIN_BOUNDARY = re.compile(r"[A-Za-z0-9'()+_,./:=?-]{1,40}")
_MAX_PLAIN_ADDRESS = _MAX_LINE - len("To: ")
_MAX_PLAIN_MESSAGE_ID = _MAX_LINE - len("Message-ID: ")
_BODY_CACHE_SIZE = 32
_CACHED_TEXT_LENGTH = 16_384
_FROM_LINE = re.compile(r"^From ", re.MULTILINE)


def _body_bytes(text: str) -> bytes:
    """The body `set_content(text, charset="utf-8", cte="quoted-printable")` makes, as
    send_message's generator writes it."""
    lines = text.encode("utf-8").splitlines()
    payload = quoprimime.body_encode(b"\n".join(lines).decode("latin-1") + "\n", _MAX_LINE)
    # The generator smtplib makes has no policy of its own, so it mangles From_ lines.
    payload = _FROM_LINE.sub(">From ", payload)
    return payload.replace("\n", "\r\n").encode("ascii")


_TOO_BIG = re.compile(r"4\.3\.4\b")
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})\b")
# RFC 3463 5.1.Y of the recipient: no such mailbox (1), no such system (2), a bad address
# (3), moved (6), a domain without mail (10). 5.1.0, 5.1.7 and 5.1.8 may be about us.
_BAD_MAILBOX = {"1", "2", "3", "6", "10"}
# Without an enhanced code, a RCPT refused as RFC 5321 refuses an unknown mailbox.
_NO_MAILBOX = {550, 551, 553}
_NO_MAILBOX_TEXT = re.compile(r"unknown|no such|does not exist|not found|invalid", re.I)


def classify_reply(code: int, text: bytes | str, *, recipient: bool = False) -> DeliveryError:
    """Our error for an SMTP reply: 4xx may pass, 5xx will not (552, the message is too
    large, among them), and neither will a 452 4.3.4 (too big for the system). A reply to
    RCPT (`recipient`) refusing the mailbox (5.1.1 user unknown, 5.1.2, 5.1.3, 5.1.6,
    5.1.10; or 550/551/553 saying so, with no enhanced code) is a hard bounce: the address
    is suppressed. Nothing said to MAIL FROM or DATA is (a relay refusing our sender would
    suppress everyone), nor a 552 (mailbox full) or a 550 5.7.1 (policy)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    enhanced = _ENHANCED.match(text)
    if recipient and 500 <= code < 600:
        if (
            (enhanced is not None and enhanced[1] == "5" and enhanced[2] == "1")
            and (enhanced[3] in _BAD_MAILBOX)
            or (enhanced is None and code in _NO_MAILBOX and _NO_MAILBOX_TEXT.search(text))
        ):
            return RecipientUnreachable(text, code=code, reason=SuppressionReason.HARD_BOUNCE)
    error_type: type[DeliveryError]
    if code == 421:  # "closing transmission channel"
        error_type = ConnectionLostError
    elif code == 452 and _TOO_BIG.match(text):
        # RFC 3463 4.3.4 "message too big for system": this message will never fit,
        # whenever it is tried again; the server's other 452s (storage) may pass.
        error_type = PermanentDeliveryError
    elif 400 <= code < 500:
        error_type = TransientDeliveryError
    else:
        error_type = PermanentDeliveryError
    return error_type(text, code=code)


@dataclass
class _Idle:
    smtp: smtplib.SMTP
    since: float  # time.monotonic() when it was given back


class SMTPMailer:
    """Sends messages over pooled SMTP connections: plain, STARTTLS or implicit TLS."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        security: SMTPSecurity = SMTPSecurity.NONE,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        pool_size: int = 1,
        max_idle: float = 30.0,
        check_idle_after: float = 1.0,
        pool_timeout: float | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.security = security
        self.username = username
        self._password = password
        self._scrub = Scrubber([password] if password else [])
        self.timeout = timeout
        self.ssl_context = ssl_context or ssl.create_default_context()
        self.pool_size = pool_size
        # An idle connection older than this is closed rather than reused; 0: never reuse.
        self.max_idle = max_idle
        self.check_idle_after = check_idle_after
        # How long a send waits for a free connection; the SMTP timeout unless given.
        self.pool_timeout = timeout if pool_timeout is None else pool_timeout
        self._slots = threading.BoundedSemaphore(pool_size)
        # Sends waiting now for a free connection (a gauge for operators and tests).
        self.waiting = 0
        self._idle: list[_Idle] = []
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings) -> "SMTPMailer":
        password = settings.smtp_password.get_secret_value() if settings.smtp_password else None
        return cls(
            host=settings.smtp_host,
            port=settings.smtp_port,
            security=settings.smtp_security,
            username=settings.smtp_user or None,
            password=password,
            timeout=settings.smtp_timeout,
            ssl_context=make_ssl_context(
                verify=settings.smtp_verify_tls, ca_file=settings.smtp_ca_file
            ),
            pool_size=settings.smtp_pool_size,
            max_idle=settings.smtp_max_idle,
        )

    def __repr__(self) -> str:
        return f"SMTPMailer(host={self.host!r}, port={self.port}, security={self.security.value!r})"

    def send(self, message: EmailMessage | OutgoingMessage) -> None:
        """Hand `message` to the server, or raise a `DeliveryError`."""
        with self._lock:
            self.waiting += 1
        try:
            acquired = self._slots.acquire(timeout=self.pool_timeout)
        finally:
            with self._lock:
                self.waiting -= 1
        if not acquired:
            raise TransientDeliveryError(
                f"all {self.pool_size} SMTP connections stayed busy for {self.pool_timeout:g} s"
            )
        try:
            self._send(message)
        except DeliveryError as exc:
            # A server's reply may echo what it was sent, the AUTH exchange included.
            clean = self._scrub.error(exc)
            if clean is exc:
                raise
            raise clean from None
        finally:
            self._slots.release()

    def close(self) -> None:
        """Say QUIT on every idle connection; connections in use close when given back."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection in idle:
            _hang_up(connection.smtp)

    def _send(self, message: EmailMessage | OutgoingMessage) -> None:
        smtp = self._reuse()
        if smtp is not None:
            try:
                self._transfer(smtp, message)
                return
            except ConnectionLostError as exc:
                # Dropped while idle, or closing now: not the message's fault.
                logger.info("reused SMTP connection failed (%s); trying a fresh one", exc)
        self._transfer(self._open(), message)

    def _transfer(self, smtp: smtplib.SMTP, message: EmailMessage | OutgoingMessage) -> None:
        try:
            with _converted():
                if isinstance(message, OutgoingMessage):
                    _send_outgoing(smtp, message)
                else:
                    smtp.send_message(message)
        except ConnectionLostError:
            smtp.close()
            raise
        except DeliveryError:
            # A refusal of this message; smtplib has reset the session for the next one.
            self._give_back(smtp)
            raise
        except BaseException:
            smtp.close()  # in an unknown state: never reused
            raise
        self._give_back(smtp)

    def _open(self) -> smtplib.SMTP:
        smtp: smtplib.SMTP | None = None
        try:
            with _converted():
                if self.security is SMTPSecurity.SSL:
                    smtp = smtplib.SMTP_SSL(
                        self.host, self.port, timeout=self.timeout, context=self.ssl_context
                    )
                else:
                    smtp = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
                if self.security is SMTPSecurity.STARTTLS:
                    smtp.starttls(context=self.ssl_context)
                if self.username:
                    smtp.login(self.username, self._password or "")
        except BaseException:
            if smtp is not None:
                smtp.close()
            raise
        assert smtp is not None
        return smtp

    def _reuse(self) -> smtplib.SMTP | None:
        """The most recently used idle connection that is still good, if any."""
        while True:
            with self._lock:
                if not self._idle:
                    return None
                idle = self._idle.pop()
            age = time.monotonic() - idle.since
            if age > self.max_idle:
                _hang_up(idle.smtp)
                continue
            if age < self.check_idle_after or _answers_noop(idle.smtp):
                return idle.smtp
            idle.smtp.close()

    def _give_back(self, smtp: smtplib.SMTP) -> None:
        with self._lock:
            if not self._closed and self.max_idle > 0:
                self._idle.append(_Idle(smtp, time.monotonic()))
                return
        _hang_up(smtp)


def _send_outgoing(smtp: smtplib.SMTP, message: OutgoingMessage) -> None:
    """`sendmail` with the options `send_message` would have used for this message."""
    mail_options: tuple[str, ...] = ()
    if message.smtputf8:
        smtp.ehlo_or_helo_if_needed()
        if not smtp.has_extn("smtputf8"):
            # send_message's own refusal, before MAIL FROM.
            raise smtplib.SMTPNotSupportedError(
                "One or more source or delivery addresses require"
                " internationalized email support, but the server"
                " does not advertise the required SMTPUTF8 capability"
            )
        mail_options = ("SMTPUTF8", "BODY=8BITMIME")
    smtp.sendmail(message.sender, list(message.recipients), message.data, mail_options)


@contextmanager
def _converted() -> Iterator[None]:
    """Turn what smtplib, ssl and socket raise into our `DeliveryError`s."""
    try:
        yield
    except smtplib.SMTPRecipientsRefused as exc:
        # One recipient per message, so one reply.
        code, text = next(iter(exc.recipients.values()))
        raise classify_reply(code, text, recipient=True) from exc
    except smtplib.SMTPResponseException as exc:
        raise classify_reply(exc.smtp_code, exc.smtp_error) from exc
    except smtplib.SMTPServerDisconnected as exc:
        raise ConnectionLostError(f"server disconnected: {exc}") from exc
    except smtplib.SMTPException as exc:
        # Missing STARTTLS/AUTH/SMTPUTF8 support: a configuration mismatch.
        raise PermanentDeliveryError(str(exc)) from exc
    except ssl.SSLCertVerificationError as exc:
        raise PermanentDeliveryError(f"TLS certificate not trusted: {exc.verify_message}") from exc
    except OSError as exc:
        # Refused, reset, timed out, TLS handshake cut short, name not resolved.
        raise ConnectionLostError(f"{type(exc).__name__}: {exc}") from exc


def _answers_noop(smtp: smtplib.SMTP) -> bool:
    try:
        code, _ = smtp.noop()
    except (smtplib.SMTPException, OSError):
        return False
    return code == 250


def _hang_up(smtp: smtplib.SMTP) -> None:
    # Whatever QUIT gets back changes nothing about messages already accepted.
    try:
        smtp.quit()
    except (smtplib.SMTPException, OSError):
        smtp.close()


def make_ssl_context(*, verify: bool, ca_file: Path | None = None) -> ssl.SSLContext:
    """A client TLS context; verification is on unless explicitly turned off."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


# The reply smtplib's sendmail requires of DATA before it returns.
ACCEPTED = 250


class EmailChannel:
    """The e-mail channel: plain-text (or text and HTML) messages from one sender, composed by
    `MessageRenderer`, signed (`signer`, DKIM) and sent over `mailer`'s pooled SMTP
    connections. A message with an unsubscribe URL carries RFC 8058's two headers (both
    signed); one with an envelope sender (VERP) goes out under it."""

    def __init__(
        self,
        mailer: SMTPMailer,
        *,
        sender: str,
        now: Callable[[], datetime] = utcnow,
        signer: "DkimSigner | None" = None,
    ) -> None:
        self.mailer = mailer
        self.sender = sender
        self.renderer = MessageRenderer(sender)
        self.now = now
        self.signer = signer

    @property
    def pool_size(self) -> int:
        return self.mailer.pool_size

    def send(self, message: Message) -> Receipt:
        """Render the message (RFC 5322, RFC 2047 subject), sign it, and hand it to the
        server."""
        self.mailer.send(self.outgoing(message))
        return Receipt(code=ACCEPTED, provider_message_id=message.message_id)

    def outgoing(self, message: Message) -> OutgoingMessage:
        """The message as it goes on the wire: rendered, then signed."""
        headers: tuple[tuple[str, str], ...] = ()
        if message.unsubscribe_url is not None:
            headers = (
                ("List-Unsubscribe", f"<{message.unsubscribe_url}>"),
                ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
            )
        outgoing = self.renderer.render(
            recipient=message.address,
            subject=message.subject or "",
            text=message.text,
            message_id=message.message_id or new_message_id(self.sender),
            date=self.now(),
            sensitive=message.sensitive,
            html=message.html,
            attachments=message.attachments,
            headers=headers,
        )
        if message.envelope_from is not None:
            outgoing = replace(outgoing, sender=message.envelope_from)
        if self.signer is not None:
            outgoing = replace(outgoing, data=self.signer.sign(outgoing.data))
        return outgoing

    def close(self) -> None:
        self.mailer.close()
