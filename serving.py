"""How uvicorn serves the app: its httptools protocol with a deadline on request headers.

uvicorn closes a keep-alive connection that stays idle `--timeout-keep-alive` seconds after
a response, but it waits forever for the first request on a new connection and for the rest
of a request's headers: 1,000 idle or slow-loris connections were still held after 45 s.
`GuardedHTTP` gives each request `HTTP_HEADER_TIMEOUT` seconds from its connection (or its
first byte, after a keep-alive pause) to the end of its headers, then closes the connection;
while earlier requests of a pipelined connection are answered, the time does not run out.
The Makefile and the Dockerfile run `uvicorn --http serving:GuardedHTTP`.
"""

import asyncio
import logging
from functools import cache

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from config import Settings

logger = logging.getLogger(__name__)


@cache
def header_timeout() -> float:
    """HTTP_HEADER_TIMEOUT, read once per process."""
    return Settings().http_header_timeout


class GuardedHTTP(HttpToolsProtocol):
    """uvicorn's httptools protocol; a request whose headers do not arrive in time is
    dropped, its connection closed."""

    header_timeout: float | None = None  # None: HTTP_HEADER_TIMEOUT
    _header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_deadline()

    def on_headers_complete(self) -> None:
        self._disarm_header_deadline()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        seconds = self.header_timeout if self.header_timeout is not None else header_timeout()
        self._header_deadline = self.loop.call_later(seconds, self._headers_too_late)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_late(self) -> None:
        self._header_deadline = None
        if (self.cycle is not None and not self.cycle.response_complete) or self.pipeline:
            # Requests ahead of it are still being answered, and uvicorn reads no more
            # meanwhile: the headers' time starts again when they are done.
            self._arm_header_deadline()
            return
        if not self.transport.is_closing():
            logger.debug("closing a connection whose request headers did not arrive in time")
            self.transport.close()
