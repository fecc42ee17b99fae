"""Connections that send nothing, or their headers a byte at a time, are closed: after
HTTP_HEADER_TIMEOUT before a request's headers are in, after --timeout-keep-alive once a
response is sent (a real uvicorn serving the app with serving.GuardedHTTP)."""

import socket
import time
from collections.abc import Callable, Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from serving import GuardedHTTP
from tests.faults import LiveServer

IDLE = 200
HEADER_TIMEOUT = 0.5
KEEP_ALIVE = 1


class QuickGuardedHTTP(GuardedHTTP):
    header_timeout = HEADER_TIMEOUT


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
