"""Building RFC 5322 messages and handing them to an SMTP server.

Everything smtplib, socket and ssl raise is converted here, so callers only see:

    DeliveryError                 any failure to hand a message over
    ├── TransientDeliveryError    worth retrying: 4xx replies, refused/reset/timed-out
    │                             connections, the server hanging up
    └── PermanentDeliveryError    retrying cannot help: 5xx replies, failed
                                  authentication, an untrusted TLS certificate
"""

import logging
import smtplib
import ssl
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid, parseaddr
from pathlib import Path

from config import Settings, SMTPSecurity

logger = logging.getLogger(__name__)


class DeliveryError(Exception):
    """The message was not accepted by the SMTP server."""

    def __init__(self, message: str, *, smtp_code: int | None = None) -> None:
        super().__init__(message)
        self.smtp_code = smtp_code

    def __str__(self) -> str:
        text = super().__str__()
        return f"{self.smtp_code} {text}" if self.smtp_code else text


class TransientDeliveryError(DeliveryError):
    """A failure that may pass: try again later."""


class PermanentDeliveryError(DeliveryError):
    """A failure that will not pass by retrying."""


def new_message_id(sender: str) -> str:
    """A globally unique Message-ID in the sender's domain."""
    _, address = parseaddr(sender)
    return make_msgid(domain=address.rpartition("@")[2] or None)


def build_message(
    *, sender: str, recipient: str, subject: str, text: str, message_id: str, date: datetime
) -> EmailMessage:
    """An RFC 5322 message; non-ASCII headers become RFC 2047 encoded words."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = recipient
    message["Subject"] = subject
    message["Date"] = format_datetime(date)
    message["Message-ID"] = message_id
    # Quoted-printable keeps the body 7-bit: smtplib never asks for 8BITMIME.
    message.set_content(text, charset="utf-8", cte="quoted-printable")
    return message


def classify_reply(code: int, text: bytes | str) -> DeliveryError:
    """Our error for an SMTP reply: 4xx may pass, 5xx will not."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    error_type = TransientDeliveryError if 400 <= code < 500 else PermanentDeliveryError
    return error_type(text, smtp_code=code)


class SMTPMailer:
    """Sends messages over one SMTP connection each, plain, STARTTLS or implicit TLS."""

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
    ) -> None:
        self.host = host
        self.port = port
        self.security = security
        self.username = username
        self._password = password
        self.timeout = timeout
        self.ssl_context = ssl_context or ssl.create_default_context()

    @classmethod
    def from_settings(
        cls, settings: Settings, *, host: str | None = None, port: int | None = None
    ) -> "SMTPMailer":
        password = settings.smtp_password.get_secret_value() if settings.smtp_password else None
        return cls(
            host=host or settings.smtp_host,
            port=port or settings.smtp_port,
            security=settings.smtp_security,
            username=settings.smtp_user or None,
            password=password,
            timeout=settings.smtp_timeout,
            ssl_context=make_ssl_context(
                verify=settings.smtp_verify_tls, ca_file=settings.smtp_ca_file
            ),
        )

    def __repr__(self) -> str:
        return f"SMTPMailer(host={self.host!r}, port={self.port}, security={self.security.value!r})"

    def send(self, message: EmailMessage) -> None:
        """Hand `message` to the server, or raise a `DeliveryError`."""
        smtp: smtplib.SMTP | None = None
        try:
            smtp = self._connect()
            if self.security is SMTPSecurity.STARTTLS:
                smtp.starttls(context=self.ssl_context)
            if self.username:
                smtp.login(self.username, self._password or "")
            smtp.send_message(message)
        except smtplib.SMTPRecipientsRefused as exc:
            # One recipient per message, so one reply.
            code, text = next(iter(exc.recipients.values()))
            raise classify_reply(code, text) from exc
        except smtplib.SMTPResponseException as exc:
            raise classify_reply(exc.smtp_code, exc.smtp_error) from exc
        except smtplib.SMTPServerDisconnected as exc:
            raise TransientDeliveryError(f"server disconnected: {exc}") from exc
        except smtplib.SMTPException as exc:
            # Missing STARTTLS/AUTH/SMTPUTF8 support: a configuration mismatch.
            raise PermanentDeliveryError(str(exc)) from exc
        except ssl.SSLCertVerificationError as exc:
            raise PermanentDeliveryError(
                f"TLS certificate not trusted: {exc.verify_message}"
            ) from exc
        except OSError as exc:
            # Refused, reset, timed out, TLS handshake cut short, name not resolved.
            raise TransientDeliveryError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            if smtp is not None:
                _hang_up(smtp)

    def _connect(self) -> smtplib.SMTP:
        if self.security is SMTPSecurity.SSL:
            return smtplib.SMTP_SSL(
                self.host, self.port, timeout=self.timeout, context=self.ssl_context
            )
        return smtplib.SMTP(self.host, self.port, timeout=self.timeout)


def _hang_up(smtp: smtplib.SMTP) -> None:
    # The message is accepted (or refused) by now: a failed QUIT changes nothing about it.
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
