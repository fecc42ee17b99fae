"""The development mail catcher: an SMTP server that writes each message to an .eml file."""

import logging
import socket
from datetime import UTC, datetime
from pathlib import Path
from uuid import uuid4

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

logger = logging.getLogger(__name__)
# aiosmtpd logs every SMTP command at INFO.
logging.getLogger("mail.log").setLevel(logging.WARNING)


class EmlWriter:
    """aiosmtpd handler: store every accepted message under `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        path = self.directory / f"{stamp}-{uuid4().hex[:8]}.eml"
        content = envelope.original_content or b""
        path.write_bytes(content)
        logger.info("dev mail catcher: message for %s saved as %s", envelope.rcpt_tos, path)
        return "250 2.0.0 Message accepted"


def start_mail_catcher(directory: Path, host: str = "127.0.0.1") -> Controller:
    """Start the catcher on a free local port in a background thread; `.stop()` ends it."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        port = probe.getsockname()[1]
    controller = Controller(EmlWriter(directory), hostname=host, port=port)
    controller.start()
    logger.warning(
        "SMTP_HOST is not set: mail goes to the development catcher on %s:%d, saved in %s",
        host,
        port,
        directory,
    )
    return controller
