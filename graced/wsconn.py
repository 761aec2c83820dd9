"""The server side of a WebSocket connection: trio-websocket's, failing a connection on a
frame it cannot parse with a close frame that says why.

RFC 6455 (7.1.7, 8.1) says an endpoint that fails a connection, for example on a text
frame that is not UTF-8, should send a close frame with the reason's code (1007) first.
wsproto reports such a failure as a ``CloseConnection`` event while the connection is
still open (no close frame came from the peer), and trio-websocket's server then closes
the TCP stream without sending one. :class:`Connection` sends it first. Only that case
meets the connection still open: a close the peer sent moves it to REMOTE_CLOSING first.

This leans on two of trio-websocket's private methods (``_reader_task``,
``_get_request``, as its own ``wrap_server_stream`` does); tests/test_fuzz_e2e.py
checks the 1007 on every run, so a trio-websocket that changes them fails there.
"""

from __future__ import annotations

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection


class Connection(WebSocketConnection):
    """A server connection that says why it fails a connection (1007, 1002...), and
    whose handshake ends when the peer goes away before finishing it."""

    async def _get_request(self) -> WebSocketRequest:
        """trio-websocket waits for the handshake even after the peer closed its side (it
        then holds a connection slot until graced's handshake deadline): here the wait
        ends with ConnectionClosed as soon as the connection is gone."""
        got: list[WebSocketRequest] = []
        async with trio.open_nursery() as nursery:
            async def proposal() -> None:
                got.append(await WebSocketConnection._get_request(self))
                nursery.cancel_scope.cancel()

            async def gone() -> None:
                await self._close_handshake.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(proposal)
            nursery.start_soon(gone)
        if not got:
            raise ConnectionClosed(self._close_reason)
        return got[0]

    async def _handle_close_connection_event(self, event: CloseConnection) -> None:
        if self.is_server and self._wsproto.state == ConnectionState.OPEN:
            # A parse failure (the peer sent no close): tell it why, then close.
            try:
                await self._send(CloseConnection(code=event.code, reason=event.reason))
            except ConnectionClosed:
                pass
        await super()._handle_close_connection_event(event)


async def wrap_server_stream(nursery: trio.Nursery, stream: trio.abc.Stream, *,
                             message_queue_size: int, max_message_size: int
                             ) -> WebSocketRequest:
    """As ``trio_websocket.wrap_server_stream``, with a :class:`Connection`."""
    connection = Connection(stream, WSConnection(ConnectionType.SERVER),
                            message_queue_size=message_queue_size,
                            max_message_size=max_message_size)
    nursery.start_soon(connection._reader_task)
    return await connection._get_request()
