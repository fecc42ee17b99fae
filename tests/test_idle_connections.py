"""Connections that send nothing, or their headers a byte at a time, are closed: after
HTTP_HEADER_TIMEOUT before a request's headers are in, after --timeout-keep-alive once a
response is sent (a real uvicorn serving the app with serving.GuardedHTTP)."""

import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from serving import GuardedHTTP
from tests.conftest import AUTH, BOOKING
from tests.faults import LiveServer
from tests.smtpd import ScriptedHandler

IDLE = 200
HEADER_TIMEOUT = 0.5
KEEP_ALIVE = 1


class QuickGuardedHTTP(GuardedHTTP):
    header_timeout = HEADER_TIMEOUT
    # Set each time a request's header deadline is reached (whatever then happens).
    deadline_reached = threading.Event()

    def _headers_too_late(self) -> None:
        self.deadline_reached.set()
        super()._headers_too_late()


@pytest.fixture
def server(make_client: Callable[..., TestClient]) -> Iterator[LiveServer]:
    app = make_client(worker_in_api=False).app
    assert isinstance(app, FastAPI)
    with LiveServer(app, http=QuickGuardedHTTP, timeout_keep_alive=KEEP_ALIVE) as live:
        yield live


def connect(live: LiveServer) -> socket.socket:
    port = int(live.url.rpartition(":")[2])
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return sock


def closed_by_server(sock: socket.socket, deadline: float) -> bool:
    """Whether the server closes `sock` before `deadline` (time.monotonic())."""
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        while data := sock.recv(65536):
            del data  # a response, or an error page: keep reading until the close
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


def test_idle_and_slow_connections_are_closed(server: LiveServer) -> None:
    silent = [connect(server) for _ in range(IDLE // 2)]
    slow = [connect(server) for _ in range(IDLE // 2)]
    for sock in slow:  # a slow-loris: headers begun, never finished
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    answered = connect(server)
    answered.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answered.recv(65536).startswith(b"HTTP/1.1 200")
    started = time.monotonic()

    deadline = started + 10 * (HEADER_TIMEOUT + KEEP_ALIVE)
    still_open = [sock for sock in silent + slow if not closed_by_server(sock, deadline)]
    assert still_open == []
    assert closed_by_server(answered, deadline), "an idle keep-alive connection is closed too"
    for sock in [*silent, *slow, answered]:
        sock.close()


def test_a_request_in_time_is_answered_and_kept_alive(server: LiveServer) -> None:
    sock = connect(server)
    for _ in range(3):  # three requests on one connection, each well within the timeouts
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    sock.close()


def test_a_pipelined_request_waiting_behind_a_slow_one_is_not_cut_off(
    server: LiveServer, smtp: ScriptedHandler
) -> None:
    body = json.dumps(BOOKING).encode()
    slow = (
        b"POST /notify/email HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: {AUTH['Authorization']}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    quick = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    smtp.gate = threading.Event()  # the first request's mail is held at DATA
    QuickGuardedHTTP.deadline_reached.clear()
    sock = connect(server)

    sock.sendall(slow + quick + b"GET /healthz HTTP/1.1\r\n")  # the third: headers begun
    assert smtp.data_started.wait(10), "the first request never reached SMTP"
    assert QuickGuardedHTTP.deadline_reached.wait(10), "no header deadline passed"
    sock.sendall(b"Host: x\r\n\r\n")
    smtp.gate.set()

    received = b""
    sock.settimeout(10)
    while received.count(b"HTTP/1.1 ") < 3 and (data := sock.recv(65536)):
        received += data
    sock.close()
    # Each response's status line; a body is not followed by a line break.
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", received) == [b"201", b"200", b"200"]
