"""Kernel backend: probe for ``netem``/``dualpi2`` and, where both exist, build the path from kernel qdiscs.

The probe tries to add each qdisc to ``lo`` in a scratch namespace and reads the netlink answer (ENOENT =
the kernel lacks it); it never looks at version numbers or kernel configs. The userspace emulator stays
the default whenever the kernel cannot express the requested path exactly:

* trace-driven rates: the kernel shapes at fixed rates only (htb), so a mahimahi trace needs userspace;
* Gilbert–Elliott loss stepped per ms of channel time (identical outages for every scheme): userspace only;
* per-packet logs and pcaps come from the userspace emulator.

Kernel topology (all names carry the run id)::

    <id>-srv  veth --(netem delay/loss up... )-- <id>-rtr --(htb rate -> dualpi2|bfifo)--> veth  <id>-cli

Down direction: netem (delay, iid loss) on the server's veth, rate limit + queue on the router's veth
towards the client; the up direction mirrors it. pyroute2 0.9.7 has no dualpi2 plugin: the qdisc is added
by kind with the kernel defaults, which are the defaults this project uses (Linux 6.18).

This path could not be exercised on the development kernel (it has neither qdisc; the probe says
``userspace`` there), so treat it as unverified until it has run on a kernel with both.
"""

from __future__ import annotations

import contextlib
import errno
from typing import Any

from .emulator import EmulatorConfig
from .loss import IidLoss, NoLoss, parse_loss
from .netns import create_netns, remove_netns
from .trace import parse_rate

_probe_cache: dict[str, bool] | None = None


