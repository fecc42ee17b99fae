"""The development stand-in for SMS.ru and the Telegram Bot API: a local HTTP server that
answers as they do and writes each accepted message to a JSON file.

    POST /sms/send                  SMS.ru: form fields api_id, to, msg, json=1, from
    POST /bot<token>/sendMessage    Bot API: JSON (or form) fields chat_id, text, parse_mode

An accepted SMS becomes `<directory>/sms/<time>-<random>.json` (to, text, from, sms_id,
received_at), one per number; a Telegram message `<directory>/telegram/...` (chat_id,
text, parse_mode, message_id, received_at). The api_id and the token are checked (present,
and equal to the expected ones when those are given) and never written or logged.

Documented test values are refused as the real providers refuse them, so that a fallback
can be seen under `make run`; nothing is saved for them:

    SMS to a number ending in seven zeros   SMS.ru's per-number status_code 207, "this number
    (+7 900 000-00-00, +7 916 000-00-00)    cannot be sent messages", in a reply otherwise OK
    Telegram to chat id -1                  HTTP 403, {"ok": false, "error_code": 403,
                                            "description": "Forbidden: bot was blocked by
                                            the user"}

Tests script faults through one seam, `Outbox._arrived`: a subclass (tests/providers.py)
may answer a request with an `Interception` (a status and body, a delay, or a hang-up) in
place of the normal answer, so that the faults are the server's real replies and the
client code under test runs unchanged.
"""

import json
import logging
import re
import socket
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self
from urllib.parse import parse_qs, urlsplit
from uuid import uuid4

logger = logging.getLogger(__name__)

# What SMS.ru says for the refusals the stand-in makes itself.
SMS_RU_TEXTS = {
    200: "Неправильный api_id",
    202: "Неправильно указан номер телефона получателя, либо на него нет маршрута",
    203: "Нет текста сообщения",
    207: (
        "На этот номер (или один из номеров) нельзя отправлять сообщения, либо указано более"
        " 100 номеров в списке получателей"
    ),
}
# The test values of the module's docstring. Seven zeros, not four: the benchmark numbers
# its recipients +7916<seven digits>, and every ten-thousandth of those ends in 0000.
REFUSED_NUMBER_ENDING = "0000000"
REFUSED_CHATS = {-1: (403, "Forbidden: bot was blocked by the user")}
MAX_TELEGRAM_TEXT = 4096
PARSE_MODES = {"html", "markdown", "markdownv2"}
_MAX_BODY = 1024 * 1024
_BOT_PATH = re.compile(r"/bot([^/]*)/([A-Za-z]+)")
# The request line carries the token (/bot<token>/...), and a query string could carry the
# api_id.
_TOKEN_IN_LINE = re.compile(r"/bot[^/\s\"']*")
_API_ID_IN_LINE = re.compile(r"api_id=[^&\s\"']*")


class Interception(Protocol):
    """An answer given in place of the stand-in's normal one (see `Outbox._arrived`)."""

    @property
    def status(self) -> int | None:
        """None: the normal answer, after `delay`."""

    @property
    def body(self) -> bytes: ...

    @property
    def content_type(self) -> str: ...

    @property
    def delay(self) -> float:
        """Seconds before answering; beyond the client's timeout, a timeout."""

    @property
    def drop(self) -> bool:
        """Close the connection without answering."""


@dataclass(frozen=True, slots=True)
class Received:
    """One request as the stand-in got it; never its api_id or token."""

    api: str  # "sms" or "telegram"
    fields: dict[str, Any]
    peer: tuple[str, int]  # the client's address and port: one per connection


@dataclass
class _Accepted:
    status: int
    reply: dict[str, Any]
    files: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (kind, record)


