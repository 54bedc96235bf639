"""A TCP proxy on loopback in front of a real server, that a test can cut and restore: while
cut it drops open connections and closes new ones at once, as a server that went away looks
to its clients. While deaf it carries requests to the server but drops the server's answers
and closes the connection: a request carried out whose answer was lost. Real sockets, no
mocks; it serves only 127.0.0.1."""

from __future__ import annotations

import socket
import threading


class CuttableProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.cut_now = threading.Event()
        self.deaf_now = threading.Event()
        self.open: set[socket.socket] = set()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self) -> None:
        with self.lock:  # with `_accept`'s registration under the same lock, no connection slips through
            self.cut_now.set()
            for sock in self.open:
                _close(sock)
            self.open.clear()

    def restore(self) -> None:
        self.cut_now.clear()
        self.deaf_now.clear()

    def deafen(self) -> None:
        """From now on, answers are dropped and their connections closed (`restore` ends it)."""
        self.deaf_now.set()

    def close(self) -> None:
        self.cut()
        _close(self.server)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.cut_now.is_set():
                _close(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _close(client)
                continue
            with self.lock:
                if self.cut_now.is_set():  # cut while this one was connecting upstream
                    _close(client)
                    _close(upstream)
                    continue
                self.open.update((client, upstream))
            for a, b, answers in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pipe, args=(a, b, answers), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, answers: bool) -> None:
        try:
            while data := source.recv(65536):
                if answers and self.deaf_now.is_set():
                    break  # the request was carried out; its answer is lost
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                _close(sock)
                with self.lock:
                    self.open.discard(sock)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
