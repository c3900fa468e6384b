"""A msgpack message channel over one TCP connection (control messages of two-sided media).

Blocking sends; receives with a timeout. EOF or a socket error raises ``ChannelClosed``, which
is how a peer's death shows up (the kernel closes its sockets when it dies).
"""
from __future__ import annotations

import select
import socket
import threading

import msgpack


class ChannelClosed(ConnectionError):
    pass


class Channel:
    def __init__(self, sock: socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self._unpacker = msgpack.Unpacker(raw=False)
        self._send_lock = threading.Lock()
        self.closed = False

    @classmethod
    def connect(cls, host: str, port: int, timeout: float) -> "Channel":
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.settimeout(None)
        return cls(sock)

    def send(self, msg) -> None:
        data = msgpack.packb(msg, use_bin_type=True)
        try:
            with self._send_lock:
                self.sock.sendall(data)
        except OSError as e:
            raise ChannelClosed(f"control connection lost: {e}") from e

    def recv(self, timeout: float | None = None):
        """The next message; None if none arrived within ``timeout`` (None: wait forever)."""
        for msg in self._unpacker:
            return msg
        while True:
            try:
                if timeout is not None and not select.select([self.sock], [], [], timeout)[0]:
                    return None
                data = self.sock.recv(1 << 16)
            except (OSError, ValueError) as e:  # ValueError: closed by another thread
                raise ChannelClosed(f"control connection lost: {e}") from e
            if not data:
                raise ChannelClosed("control connection closed by the peer")
            self._unpacker.feed(data)
            for msg in self._unpacker:
                return msg
            timeout = 0 if timeout is not None else None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