def probe_qdiscs(run_id: str) -> dict[str, bool]:
    """Which of ``netem`` and ``dualpi2`` the kernel accepts, by trying to add them in a scratch netns."""
    global _probe_cache
    if _probe_cache is not None:
        return dict(_probe_cache)
    from pyroute2 import IPRoute  # type: ignore[import-untyped]  # no stubs, no py.typed
    from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

    ns = f"{run_id}-probe"
    found: dict[str, bool] = {}
    create_netns(ns)
    try:
        with IPRoute(netns=ns, flags=0) as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.link("set", index=lo, state="up")
            for kind in ("netem", "dualpi2"):
                try:
                    ipr.tc("add", kind, index=lo, handle="1:")
                except NetlinkError as exc:
                    if exc.code not in (errno.ENOENT, errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    found[kind] = False
                else:
                    found[kind] = True
                    with contextlib.suppress(NetlinkError):
                        ipr.tc("del", index=lo, handle="1:", parent=0xFFFFFFFF)
    finally:
        remove_netns(ns)
    _probe_cache = dict(found)
    return found


def kernel_can_express(config: EmulatorConfig) -> str | None:
    """None when kernel qdiscs can build exactly this path, else the reason they cannot."""
    for name, d in (("down", config.down), ("up", config.up)):
        if d.trace is not None and parse_rate(d.trace) is None:
            return f"{name} link follows a trace file (kernel shapers are fixed-rate)"
        loss = parse_loss(d.loss)
        if not isinstance(loss, (NoLoss, IidLoss)):
            return f"{name} loss {d.loss!r} is stepped per ms of channel time only by the userspace emulator"
        kind = d.queue.split(":", 1)[0].strip().lower()
        if kind not in ("dualpi2", "droptail"):
            return f"{name} queue {d.queue!r} has no kernel equivalent here"
        if kind == "dualpi2" and ":" in d.queue:
            return "dualpi2 parameters need a pyroute2 plugin (only kernel defaults can be set)"
    if config.log_path or config.pcap_prefix:
        return "per-packet logs and pcaps come from the userspace emulator"
    return None


def choose_backend(config: EmulatorConfig, run_id: str, prefer: str = "auto") -> tuple[str, str]:
    """``("userspace" | "kernel", reason)`` from the probe and what the path needs."""
    if prefer == "userspace":
        return "userspace", "requested"
    found = probe_qdiscs(run_id)
    missing = [k for k, ok in found.items() if not ok]
    if missing:
        reason = "kernel lacks " + ", ".join(missing) + " (probe in a scratch namespace)"
        if prefer == "kernel":
            raise RuntimeError(f"kernel backend requested but {reason}")
        return "userspace", reason
    why_not = kernel_can_express(config)
    if why_not:
        if prefer == "kernel":
            raise RuntimeError(f"kernel backend requested but {why_not}")
        return "userspace", why_not
    return "kernel", "probe found netem and dualpi2"


def build_kernel_path(  # pragma: no cover - needs a kernel with netem and dualpi2
    run_id: str, config: EmulatorConfig, subnets: list[Any]
) -> dict[str, Any]:
    """Create ``<id>-srv``, ``<id>-rtr``, ``<id>-cli`` joined by veths with the qdiscs described above.

    ``subnets`` are two /30 networks (server side, client side). Returns the names and addresses.
    """
    from pyroute2 import IPRoute

    srv, rtr, cli = f"{run_id}-srv", f"{run_id}-rtr", f"{run_id}-cli"
    for ns in (srv, rtr, cli):
        create_netns(ns)
    a_hosts, b_hosts = list(subnets[0].hosts()), list(subnets[1].hosts())
    with IPRoute() as ipr:
        ipr.link("add", ifname=f"{run_id}-a0", kind="veth", peer={"ifname": f"{run_id}-a1", "net_ns_fd": rtr})
        ipr.link("set", index=ipr.link_lookup(ifname=f"{run_id}-a0")[0], net_ns_fd=srv)
        ipr.link("add", ifname=f"{run_id}-b0", kind="veth", peer={"ifname": f"{run_id}-b1", "net_ns_fd": rtr})
        ipr.link("set", index=ipr.link_lookup(ifname=f"{run_id}-b0")[0], net_ns_fd=cli)
    plan = [
        (srv, f"{run_id}-a0", a_hosts[0], a_hosts[1]),
        (rtr, f"{run_id}-a1", a_hosts[1], None),
        (rtr, f"{run_id}-b1", b_hosts[0], None),
        (cli, f"{run_id}-b0", b_hosts[1], b_hosts[0]),
    ]
    for ns, ifname, addr, gw in plan:
        with IPRoute(netns=ns, flags=0) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            idx = ipr.link_lookup(ifname=ifname)[0]
            ipr.addr("add", index=idx, address=str(addr), prefixlen=30)
            ipr.link("set", index=idx, state="up")
            if gw is not None:
                ipr.route("add", dst="0.0.0.0/0", gateway=str(gw))
    from .netns import in_netns

    with in_netns(rtr), open("/proc/sys/net/ipv4/ip_forward", "w") as fh:
        fh.write("1")

    def shape(ns: str, ifname: str, d: Any) -> None:
        with IPRoute(netns=ns, flags=0) as ipr:
            idx = ipr.link_lookup(ifname=ifname)[0]
            bps = parse_rate(d.trace) if d.trace else None
            if bps is not None:
                ipr.tc("add", "htb", index=idx, handle="1:", default=0x10)
                ipr.tc("add-class", "htb", index=idx, handle="1:10", parent="1:", rate=f"{int(bps)}bit",
                       burst=15000)
                parent = "1:10"
            else:
                parent = None
            kind = d.queue.split(":", 1)[0].strip().lower()
            kw: dict[str, Any] = {"index": idx, "handle": "10:"}
            if parent:
                kw["parent"] = parent
            if kind == "dualpi2":
                ipr.tc("add", "dualpi2", **kw)
            else:
                q = dict(p.split("=") for p in d.queue.split(":", 1)[1].split(","))
                if "packets" in q:
                    ipr.tc("add", "pfifo", limit=int(q["packets"]), **kw)
                else:
                    ipr.tc("add", "bfifo", limit=int(q["bytes"]), **kw)

    def delay(ns: str, ifname: str, d: Any) -> None:
        loss = parse_loss(d.loss)
        with IPRoute(netns=ns, flags=0) as ipr:
            idx = ipr.link_lookup(ifname=ifname)[0]
            ipr.tc("add", "netem", index=idx, handle="1:", delay=int(d.delay_ms * 1000),
                   loss=(loss.p * 100 if isinstance(loss, IidLoss) else 0), limit=100000)

    shape(rtr, f"{run_id}-b1", config.down)
    shape(rtr, f"{run_id}-a1", config.up)
    delay(srv, f"{run_id}-a0", config.down)
    delay(cli, f"{run_id}-b0", config.up)
    return {"namespaces": [srv, rtr, cli], "server_addr": str(a_hosts[0]), "client_addr": str(b_hosts[1])}
