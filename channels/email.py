"""E-mail over SMTP: `mailer.SMTPMailer` and `mailer.MessageRenderer` behind the channel
interface."""

from channels.base import Message, Receipt
from mailer import MessageRenderer, SMTPMailer, new_message_id
from models import utcnow

# The reply smtplib's sendmail requires of DATA before it returns.
ACCEPTED = 250


class EmailChannel:
    """Sends plain-text e-mail from one sender through a pool of SMTP connections."""

    def __init__(self, mailer: SMTPMailer, *, sender: str) -> None:
        self.mailer = mailer
        self.sender = sender
        self.renderer = MessageRenderer(sender)

    @property
    def pool_size(self) -> int:
        return self.mailer.pool_size

    def send(self, message: Message) -> Receipt:
        """Render the message (RFC 5322, RFC 2047 subject) and hand it to the server."""
        self.mailer.send(
            self.renderer.render(
                recipient=message.address,
                subject=message.subject or "",
                text=message.text,
                message_id=message.message_id or new_message_id(self.sender),
                date=utcnow(),
                sensitive=message.sensitive,
            )
        )
        return Receipt(code=ACCEPTED, provider_message_id=message.message_id)

    def close(self) -> None:
        self.mailer.close()
