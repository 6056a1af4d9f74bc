"""Every listening TCP socket of a process tree, read from /proc (what `ss -ltnp` shows, without root)."""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

TCP_LISTEN = "0A"


@dataclass(frozen=True)
class Listener:
    """One listening socket: address, port, and the process holding it."""

    ip: str
    port: int
    pid: int
    process: str

    @property
    def on_loopback(self) -> bool:
        address = ipaddress.ip_address(self.ip)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # gRPC's dual-stack socket bound to ::ffff:127.0.0.1
        return address.is_loopback


def process_tree(root_pid: int) -> list[int]:
    """root_pid and all its descendants (Ray's GCS, raylet, agents and workers descend from the driver)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _decode_address(hex_ip: str) -> str:
    raw = bytes.fromhex(hex_ip)
    # /proc/net/tcp* prints each 32-bit word in host (little-endian) order.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, words)


def _listening_inodes() -> dict[int, tuple[str, int]]:
    inodes: dict[int, tuple[str, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == TCP_LISTEN:
                hex_ip, hex_port = fields[1].split(":")
                inodes[int(fields[9])] = (_decode_address(hex_ip), int(hex_port, 16))
    return inodes


def listeners_of_tree(root_pid: int) -> list[Listener]:
    """Every TCP listener held by root_pid or a descendant."""
    inodes = _listening_inodes()
    found = []
    for pid in process_tree(root_pid):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # the process ended meanwhile
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and int(target[8:-1]) in inodes:
                ip, port = inodes[int(target[8:-1])]
                found.append(Listener(ip, port, pid, name))
    return sorted(set(found), key=lambda listener: (listener.process, listener.port))


def ports_on_the_network() -> set[int]:
    """Ports some process of this machine (any user, any tree) listens on beyond loopback."""
    return {port for ip, port in _listening_inodes().values() if not Listener(ip, port, 0, "").on_loopback}


def lan_address() -> str | None:
    """This machine's address towards the network (no packet sent), or None when it has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: only the routing decision is made
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if ipaddress.ip_address(address).is_loopback else address
