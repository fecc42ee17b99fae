"""The inbound SMTP listener: bounces and complaints coming back (`python cli.py inbound`,
on INBOUND_HOST:INBOUND_PORT; BOUNCE_DOMAIN's MX must lead to it).

Mail goes out with the envelope sender bounces+<id>-<mac>@BOUNCE_DOMAIN (VERP), so a
report names its notification by the address it is sent to. What arrives is read by
`read_report`:

- a delivery status notification (RFC 3464: multipart/report; report-type=
  delivery-status): a recipient block with `Action: failed` marks the notification's sent
  attempt `bounced` with the block's Status and Diagnostic-Code; a 5.1.x status (no such
  mailbox or domain) also suppresses the address (`hard_bounce`), as a synchronous 550
  5.1.1 does. Delays and success notices change nothing (`ignored`).
- an ARF complaint (RFC 5965: report-type=feedback-report): the attempt is marked
  `complained` and the address suppressed (`complaint`). Feedback loops send it to their
  own address: the notification is found by Original-Mail-From, or by the Return-Path
  of the message it returns.

Every message is kept as an `inbound_reports` row: matched, ignored, unmatched (read,
but naming no notification of ours) or unparseable; the last two with their bytes, for
an operator (`GET /inbound-reports`). A repeat of a report changes nothing and is kept
as `ignored`. If the database is down the listener answers 451, so the sender tries
again: nothing is dropped.
"""

import asyncio
import email
import email.policy
import logging
import re
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from email.message import Message
from email.utils import parseaddr

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope
from aiosmtpd.smtp import Session as SMTPSession
from sqlalchemy.orm import Session, sessionmaker

import crud
from config import Settings
from db import DATABASE_UNAVAILABLE
from models import (
    AttemptOutcome,
    Channel,
    Notification,
    ReportStatus,
    SuppressionReason,
    utcnow,
)
from suppression import ALL, Tokens

logger = logging.getLogger(__name__)
# aiosmtpd logs every SMTP command at INFO and every line of DATA at DEBUG: addresses and
# whole reports (which quote what bounced) in the log.
logging.getLogger("mail.log").setLevel(logging.WARNING)

DELIVERY_STATUS = "delivery-status"
FEEDBACK_REPORT = "feedback-report"
UNKNOWN = "unknown"
_SMTP_CODE = re.compile(r"\b([245]\d\d)\b")
# A DSN status whose address is bad for good: suppressed (RFC 3463 X.1.Y).
_HARD = re.compile(r"5\.1\.(1|2|3|6|10)$")
# RFC 3464 2.3.4: the status code, then perhaps a comment.
_STATUS = re.compile(r"\s*([245]\.\d{1,3}\.\d{1,3})")
# RFC 5965 feedback types that mean the recipient complained.
_COMPLAINTS = {"abuse", "fraud", "virus"}


@dataclass(frozen=True)
class Report:
    """What a received message says, as far as it can be read."""

    kind: str
    # failed, delayed, delivered… (a DSN); abuse, fraud… (an ARF report)
    action: str | None = None
    status: str | None = None
    diagnostic: str | None = None
    # Addresses in it that may be our VERP envelope sender.
    senders: tuple[str, ...] = ()
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.kind == DELIVERY_STATUS and self.action == "failed"

    @property
    def complaint(self) -> bool:
        """An ARF report of a recipient's complaint (not `not-spam`, `auth-failure`…)."""
        return self.kind == FEEDBACK_REPORT and self.action in _COMPLAINTS

    @property
    def code(self) -> int | None:
        """The SMTP reply code in the diagnostic (smtp; 550 5.1.1 …), if any."""
        found = _SMTP_CODE.search(self.diagnostic or "")
        return int(found[1]) if found else None


def read_report(data: bytes) -> Report:
    """The report `data` holds; kind `unknown` with the `error` when it is none we read."""
    try:
        return _read(email.message_from_bytes(data, policy=email.policy.compat32))
    except Exception as exc:  # whatever odd input breaks in the parser: kept, not lost
        return Report(UNKNOWN, error=f"not readable: {type(exc).__name__}")


