"""A loopback TCP proxy between worker and broker that can fail on demand.

proxy = TcpProxy()            # listens on 127.0.0.1:<free port>, forwards to :5672
proxy.cut()                   # drop every open connection, both directions
proxy.stall()                 # keep connections open but forward no bytes
proxy.resume()                # forward again
proxy.refuse()                # close new connections at once
proxy.accept()                # take new connections again
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading

from tests.helpers.broker import HOST, PORT


class TcpProxy:
    def __init__(self, target: tuple[str, int] = (HOST, PORT)) -> None:
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._accepting = threading.Event()
        self._accepting.set()
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self.connections = 0
        self._threads = [threading.Thread(target=self._accept_loop, daemon=True)]
        self._threads[0].start()

    def url(self, vhost_path: str) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/{vhost_path}"

    # -- faults ---------------------------------------------------------------

    def cut(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for client, upstream in pairs:
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def refuse(self) -> None:
        self._accepting.clear()

    def accept(self) -> None:
        self._accepting.set()

    def close(self) -> None:
        self._closed.set()
        self.cut()
        self._flowing.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self._listener.close()

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    # -- plumbing -------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._accepting.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            # Forward each small AMQP frame at once, not after Nagle's ~40 ms.
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._pairs.append((client, upstream))
                self.connections += 1
            pump = threading.Thread(target=self._pump, args=(client, upstream), daemon=True)
            self._threads.append(pump)
            pump.start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        """Copy bytes both ways until either side closes or the pair is cut."""
        peers = {client: upstream, upstream: client}
        try:
            while not self._closed.is_set():
                readable, _, _ = select.select(list(peers), [], [], 0.2)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    # A stall holds the bytes (and so the connection) without a word.
                    while not self._flowing.wait(0.2):
                        if self._closed.is_set():
                            return
                    peers[sock].sendall(data)
        except (OSError, ValueError):
            return  # cut() closed the sockets under us
        finally:
            with self._lock:
                if (client, upstream) in self._pairs:
                    self._pairs.remove((client, upstream))
            client.close()
            upstream.close()


class ConnectionCutter:
    """A thread that drops every proxied connection every `every` seconds."""

    def __init__(self, proxy: TcpProxy, every: float) -> None:
        self._proxy = proxy
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-cutter", daemon=True)
        self.cuts = 0

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            if self._proxy.open_connections:
                self._proxy.cut()
                self.cuts += 1

    def __enter__(self) -> ConnectionCutter:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive(), "the cutter did not stop"
