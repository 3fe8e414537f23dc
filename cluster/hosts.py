"""Hosts with their own addresses on one machine: one Linux network namespace per host, joined
to a private bridge by a veth pair. Inside its namespace a host has its own loopback (127.0.0.1
there is that host alone) and one address in a private /24; the bridge holds the subnet's first
address, through which the machine's own shell reaches every host. Nothing is routed out.

Needs root and iproute2 (`ip`). Every name carries the network's id, so that stacks, and the
tests' outsider hosts, never touch each other's links.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass

SUBNETS = ipaddress.ip_network("10.213.0.0/16")  # the /24s a stack takes its addresses from


class NamespaceError(RuntimeError):
    """Network namespaces cannot be made here (not root, no iproute2, no kernel support)."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


def check_possible() -> None:
    """NamespaceError naming why network namespaces cannot be made here, else nothing."""
    if os.geteuid() != 0:
        raise NamespaceError("network namespaces need root (this process runs as uid %d)" % os.geteuid())
    if not shutil.which("ip"):
        raise NamespaceError("network namespaces need iproute2's `ip` (apt-get install iproute2)")
    probe = f"rdsprobe{os.getpid()}"
    made = ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        raise NamespaceError(f"`ip netns add` failed: {made.stderr.strip() or 'no reason given'}")
    ip("netns", "del", probe, check=False)


def taken_networks() -> list[ipaddress.IPv4Network]:
    """The IPv4 networks of this machine's addresses and routes."""
    taken = []
    for entry in json.loads(ip("-j", "-4", "addr").stdout or "[]"):
        for a in entry.get("addr_info", []):
            taken.append(ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}").network)
    for route in json.loads(ip("-j", "-4", "route").stdout or "[]"):
        if route["dst"] != "default":
            taken.append(ipaddress.ip_network(route["dst"], strict=False))
    return taken


@dataclass
class Network:
    """A bridge and its /24: the bridge (the machine's own shell) holds .1, host i holds .(i + 2)."""

    id: str
    subnet: str

    @classmethod
    def new(cls) -> Network:
        taken = taken_networks()
        for subnet in SUBNETS.subnets(new_prefix=24):
            if not any(subnet.overlaps(t) for t in taken):
                return cls(secrets.token_hex(2), str(subnet))
        raise NamespaceError(f"every /24 of {SUBNETS} is in use on this machine")

    @property
    def bridge(self) -> str:
        return f"rds{self.id}"

    @property
    def gateway(self) -> str:
        return str(ipaddress.ip_network(self.subnet)[1])

    def namespace(self, i: int) -> str:
        return f"rds{self.id}-h{i}"

    def veth(self, i: int) -> str:
        return f"rds{self.id}v{i}"

    def address(self, i: int) -> str:
        return str(ipaddress.ip_network(self.subnet)[i + 2])

    def to_dict(self) -> dict:
        return asdict(self)

    def create(self) -> None:
        prefix = ipaddress.ip_network(self.subnet).prefixlen
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.gateway}/{prefix}", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    def add_host(self, i: int) -> None:
        """Host i: its namespace, a veth pair whose outer end is on the bridge, its address, lo up."""
        ns, outer, prefix = self.namespace(i), self.veth(i), ipaddress.ip_network(self.subnet).prefixlen
        ip("netns", "add", ns)
        ip("link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("link", "set", outer, "master", self.bridge, "up")
        ip("-n", ns, "addr", "add", f"{self.address(i)}/{prefix}", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", ns, "link", "set", "lo", "up")

    def remove_host(self, i: int) -> None:
        """Kill what runs in host i, delete its veth pair and its namespace."""
        kill_host(self.namespace(i))
        ip("link", "del", self.veth(i), check=False)  # at once; with the namespace it would go a moment later
        ip("netns", "del", self.namespace(i), check=False)

    def remove(self, hosts: int) -> None:
        for i in range(hosts):
            self.remove_host(i)
        ip("link", "del", self.bridge, check=False)

    def leftovers(self, hosts: int) -> list[str]:
        """The namespaces and links of this network that still exist."""
        names = set(ip("netns", "list", check=False).stdout.split())
        left = [self.namespace(i) for i in range(hosts) if self.namespace(i) in names]
        links = [link["ifname"] for link in json.loads(ip("-j", "link", check=False).stdout or "[]")]
        return left + [link for link in links if link.startswith(f"rds{self.id}")]


def in_namespace(ns: str, cmd: list[str]) -> list[str]:
    """`cmd` run inside namespace `ns` (`ip netns exec` execs it: the PID is the command's)."""
    return ["ip", "netns", "exec", ns, *cmd]


def host_pids(ns: str) -> list[int]:
    return [int(pid) for pid in ip("netns", "pids", ns, check=False).stdout.split()]


def kill_host(ns: str, timeout: float = 30) -> None:
    """SIGKILL every process of the host, as a power loss would, until none is left."""
    deadline = time.monotonic() + timeout
    while pids := host_pids(ns):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} of host {ns} outlived SIGKILL for {timeout:.0f} s")
        time.sleep(0.2)