def _read(message: Message) -> Report:
    if message.get_content_type() != "multipart/report":
        return Report(UNKNOWN, error=f"not a report: {message.get_content_type()}")
    report_type = str(message.get_param("report-type") or "").lower()
    payload = message.get_payload() if message.is_multipart() else []
    parts = [part for part in payload if isinstance(part, Message)]
    returned = [_senders_of(part) for part in parts[2:3]]
    senders = tuple(address for found in returned for address in found)
    if report_type == DELIVERY_STATUS:
        return _delivery_status(parts, senders)
    if report_type == FEEDBACK_REPORT:
        return _feedback(parts, senders)
    return Report(UNKNOWN, error=f"a report of type {report_type or 'none'!r}")


def _delivery_status(parts: list[Message], senders: tuple[str, ...]) -> Report:
    status_part = next(
        (p for p in parts if p.get_content_type() == "message/delivery-status"), None
    )
    if status_part is None:
        return Report(UNKNOWN, error="a delivery-status report without its status part")
    blocks = status_part.get_payload()
    if not isinstance(blocks, list) or len(blocks) < 2:
        return Report(UNKNOWN, error="a delivery-status part without a recipient block")
    # The first block is about the message; the others each about one recipient.
    recipients = [b for b in blocks[1:] if isinstance(b, Message) and b.get("Action")]
    if not recipients:
        return Report(UNKNOWN, error="no recipient block names an Action")
    chosen = next(
        (b for b in recipients if str(b["Action"]).strip().lower() == "failed"), recipients[0]
    )
    status = _STATUS.match(str(chosen.get("Status", "")))
    return Report(
        DELIVERY_STATUS,
        action=str(chosen["Action"]).strip().lower()[:32],
        status=status[1] if status else None,
        diagnostic=_one_line(chosen.get("Diagnostic-Code")),
        senders=senders,
    )


def _feedback(parts: list[Message], senders: tuple[str, ...]) -> Report:
    fields = next((p for p in parts if p.get_content_type() == "message/feedback-report"), None)
    if fields is None:
        return Report(UNKNOWN, error="a feedback report without its message/feedback-report")
    payload = fields.get_payload()
    # Parsed as a message whose headers are the fields (or, by some parsers, one block).
    block = payload[0] if isinstance(payload, list) and payload else fields
    if isinstance(payload, str):
        block = email.message_from_string(payload)
    assert isinstance(block, Message)
    feedback_type = str(block.get("Feedback-Type", "")).strip().lower()[:32]
    if not feedback_type:
        return Report(UNKNOWN, error="a feedback report without Feedback-Type")
    original = parseaddr(str(block.get("Original-Mail-From", "")))[1]
    return Report(
        FEEDBACK_REPORT,
        action=feedback_type,
        diagnostic=_one_line(block.get("User-Agent")),
        senders=((original,) if original else ()) + senders,
    )


def _senders_of(part: Message) -> tuple[str, ...]:
    """The Return-Path of the message a report returns (message/rfc822, or its headers
    as text/rfc822-headers)."""
    returned: Message | None = None
    if part.get_content_type() == "message/rfc822":
        inner = part.get_payload()
        first = inner[0] if isinstance(inner, list) and inner else None
        returned = first if isinstance(first, Message) else None
    elif part.get_content_type() == "text/rfc822-headers":
        raw = part.get_payload(decode=True)
        if isinstance(raw, bytes):
            returned = email.message_from_bytes(raw, policy=email.policy.compat32)
    if not isinstance(returned, Message):
        return ()
    found = parseaddr(str(returned.get("Return-Path", "")))[1]
    return (found,) if found else ()


def _one_line(value: object) -> str | None:
    if value is None:
        return None
    return " ".join(str(value).split())[:1000] or None