class Outbox:
    """The running stand-in: its base `url`."""

    def __init__(
        self,
        directory: Path,
        host: str = "127.0.0.1",
        *,
        api_id: str | None = None,
        token: str | None = None,
    ) -> None:
        self.directory = directory
        # SMS.ru's reply says what is left on the account; nothing is ever spent here.
        self.balance = Decimal("1000.00")
        self._api_id = api_id
        self._token = token
        self._lock = threading.Lock()
        self._counter = 0
        self._stopping = threading.Event()
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._server = _Server((host, 0), _Handler, self)
        port = self._server.server_address[1]
        self.url = f"http://{host}:{port}"
        # A short poll: `stop` waits for the serving loop to notice.
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="dev-outbox",
            daemon=True,
        )

    def __repr__(self) -> str:
        return f"Outbox(url={self.url!r}, directory={str(self.directory)!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> Self:
        """Serve in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; open connections, idle or waiting on a delay, are closed."""
        self._stopping.set()
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()
        with self._lock:
            connections = list(self._connections.items())
        for connection, _ in connections:
            _shut(connection)
        for _, thread in connections:
            if thread is not threading.current_thread():
                thread.join(timeout=5)

    def _opened(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections[connection] = threading.current_thread()
        if self._stopping.is_set():
            _shut(connection)

    def _closed(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.pop(connection, None)

    def _arrived(self, received: Received) -> Interception | None:
        """What to answer `received` with instead of the normal answer: nothing here."""
        return None

    def _next_id(self) -> int:
        with self._lock:
            self._counter += 1
            return self._counter

    def _wait(self, seconds: float) -> bool:
        """Sleep `seconds`; False if the stand-in is stopping meanwhile."""
        return not self._stopping.wait(seconds)

    def _sms_send(self, fields: dict[str, str]) -> _Accepted:
        """SMS.ru's /sms/send: HTTP 200 always, the outcome in the JSON."""
        api_id = fields.get("api_id", "")
        if not api_id or (self._api_id is not None and api_id != self._api_id):
            return _Accepted(200, _sms_error(200))
        text = fields.get("msg", "")
        if not text:
            return _Accepted(200, _sms_error(203))
        numbers = [number.strip() for number in fields.get("to", "").split(",") if number.strip()]
        if not numbers:
            return _Accepted(200, _sms_error(202))
        accepted = _Accepted(200, {})
        entries: dict[str, Any] = {}
        for number in numbers:
            if not re.fullmatch(r"[1-9][0-9]{9,14}", number):
                entries[number] = _sms_error(202)
                continue
            if number.endswith(REFUSED_NUMBER_ENDING):
                entries[number] = _sms_error(207)
                continue
            sms_id = f"{self._next_id():06d}-{zlib.crc32(number.encode()) % 10**8:08d}"
            entries[number] = {"status": "OK", "status_code": 100, "sms_id": sms_id}
            record = {"to": number, "text": text, "from": fields.get("from"), "sms_id": sms_id}
            accepted.files.append(("sms", record))
        accepted.reply = {
            "status": "OK",
            "status_code": 100,
            "sms": entries,
            "balance": float(self.balance),
        }
        return accepted

    def _send_message(self, token: str, method: str, fields: dict[str, Any]) -> _Accepted:
        """The Bot API's sendMessage: HTTP status and `error_code` agree."""
        if not token:
            return _Accepted(404, _bot_error(404, "Not Found"))
        if self._token is not None and token != self._token:
            return _Accepted(401, _bot_error(401, "Unauthorized"))
        # Bot API method names are case-insensitive.
        if method.lower() != "sendmessage":
            return _Accepted(404, _bot_error(404, "Not Found: method not found"))
        chat_id = fields.get("chat_id")
        if chat_id is None or chat_id == "":
            return _Accepted(400, _bot_error(400, "Bad Request: chat_id is empty"))
        text = fields.get("text")
        if not isinstance(text, str) or not text.strip():
            return _Accepted(400, _bot_error(400, "Bad Request: message text is empty"))
        parse_mode = fields.get("parse_mode")
        if parse_mode is not None and str(parse_mode).lower() not in PARSE_MODES:
            return _Accepted(400, _bot_error(400, "Bad Request: unsupported parse_mode"))
        # With markup the limit applies to the text without it, which is not parsed here.
        if parse_mode is None and len(text) > MAX_TELEGRAM_TEXT:
            return _Accepted(400, _bot_error(400, "Bad Request: message is too long"))
        chat = _chat(chat_id)
        if chat is None:
            return _Accepted(400, _bot_error(400, "Bad Request: chat not found"))
        if chat["id"] in REFUSED_CHATS:
            code, description = REFUSED_CHATS[chat["id"]]
            return _Accepted(code, _bot_error(code, description))
        message_id = self._next_id()
        result = {"message_id": message_id, "date": int(time.time()), "chat": chat, "text": text}
        record = {
            "chat_id": chat_id,
            "text": text,
            "parse_mode": parse_mode,
            "message_id": message_id,
        }
        return _Accepted(200, {"ok": True, "result": result}, [("telegram", record)])

    def _save(self, kind: str, record: dict[str, Any]) -> Path:
        now = datetime.now(UTC)
        directory = self.directory / kind
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{now:%Y%m%dT%H%M%S.%f}-{uuid4().hex[:8]}.json"
        # Written aside and renamed, so a reader never sees half a file.
        partial = path.with_suffix(".part")
        partial.write_bytes(_json_bytes(record | {"received_at": now.isoformat()}, indent=2))
        partial.replace(path)
        to = record.get("to", record.get("chat_id"))
        logger.info("dev outbox: %s message for %s saved as %s", kind, to, path)
        return path


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], outbox: Outbox
    ) -> None:
        self.outbox = outbox
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The default prints to stderr. A client that left early is routine.
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            logger.debug("dev outbox: %s left early", client_address, exc_info=True)
        else:
            logger.exception("dev outbox: a request from %s failed", client_address)


