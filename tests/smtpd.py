"""A real SMTP server for tests (aiosmtpd), told how to answer."""

import asyncio
import logging
import socket
import ssl
import threading
from collections import deque
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

# aiosmtpd logs every SMTP command, and at DEBUG every line of DATA: the messages the tests
# send would be in their captured logs, which several check for what the service logs.
logging.getLogger("mail.log").setLevel(logging.WARNING)

# A scripted reply that closes the connection instead of answering.
DROP = "drop"


@dataclass
class Received:
    raw: bytes
    mail_from: str
    rcpt_tos: list[str]
    login: bytes | None
    # The client's (host, port): one per connection.
    peer: Any = None

    @property
    def message(self) -> EmailMessage:
        parsed = message_from_bytes(self.raw, policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed

    @property
    def message_id(self) -> str:
        """The Message-ID header as sent, unfolded: `message["Message-ID"]` for the plain
        ids the service writes, read from the header block alone (parsing whole messages
        costs a test of 10,000 of them seconds)."""
        value = _HEADER_BLOCK.parsebytes(self.raw)["Message-ID"]
        return "".join(str(value).splitlines())


_HEADER_BLOCK = BytesHeaderParser(policy=policy.compat32)


@dataclass
class ScriptedHandler:
    """Accepts every message, except for the replies queued in `rcpt_replies`/`data_replies`."""

    received: list[Received] = field(default_factory=list)
    rcpt_replies: deque[str] = field(default_factory=deque)
    data_replies: deque[str] = field(default_factory=deque)
    # When set, DATA waits until the test opens the gate.
    gate: threading.Event | None = None
    data_started: threading.Event = field(default_factory=threading.Event)
    port: int = 0  # set by start_server
    quit_reply: str = "221 2.0.0 Bye"
    quits: int = 0
    data_begun: int = 0  # DATA commands begun, each counted before the gate
    _data: threading.Condition = field(default_factory=threading.Condition)
    controller: Controller | None = None  # set by start_server
    restart: Any = None  # set by start_server: starts it again on the same port
    running: bool = False

    def go_down(self) -> None:
        """Stop the server: open connections drop, new ones are refused."""
        assert self.controller is not None
        self.controller.stop()
        self.running = False

    def come_back(self) -> None:
        self.restart()

    def stop(self) -> None:
        if self.running:
            self.go_down()

    def wait_data(self, count: int, timeout: float) -> bool:
        """Whether `count` DATA commands have begun (held at the gate, say) within `timeout`."""
        with self._data:
            return self._data.wait_for(lambda: self.data_begun >= count, timeout)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.rcpt_replies:
            return self._scripted(server, self.rcpt_replies.popleft())
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.data_started.set()
        with self._data:
            self.data_begun += 1
            self._data.notify_all()
        if self.gate is not None:
            await asyncio.to_thread(self.gate.wait, 10)
        if self.data_replies:
            return self._scripted(server, self.data_replies.popleft())
        login = session.auth_data.login if isinstance(session.auth_data, LoginPassword) else None
        self.received.append(
            Received(
                raw=envelope.original_content or b"",
                mail_from=envelope.mail_from or "",
                rcpt_tos=list(envelope.rcpt_tos),
                login=login,
                peer=session.peer,
            )
        )
        return "250 2.0.0 OK: queued"

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.quits += 1
        return self.quit_reply

    @staticmethod
    def _scripted(server: SMTP, reply: str) -> str:
        if reply == DROP:
            assert server.transport is not None
            server.transport.close()
            return "421 4.4.2 connection dropped"  # never reaches the client
        return reply


@dataclass
class Credentials:
    user: str
    password: str

    def __call__(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = isinstance(data, LoginPassword) and data == (
            self.user.encode(),
            self.password.encode(),
        )
        # handled=False: aiosmtpd itself answers 235 or 535.
        return AuthResult(success=ok, handled=False, auth_data=data if ok else None)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def start_server(
    handler: ScriptedHandler,
    *,
    credentials: Credentials | None = None,
    starttls: ssl.SSLContext | None = None,
    implicit_tls: ssl.SSLContext | None = None,
    port: int | None = None,
    smtputf8: bool = False,
) -> Controller:
    """Start an SMTP server on a free local port (or `port`); the caller stops it."""
    kwargs: dict[str, Any] = {"enable_SMTPUTF8": smtputf8}
    if credentials is not None:
        kwargs["authenticator"] = credentials
        # smtplib's AUTH LOGIN with an initial response confuses aiosmtpd; PLAIN is unambiguous.
        kwargs["auth_exclude_mechanism"] = ["LOGIN"]
        # With implicit TLS aiosmtpd does not know the channel is encrypted.
        kwargs["auth_require_tls"] = implicit_tls is None
        kwargs["auth_required"] = implicit_tls is None
    if starttls is not None:
        kwargs.update(tls_context=starttls, require_starttls=True)
    controller = Controller(
        handler,
        hostname="127.0.0.1",
        port=port or free_port(),
        ssl_context=implicit_tls,
        server_hostname="smtp.test",
        **kwargs,
    )
    controller.start()
    handler.port = controller.port
    handler.controller = controller
    handler.running = True
    handler.restart = lambda: start_server(
        handler,
        credentials=credentials,
        starttls=starttls,
        implicit_tls=implicit_tls,
        port=controller.port,
        smtputf8=smtputf8,
    )
    return controller