class Inbox:
    """Records what the listener receives (see the module docstring)."""

    def __init__(
        self,
        *,
        session_factory: sessionmaker[Session],
        tokens: Tokens,
        now: Callable[[], datetime] = utcnow,
    ) -> None:
        self.session_factory = session_factory
        self.tokens = tokens
        self.now = now

    def receive(self, *, mail_from: str, rcpt_tos: list[str], data: bytes) -> ReportStatus:
        """Read, match and record one message, in one transaction; what it came to."""
        report = read_report(data)
        with self.session_factory() as session:
            notification = self._notification(session, report, rcpt_tos)
            status = self._record(session, report, notification)
            kept = status in (ReportStatus.UNPARSEABLE, ReportStatus.UNMATCHED)
            crud.store_report(
                session=session,
                values={
                    "received_at": self.now(),
                    "mail_from": mail_from[:320],
                    "rcpt_to": ",".join(rcpt_tos)[:320],
                    "kind": report.kind,
                    "status": status,
                    "notification_id": notification.id if notification is not None else None,
                    "code": report.status or (report.action if report.complaint else None),
                    "detail": report.error or report.diagnostic,
                    "raw": data if kept else None,
                },
            )
            session.commit()
        logger.info("inbound %s report: %s", report.kind, status)
        return status

    def _notification(
        self, session: Session, report: Report, rcpt_tos: list[str]
    ) -> Notification | None:
        for address in [*rcpt_tos, *report.senders]:
            notification_id = self.tokens.read_bounce(address)
            if notification_id is not None:
                return crud.get_notification(session=session, notification_id=notification_id)
        return None

    def _record(
        self, session: Session, report: Report, notification: Notification | None
    ) -> ReportStatus:
        if report.kind == UNKNOWN:
            return ReportStatus.UNPARSEABLE
        if not (report.failed or report.complaint):
            return ReportStatus.IGNORED
        address = notification.address_on(Channel.EMAIL) if notification is not None else None
        if notification is None or address is None:
            return ReportStatus.UNMATCHED
        if report.complaint:
            outcome, reason = AttemptOutcome.COMPLAINED, SuppressionReason.COMPLAINT
            error = f"complaint ({report.action})"
        else:
            outcome, reason = AttemptOutcome.BOUNCED, SuppressionReason.HARD_BOUNCE
            error = " ".join(filter(None, [report.status, report.diagnostic])) or "bounced"
        marked = crud.mark_delivered_attempt(
            session=session,
            notification_id=notification.id,
            outcome=outcome,
            code=report.code,
            error=error,
        )
        added: list[int] = []
        if report.complaint or _HARD.match(report.status or ""):
            added = crud.add_suppressions(
                session=session,
                rows=[
                    {
                        "channel": Channel.EMAIL,
                        "address": address,
                        "scope": ALL,
                        "reason": reason,
                        "detail": error[:1000],
                        "notification_id": notification.id,
                    }
                ],
                commit=False,
                now=self.now,
            )
        return ReportStatus.MATCHED if marked or added else ReportStatus.IGNORED


class BounceHandler:
    """aiosmtpd handler: every message handed to `Inbox.receive` in a thread."""

    def __init__(self, inbox: Inbox) -> None:
        self.inbox = inbox

    async def handle_DATA(self, server: SMTP, session: SMTPSession, envelope: Envelope) -> str:
        try:
            status = await asyncio.get_running_loop().run_in_executor(
                None,
                lambda: self.inbox.receive(
                    mail_from=envelope.mail_from or "",
                    rcpt_tos=list(envelope.rcpt_tos),
                    data=envelope.original_content or b"",
                ),
            )
        except DATABASE_UNAVAILABLE:
            logger.error("inbound report not recorded: database unavailable; asked to retry")
            return "451 4.3.0 Try again later"
        except Exception:
            # A bug rather than the report's fault: the sender keeps it and tries again.
            logger.exception("inbound report not recorded; asked to retry")
            return "451 4.3.0 Try again later"
        return f"250 2.0.0 Report {status}"


def start_listener(
    settings: Settings,
    *,
    session_factory: sessionmaker[Session],
    tokens: Tokens,
    port: int | None = None,
    now: Callable[[], datetime] = utcnow,
) -> Controller:
    """Start the listener in a background thread on INBOUND_HOST and INBOUND_PORT (or
    `port`); `.stop()` ends it."""
    inbox = Inbox(session_factory=session_factory, tokens=tokens, now=now)
    controller = Controller(
        BounceHandler(inbox),
        hostname=settings.inbound_host,
        port=settings.inbound_port if port is None else port,
        data_size_limit=settings.inbound_max_bytes,
    )
    controller.start()
    logger.info("inbound listener on %s:%d", settings.inbound_host, controller.port)
    return controller


def serve(settings: Settings, session_factory: sessionmaker[Session], tokens: Tokens) -> None:
    """Run the listener until SIGTERM or SIGINT."""
    controller = start_listener(settings, session_factory=session_factory, tokens=tokens)
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    try:
        stopping.wait()
    finally:
        controller.stop()
