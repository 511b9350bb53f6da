"""A TCP proxy on 127.0.0.1 for network faults: forward to a target port,
`freeze()` (connections stay open, nothing passes either way: a frozen
network path, as a partition looks to both ends), `thaw()`, `retarget()` new
connections elsewhere, and `cut()` the current ones (a load balancer moving
clients to another backend)."""

from __future__ import annotations

import selectors
import socket
import threading

from testkit.timing import limit


class TcpProxy:
    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.frozen = threading.Event()
        self.lock = threading.Lock()
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.closing = False
        self.thread = threading.Thread(target=self._run, name=f"tcpproxy-{self.port}", daemon=True)
        self.thread.start()

    def freeze(self) -> None:
        self.frozen.set()

    def thaw(self) -> None:
        self.frozen.clear()

    def retarget(self, port: int) -> None:
        self.target_port = port

    def cut(self) -> None:
        """Closes every current connection (new ones go to the current target)."""
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for a, b in pairs:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.closing = True
        self.thread.join(limit(5))
        self.cut()
        self.listener.close()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ)
        registered: set[socket.socket] = set()
        while not self.closing:
            with self.lock:
                live = {s for pair in self.pairs for s in pair}
                peers = {a: b for a, b in self.pairs} | {b: a for a, b in self.pairs}
            # Closed by cut(): forget them.
            for s in registered - live:
                try:
                    sel.unregister(s)
                except (KeyError, ValueError, OSError):
                    pass
            registered &= live
            if not self.frozen.is_set():
                for s in live - registered:
                    try:
                        sel.register(s, selectors.EVENT_READ)
                        registered.add(s)
                    except (ValueError, OSError):
                        pass
            else:
                for s in list(registered):
                    try:
                        sel.unregister(s)
                    except (KeyError, ValueError, OSError):
                        pass
                registered.clear()
            for key, _ in sel.select(timeout=0.05):
                s = key.fileobj
                if s is self.listener:
                    self._accept()
                    continue
                peer = peers.get(s)
                try:
                    data = s.recv(65536)
                except OSError:
                    data = b""
                if not data or peer is None:
                    self._drop(s)
                    continue
                try:
                    peer.sendall(data)
                except OSError:
                    self._drop(s)
        sel.close()

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=1)
        except OSError:
            client.close()
            return
        for s in (client, upstream):
            s.setblocking(True)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.lock:
            self.pairs.append((client, upstream))

    def _drop(self, s: socket.socket) -> None:
        with self.lock:
            keep = []
            for a, b in self.pairs:
                if s in (a, b):
                    for x in (a, b):
                        try:
                            x.close()
                        except OSError:
                            pass
                else:
                    keep.append((a, b))
            self.pairs = keep
