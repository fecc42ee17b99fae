"""Real faults for tests: a TCP link to PostgreSQL that can be cut, servers that accept
and never answer, and the app served by a real uvicorn on a local port."""

import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import uvicorn
from fastapi import FastAPI

from tests.smtpd import free_port


class CuttableLink:
    """A TCP relay to `upstream`. `cut()` drops every open connection and refuses new ones
    until `restore()`: what a client sees of a database restart (cut, then restore at
    once) or of a stopped database (restored later)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.refusing = threading.Event()
        self.deaf = threading.Event()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        # Round trips: how often a client spoke after its server did (or first), on
        # every connection; `_replied` holds the clients whose server spoke last.
        self.turns = 0
        self._replied: set[socket.socket] = set()
        threading.Thread(target=self._accept, name="link-accept", daemon=True).start()

    def cut(self) -> None:
        self.refusing.set()
        with self._lock:
            sockets, self._open = self._open, set()
        for sock in sockets:
            _drop(sock)

    def restore(self) -> None:
        self.refusing.clear()
        self.deaf.clear()

    def lose_replies(self, then_cut_after: float) -> None:
        """From now on the server's replies are lost; the link is cut a moment later. A
        COMMIT sent meanwhile is made, and the client never learns it was."""
        self.deaf.set()
        threading.Timer(then_cut_after, self.cut).start()

    def close(self) -> None:
        self.cut()
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.refusing.is_set():
                _drop(client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                _drop(client)
                continue
            with self._lock:
                self._open |= {client, server}
                self._replied.add(client)
            for source, target, replies in ((client, server, False), (server, client, True)):
                threading.Thread(
                    target=self._pump,
                    args=(source, target, replies, client),
                    name="link-pump",
                    daemon=True,
                ).start()

    def _pump(
        self, source: socket.socket, target: socket.socket, replies: bool, client: socket.socket
    ) -> None:
        try:
            while data := source.recv(65536):
                with self._lock:
                    if replies:
                        self._replied.add(client)
                    elif client in self._replied:
                        self._replied.discard(client)
                        self.turns += 1
                if not (replies and self.deaf.is_set()):
                    target.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open -= {source, target}
            _drop(source)
            _drop(target)


def _drop(sock: socket.socket) -> None:
    # shutdown() wakes a thread blocked in recv() on it; close() alone may not.
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class StallingListener:
    """Accepts TCP connections and never says a word: a stalled server (Redis, PostgreSQL,
    SMTP) as its clients see it. With `hang_up_after`, each connection is dropped that many
    seconds after it was accepted, so a client without a timeout of its own fails late
    instead of never."""

    def __init__(self, *, hang_up_after: float | None = None) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.port: int = self.listener.getsockname()[1]
        self.hang_up_after = hang_up_after
        self.connections: list[socket.socket] = []
        self._closed = False
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="stalling-listener", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                if self._closed:
                    _drop(connection)
                    return
                self.connections.append(connection)
            if self.hang_up_after is not None:
                hang_up = threading.Timer(self.hang_up_after, _drop, (connection,))
                hang_up.daemon = True
                hang_up.start()

    def close(self) -> None:
        """Drop every connection and refuse new ones: each waiting client fails at once."""
        with self._lock:
            self._closed = True
            connections = list(self.connections)
        # shutdown() wakes the thread blocked in accept(); close() alone would leave the
        # socket listening until that accept() returned one more connection.
        _drop(self.listener)
        for connection in connections:
            _drop(connection)


class SilentSMTPServer(StallingListener):
    """Accepts TCP connections and never says a word (not even its greeting)."""


class LiveServer:
    """`app` served by uvicorn in a thread, lifespan included."""

    def __init__(self, app: FastAPI, **options: Any) -> None:
        config = uvicorn.Config(
            app, host="127.0.0.1", port=free_port(), log_config=None, lifespan="on", **options
        )
        self.server = uvicorn.Server(config)
        self.url = f"http://127.0.0.1:{config.port}"
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        wait_for(lambda: self.server.started, 30, "uvicorn to start")
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
