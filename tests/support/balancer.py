"""A TCP load balancer, as a Kubernetes Service is one: each new connection goes to the first
backend that is ready (``GET /readyz`` answers 200), and stays there. A draining node stops
being ready, so reconnecting clients land on another node."""

from __future__ import annotations

import contextlib
import socket
import threading
import urllib.error
import urllib.request

from tests.support.harness import free_port


class Balancer:
    def __init__(self, backends: list[str]) -> None:
        self.backends = backends  # base URLs: http://127.0.0.1:PORT
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.routed: list[str] = []  # the backend each connection went to
        self._listening = socket.create_server(("127.0.0.1", self.port), backlog=128)
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _ready(self) -> str | None:
        for url in self.backends:
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        return url
            except (OSError, urllib.error.URLError):
                continue
        return None

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listening.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        url = self._ready()
        if url is None:
            conn.close()
            return
        self.routed.append(url)
        host, port = url.removeprefix("http://").split(":")
        try:
            upstream = socket.create_connection((host, int(port)), timeout=5)
        except OSError:
            conn.close()
            return
        upstream.settimeout(None)
        for a, b in ((conn, upstream), (upstream, conn)):
            threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self._closed = True
        self._listening.close()
