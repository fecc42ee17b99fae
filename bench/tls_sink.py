"""A STARTTLS + AUTH SMTP sink for the bench (smtp-sink speaks no TLS): counts, keeps nothing.

python bench/tls_sink.py PORT CA_FILE USER PASSWORD
"""

import signal
import ssl
import sys
import threading
from typing import Any

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session


class Sink:
    def __init__(self) -> None:
        self.count = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.count += 1
        return "250 2.0.0 OK"


def main() -> None:
    port, ca_file, user, password = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    ca = trustme.CA()
    ca.cert_pem.write_to_path(ca_file)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)

    def authenticate(
        server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = isinstance(data, LoginPassword) and data == (user.encode(), password.encode())
        return AuthResult(success=ok, handled=False)

    controller = Controller(
        Sink(),
        hostname="127.0.0.1",
        port=port,
        tls_context=context,
        require_starttls=True,
        authenticator=authenticate,
        auth_require_tls=True,
        auth_exclude_mechanism=["LOGIN"],
    )
    controller.start()
    print("ready", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    controller.stop()


if __name__ == "__main__":
    main()
