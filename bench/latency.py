"""A TCP proxy on 127.0.0.1 that adds a network's round trips, not its bandwidth limit.

Every byte is delayed by half the round-trip time in each direction, and each new
connection by one round trip (the TCP handshake), so a sender's round trips cost what
they would to a remote archive while the loopback's bandwidth stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from types import TracebackType

CHUNK = 1 << 16


class DelayProxy:
    """Forwards connections to ``target()``'s address after ``rtt`` seconds of delay."""

    def __init__(self, rtt: float) -> None:
        self.rtt = rtt
        self.upstream = ("127.0.0.1", 0)
        self._loop = asyncio.new_event_loop()
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0)
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def target(self, host: str, port: int) -> str:
        """Forward to ``host:port`` from now on; the proxy's own http:// address."""
        self.upstream = (host, port)
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(self.rtt)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy ``reader`` to ``writer``, each chunk half a round trip after it came."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def deliver() -> None:
            with contextlib.suppress(ConnectionError):
                while (item := await queue.get())[1]:
                    await asyncio.sleep(max(0.0, item[0] - loop.time()))
                    writer.write(item[1])
                    await writer.drain()
            writer.close()

        task = asyncio.create_task(deliver())
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(CHUNK):
                queue.put_nowait((loop.time() + self.rtt / 2, chunk))
        queue.put_nowait((loop.time() + self.rtt / 2, b""))
        await task

    def close(self) -> None:
        self._server.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self) -> DelayProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
