"""Free ports for the servers the tests and benches start on 127.0.0.1."""

from __future__ import annotations

import random
import socket
from pathlib import Path


def _ephemeral_start() -> int:
    """Where the kernel's ephemeral ports begin (what it gives `bind(0)` and every outgoing
    connection); 32768 when it cannot be read."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, below the ephemeral range.

    A port from `bind(0)` is an ephemeral one, which the kernel may give to any other socket
    before the server binds it: a Ray cluster opens hundreds of connections while it starts,
    and the gRPC front door binds only once its ingress replica runs (a clean-clone run lost
    that race once). Below the range, nothing takes a port unasked."""
    high = max(_ephemeral_start() - 1, 11000)
    for _ in range(200):
        port = random.randint(10000, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")
