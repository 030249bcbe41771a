"""The floor: the minimal client with hand-written HTTP/1.1; prints a JSON result.

Like ``minimal_client.py`` (one websocket per server, prompt ids chosen up front,
least-loaded dispatch, at most ``--depth`` prompts per server, no downloads, nothing else),
but ``POST /prompt`` (and ``GET /view`` with ``--download``) is written by hand on one
keep-alive trio socket per server (one request at a time on it; a new connection when the
server says ``Connection: close``), and the websocket is read with comfytrio's own reader
(``comfytrio/_websocket.py``), so this row shows what a Python trio client costs here with no
HTTP library at all.

    .venv/bin/python bench/minimal_raw_client.py --urls http://127.0.0.1:8188

Usually started by ``bench/compare.py`` (library ``minimal-raw``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _workload import emit
from minimal_client import MinimalServer, parse_args, run_minimal

from comfytrio._websocket import websocket_handshake


class RawServer(MinimalServer):
    """The same prompts and events, on sockets we speak to ourselves."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        parts = urlsplit(self.url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.netloc = parts.netloc
        self._streams: list[trio.SocketStream] = []
        self._post: trio.SocketStream | None = None
        self._post_lock = trio.Lock()

    async def connect(self, nursery: trio.Nursery) -> None:
        stream = await trio.open_tcp_stream(self.host, self.port)
        self._streams.append(stream)
        ws = await websocket_handshake(
            stream, self.netloc, f"/ws?clientId={self.client_id}", max_message_size=2**26
        )

        async def read() -> None:
            while True:
                self.handle(await ws.receive_text())

        nursery.start_soon(read)

    async def post_prompt(self, body: dict[str, Any]) -> tuple[int, str]:
        data = json.dumps(body).encode()
        request = (
            b"POST /prompt HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (self.netloc.encode(), len(data))
        ) + data
        status, answer = await self._request(request)
        return status, answer.decode()

    async def view(self, image: dict[str, str]) -> bytes:
        request = b"GET /view?%s HTTP/1.1\r\nHost: %s\r\n\r\n" % (
            urlencode(image).encode(),
            self.netloc.encode(),
        )
        status, answer = await self._request(request)
        if status != 200:
            raise RuntimeError(f"{self.url}: GET /view answered HTTP {status}")
        return answer

    async def _request(self, request: bytes) -> tuple[int, bytes]:
        """One request on the kept-alive socket (Content-Length answers only)."""
        async with self._post_lock:
            if self._post is None:
                self._post = await trio.open_tcp_stream(self.host, self.port)
                self._streams.append(self._post)
            stream = self._post
            await stream.send_all(request)
            buffer = b""
            while (end := buffer.find(b"\r\n\r\n")) < 0:
                buffer += await self._receive(stream)
            head = buffer[:end].split(b"\r\n")
            rest = buffer[end + 4 :]
            headers = dict(line.lower().split(b":", 1) for line in head[1:])
            length = int(headers[b"content-length"])
            while len(rest) < length:
                rest += await self._receive(stream)
            if headers.get(b"connection", b"").strip() == b"close":  # hypercorn: 1000 requests
                self._post = None
            return int(head[0].split(b" ")[1]), rest

    async def _receive(self, stream: trio.SocketStream) -> bytes:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise RuntimeError(f"{self.netloc}: the connection closed mid-response")
        return chunk

    async def aclose(self) -> None:
        await super().aclose()
        for stream in self._streams:
            await stream.aclose()


def main() -> None:
    args = parse_args()
    emit(
        trio.run(run_minimal, "minimal-raw-dl" if args.download else "minimal-raw", args, RawServer)
    )


if __name__ == "__main__":
    main()
