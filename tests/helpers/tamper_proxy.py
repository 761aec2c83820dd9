"""A WebSocket man-in-the-middle between gracectl and graced, for tests.

    python -m tests.helpers.tamper_proxy LISTEN_SOCKET UPSTREAM_SOCKET MODE SEQ

Forwards requests verbatim and frames back, except that it tampers with the event
whose seq is SEQ, by MODE:
  none     forward everything unchanged
  forge    replace the signature with one made by another key over the same bytes
  alter    change the payload, keep the original signature
  drop     leave the event out
  swap     send event SEQ+1 before event SEQ
  replay   send event SEQ again after SEQ+1
  cut      stop forwarding anything after SEQ, but keep the connection open
  close    close the connection abruptly after SEQ
  withhold pass responses and notices, never an event (SEQ is ignored)
  delay    pass responses at once, every event SEQ seconds late (a constant delay)
Prints "ready" on stdout once listening.
"""

from __future__ import annotations

import json
import math
import sys
from contextlib import suppress

import nacl.signing
import trio
import trio_websocket
from trio_websocket import ConnectionClosed

from graced.protocol import canonical_text, signing_bytes
from graced.protocol.signing import b64


def tamper_frames(frames: list[str], mode: str, target: int, state: dict) -> list[str]:
    out: list[str] = []
    for text in frames:
        if state.get("cut"):
            return out
        try:
            obj = json.loads(text)
        except ValueError:
            out.append(text)
            continue
        seq = obj.get("seq") if isinstance(obj, dict) and "type" not in obj else None
        if mode == "drop-head" and isinstance(seq, int) and seq < target:
            continue  # every event before the target: the head of the stream is withheld
        if seq == target:
            if mode == "forge":
                other = nacl.signing.SigningKey.generate()
                obj["sig"] = b64(other.sign(signing_bytes(obj)).signature)
                text = canonical_text(obj)
            elif mode == "alter":
                obj["payload"] = {"tampered": True}
                text = canonical_text(obj)
            elif mode == "drop":
                continue
            elif mode == "swap":
                state["held"] = text
                continue
            elif mode == "replay":
                state["replay"] = text
            elif mode in ("cut", "close"):
                out.append(text)
                state["cut"] = True
                return out
        out.append(text)
        if seq == target + 1:
            if "held" in state:
                out.append(state.pop("held"))
            if "replay" in state:
                out.append(state.pop("replay"))
    return out


async def handle(stream: trio.SocketStream, upstream_path: str, mode: str, target: int) -> None:
    async with trio.open_nursery() as nursery:
        request = await trio_websocket.wrap_server_stream(nursery, stream)
        down = await request.accept()
        up_stream = await trio.open_unix_socket(upstream_path)
        up = await trio_websocket.wrap_client_stream(nursery, up_stream, "localhost", "/")
        state: dict = {}
        closed = trio.Event()

        async def client_to_daemon() -> None:
            try:
                while True:
                    await up.send_message(await down.get_message())
            except ConnectionClosed:
                closed.set()

        late_in, late_out = trio.open_memory_channel[tuple[float, str]](math.inf)

        async def later() -> None:  # one sender: the delayed events keep their order
            async for due, frame in late_out:
                await trio.sleep_until(due)
                with suppress(ConnectionClosed):
                    await down.send_message(frame)

        async def daemon_to_client() -> None:
            try:
                while True:
                    message = await up.get_message()
                    assert isinstance(message, str)
                    if mode in ("withhold", "delay"):
                        for frame in message.split("\n"):
                            if "type" in json.loads(frame):  # a response or a notice
                                await down.send_message(frame)
                            elif mode == "delay":
                                late_in.send_nowait((trio.current_time() + target, frame))
                        continue
                    for frame in tamper_frames(message.split("\n"), mode, target, state):
                        await down.send_message(frame)
                    if state.get("cut"):
                        if mode == "close":
                            await stream.aclose()
                            closed.set()
                            return
                        await trio.sleep_forever()
            except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
                closed.set()

        if mode == "delay":
            nursery.start_soon(later)
        nursery.start_soon(client_to_daemon)
        nursery.start_soon(daemon_to_client)
        await closed.wait()
        nursery.cancel_scope.cancel()


async def main(listen: str, upstream: str, mode: str, target: int) -> None:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(listen)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    print("ready", flush=True)
    await trio.serve_listeners(
        lambda s: handle(s, upstream, mode, target), [listener]
    )


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