class _Handler(BaseHTTPRequestHandler):
    # Keep-alive, as the real APIs: the client's pool reuses its connections.
    protocol_version = "HTTP/1.1"
    server_version = "dev-outbox"
    # An idle kept-alive connection is closed after this many seconds.
    timeout = 30
    # Headers and body go out in separate writes: without this, Nagle's algorithm and the
    # client's delayed ACK hold every reply back some 40 ms.
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.outbox._opened(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.outbox._closed(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        line = _TOKEN_IN_LINE.sub("/bot<token>", format % args)
        line = _API_ID_IN_LINE.sub("api_id=<hidden>", line)
        logger.debug("dev outbox: %s %s", self.address_string(), line)

    def do_POST(self) -> None:
        body = self._body()
        if body is None:
            return
        outbox = self.server.outbox
        url = urlsplit(self.path)
        bot = _BOT_PATH.fullmatch(url.path)
        if url.path.rstrip("/") == "/sms/send":
            fields: dict[str, Any] = _form(url.query) | _form(body.decode("utf-8", "replace"))
            received = Received(
                "sms", {k: v for k, v in fields.items() if k != "api_id"}, self.client_address
            )
        elif bot is not None:
            fields_or_error = self._bot_fields(url.query, body)
            if fields_or_error is None:
                return
            fields = fields_or_error
            received = Received("telegram", dict(fields), self.client_address)
        else:
            self._reply(
                404, _json_bytes({"ok": False, "error_code": 404, "description": "Not Found"})
            )
            return
        planned = outbox._arrived(received)
        if planned is not None:
            if planned.delay and not outbox._wait(planned.delay):
                self.close_connection = True
                return
            if planned.drop:
                # Nothing written: the client sees the connection end with no reply.
                self.close_connection = True
                return
            if planned.status is not None:
                self._reply(planned.status, planned.body, planned.content_type)
                return
        if received.api == "sms":
            accepted = outbox._sms_send(fields)
        else:
            assert bot is not None
            accepted = outbox._send_message(bot.group(1), bot.group(2), fields)
        for kind, record in accepted.files:
            outbox._save(kind, record)
        self._reply(accepted.status, _json_bytes(accepted.reply))

    def _bot_fields(self, query: str, body: bytes) -> dict[str, Any] | None:
        fields: dict[str, Any] = _form(query)
        if self.headers.get_content_type() == "application/json":
            try:
                document = json.loads(body) if body else {}
            except ValueError:
                document = None
            if not isinstance(document, dict):
                self._reply(400, _json_bytes(_bot_error(400, "Bad Request: can't parse JSON")))
                return None
            return fields | document
        return fields | _form(body.decode("utf-8", "replace"))

    def _body(self) -> bytes | None:
        """The request's body, or None once an error has been answered."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            self._reply(411, b"Length Required", "text/plain")
            return None
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 <= length <= _MAX_BODY:
            self.close_connection = True
            self._reply(413 if length > _MAX_BODY else 400, b"Bad Content-Length", "text/plain")
            return None
        return self.rfile.read(length)

    def _reply(
        self, status: int, body: bytes, content_type: str = "application/json; charset=utf-8"
    ) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            # The client gave up (its timeout) before the answer: nothing left to say.
            self.close_connection = True


def start_outbox(
    directory: Path,
    host: str = "127.0.0.1",
    *,
    api_id: str | None = None,
    token: str | None = None,
) -> Outbox:
    """Start the stand-in on a free local port in a background thread; `.stop()` ends it.

    With `api_id` or `token`, requests carrying another one are refused as SMS.ru and the
    Bot API refuse them; without, any non-empty one is accepted."""
    outbox = Outbox(directory, host, api_id=api_id, token=token).start()
    logger.warning(
        "SMS and Telegram messages go to the development stand-in on %s, saved in %s",
        outbox.url,
        directory,
    )
    return outbox


def _sms_error(code: int) -> dict[str, Any]:
    return {"status": "ERROR", "status_code": code, "status_text": SMS_RU_TEXTS[code]}


def _bot_error(code: int, description: str) -> dict[str, Any]:
    return {"ok": False, "error_code": code, "description": description}


def _chat(chat_id: object) -> dict[str, Any] | None:
    """The `chat` of a sent message, or None for an id no chat could have."""
    if isinstance(chat_id, bool):
        return None
    if isinstance(chat_id, int) or (isinstance(chat_id, str) and re.fullmatch(r"-?\d+", chat_id)):
        number = int(chat_id)
        if number == 0:
            return None
        return {"id": number, "type": "private" if number > 0 else "group"}
    if isinstance(chat_id, str) and re.fullmatch(r"@[A-Za-z][A-Za-z0-9_]{4,31}", chat_id):
        # A channel's numeric id is not known here; a stable stand-in for it.
        number = -(10**12) - zlib.crc32(chat_id.lower().encode())
        return {"id": number, "type": "channel", "username": chat_id[1:]}
    return None


def _form(text: str) -> dict[str, Any]:
    return {name: values[0] for name, values in parse_qs(text, keep_blank_values=True).items()}


def _json_bytes(document: object, indent: int | None = None) -> bytes:
    return json.dumps(document, ensure_ascii=False, indent=indent).encode("utf-8")


def _shut(connection: socket.socket) -> None:
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
