"""A TCP proxy on loopback that behaves like a WAN link: every byte arrives ``delay``
seconds late in each direction and each direction is capped at ``rate`` bytes/s, shared by
all connections (this kernel has no netem). Counts the bytes it carried.

Usage as a program: wanproxy.py LISTEN_PORT TARGET_PORT [DELAY_MS] [MBIT]
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Link:
    """One direction of the link: a token bucket shared by every connection."""

    rate: float  # bytes per second
    delay: float  # seconds
    carried: int = 0
    _available: float = 0.0
    _last: float = field(default_factory=time.monotonic)
    _lock: asyncio.Lock | None = None

    async def send_slot(self, nbytes: int) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            now = time.monotonic()
            self._available = min(
                self._available + (now - self._last) * self.rate, self.rate * 0.05
            )
            self._last = now
            self._available -= nbytes
            if self._available < 0:
                await asyncio.sleep(-self._available / self.rate)
        self.carried += nbytes


class WanProxy:
    def __init__(
        self, listen_port: int, target_port: int, delay: float = 0.025, rate: float = 100e6 / 8
    ) -> None:
        self.listen_port = listen_port
        self.target_port = target_port
        self.down = Link(rate, delay)  # server -> client
        self.up = Link(rate, delay)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link
    ) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def receive() -> None:
            while data := await reader.read(64 << 10):
                await queue.put((time.monotonic() + link.delay, data))
            await queue.put((time.monotonic() + link.delay, b""))

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                await link.send_slot(len(data))
                writer.write(data)
                await writer.drain()
            writer.close()

        try:
            await asyncio.gather(receive(), deliver())
        except (ConnectionError, asyncio.CancelledError):
            writer.close()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(
            self._pipe(client_r, server_w, self.up),
            self._pipe(server_r, client_w, self.down),
            return_exceptions=True,
        )

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", self.listen_port)
        self._ready.set()
        async with server:
            await self._stop.wait()
        # connections still open (a client's pooled ones) end with the proxy, quietly
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: None)
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def start(self) -> WanProxy:
        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._main())

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread:
            self._thread.join(10)


if __name__ == "__main__":
    listen, target = int(sys.argv[1]), int(sys.argv[2])
    delay = float(sys.argv[3]) / 1000 if len(sys.argv) > 3 else 0.025
    mbit = float(sys.argv[4]) if len(sys.argv) > 4 else 100
    proxy = WanProxy(listen, target, delay, mbit * 1e6 / 8).start()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        proxy.stop()
