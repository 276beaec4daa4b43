"""The public port's HTTP protocol: uvicorn's httptools protocol with a deadline on the request
line and headers.

uvicorn times out idle keep-alive connections but not a request whose headers trickle in (or a
connection that sends nothing at all): each such connection was held for ever. Here a request
whose headers are not complete within `HEADER_TIMEOUT_SECS` of its first byte (or of the
connection, for the first request) is answered 408 and closed, as nginx does. Nothing else of
uvicorn's behaviour changes.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HEADER_TIMEOUT_SECS = 20.0
_SAID = b"Request headers not received in time."
REQUEST_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                   b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_SAID), _SAID))


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """httptools' protocol with a header deadline (`header_timeout` seconds)."""

    header_timeout = HEADER_TIMEOUT_SECS
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:  # (the first request's runs from the connection)
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._deadline = self.loop.call_later(self.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.write(REQUEST_TIMEOUT)
            self.transport.close()
