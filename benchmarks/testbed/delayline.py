"""A delay line between two namespaces: one-way latency for a host pair, without tc netem.

This machine's kernel has no netem (CONFIG_NET_SCH_NETEM is not set), so a pair that needs a
latency takes a path of its own: each of its two hosts gets a tun device and a /32 route to the
other host's address through it, and this process carries packets between the two tun devices,
holding each one for the pair's latency. The pair's rate is shaped on each tun's egress (tc),
before the packet reaches the delay line, so rate and latency combine as on a long link.
The tun MTU is large (9000) so that the process moves few packets per second.

Run as `python delayline.py SPEC_JSON`: SPEC_JSON is a list of
`{"a": NETNS, "a_dev": TUN, "b": NETNS, "b_dev": TUN, "delay_s": SECONDS}`; the tun devices
must exist (`ip tuntap add`). It prints `ready` once every device is open and runs until
killed. Standalone on purpose (standard library only): it starts fast and imports nothing of pdv.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import heapq
import json
import os
import select
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
CLONE_NEWNET = 0x40000000
MAX_PACKET = 65536

_libc = ctypes.CDLL(None, use_errno=True)


def _enter(ns_fd: int) -> None:
    if _libc.setns(ns_fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def open_tun(netns: str, dev: str) -> int:
    """Attach to tun device `dev` of namespace `netns` (non-blocking fd); stays in `netns`."""
    with open(f"/var/run/netns/{netns}") as f:
        _enter(f.fileno())
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", dev.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def serve(routes: dict[int, tuple[int, float]]) -> None:
    """Forever: a packet read from fd k is written to routes[k][0] after routes[k][1] seconds."""
    due: list[tuple[float, int, int, bytes]] = []  # (time, arrival order, out fd, packet)
    order = 0
    while True:
        timeout = max(0.0, due[0][0] - time.monotonic()) if due else None
        readable, _, _ = select.select(list(routes), [], [], timeout)
        now = time.monotonic()
        for fd in readable:
            out, delay = routes[fd]
            while True:
                try:
                    packet = os.read(fd, MAX_PACKET)
                except BlockingIOError:
                    break
                heapq.heappush(due, (now + delay, order, out, packet))
                order += 1
        now = time.monotonic()
        while due and due[0][0] <= now:
            _, _, out, packet = heapq.heappop(due)
            # A full tun queue drops the packet, as a wire would; TCP resends it.
            with contextlib.suppress(OSError):
                os.write(out, packet)


def main(argv: list[str]) -> int:
    """Open every pair's tun devices, say `ready`, then carry packets until killed."""
    spec = json.loads(argv[0])
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    routes: dict[int, tuple[int, float]] = {}
    for pair in spec:
        a, b = open_tun(pair["a"], pair["a_dev"]), open_tun(pair["b"], pair["b_dev"])
        routes[a] = (b, float(pair["delay_s"]))
        routes[b] = (a, float(pair["delay_s"]))
    _enter(home)  # hold no testbed namespace open: they must go when the testbed deletes them
    print("ready", flush=True)
    serve(routes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
