"""A Unix-socket client that connects, hands its socket to a child and exits.

Run as ``python handoff.py SOCKET REQUEST_JSON``. The parent does the WebSocket
handshake, forks, prints its own pid (the pid SO_PEERCRED recorded) and exits; the
child keeps the connection, waits for a line on stdin, then sends REQUEST_JSON and
prints the daemon's reply frame. Plain blocking sockets and wsproto, so it can fork.
"""

from __future__ import annotations

import os
import socket
import sys

from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Message, Request, TextMessage


def _events(sock: socket.socket, ws: WSConnection):  # type: ignore[no-untyped-def]
    while True:
        data = sock.recv(65536)
        ws.receive_data(data or None)
        yield from ws.events()
        if not data:
            return


def main() -> None:
    path, request = sys.argv[1], sys.argv[2]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    ws = WSConnection(ConnectionType.CLIENT)
    sock.sendall(ws.send(Request(host="localhost", target="/")))
    for event in _events(sock, ws):
        if isinstance(event, AcceptConnection):
            break
    if os.fork():
        print(os.getpid(), flush=True)
        os._exit(0)
    sys.stdin.readline()
    sock.sendall(ws.send(Message(data=request)))
    text = ""
    for event in _events(sock, ws):
        if isinstance(event, TextMessage):
            text += event.data
            if event.message_finished and '"type":"response"' in text.replace(" ", ""):
                break
            if event.message_finished:
                text = ""
        elif isinstance(event, CloseConnection):
            break
    print(text, flush=True)


if __name__ == "__main__":
    main()
