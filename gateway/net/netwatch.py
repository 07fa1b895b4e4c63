"""Where `InterfaceState` comes from: rtnetlink events on Linux, netifaces polling elsewhere.

Netlink tells us about a change the moment the kernel makes it, which the 2-second promise
to phones needs; netifaces (archived, no wheels) is only the fallback where netlink does not
exist, such as a developer's Mac, and is never picked where netlink works. The SSID of Wi-Fi
interfaces comes from nl80211 and is simply unknown where nl80211 is absent.

`python -m gateway.net.netwatch [--backend netlink|netifaces] [--watch]` prints the state.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import contextlib
import fcntl
import importlib.util
import ipaddress
import json
import logging
import socket
import struct
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.net.ifstate import InterfaceState

log = logging.getLogger("lpgw.net")

NETLINK, NETIFACES = "netlink", "netifaces"

IFF_UP, IFF_LOOPBACK, IFF_RUNNING = 0x1, 0x8, 0x40
IFA_F_DADFAILED, IFA_F_TENTATIVE = 0x08, 0x40  # not usable: the kernel will not bind them
# SIOCGIFFLAGS: Linux's number, and BSD's/macOS's _IOWR('i', 17, struct ifreq)
SIOCGIFFLAGS = 0x8913 if sys.platform.startswith("linux") else 0xC0206911


def choose_backend(platform: str, have_pyroute2: bool, have_netifaces: bool,
                   forced: str | None = None) -> str:
    """netlink wherever it can work; netifaces only where it cannot (or when forced)."""
    if forced is not None:
        if forced not in (NETLINK, NETIFACES):
            raise ValueError(f"unknown interface backend {forced!r}")
        return forced
    if platform.startswith("linux") and have_pyroute2:
        return NETLINK
    if have_netifaces:
        return NETIFACES
    raise RuntimeError("cannot track interfaces: neither netlink (pyroute2 on Linux) nor "
                       "netifaces is available (pip install 'lpgw[fallback]')")


class Watcher(abc.ABC):
    """Holds the latest state and wakes one waiter whenever it changes."""

    backend = ""

    def __init__(self) -> None:
        self.state = InterfaceState()
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def _publish(self, state: InterfaceState) -> None:
        if state != self.state:
            self.state = state
            self._changed.set()

    async def changed(self) -> InterfaceState:
        """Wait for the next change (returns at once if one came since the last call)."""
        await self._changed.wait()
        self._changed.clear()
        return self.state

    @abc.abstractmethod
    async def start(self) -> None:
        """Fill `state` and begin watching; raises if this backend cannot work here."""

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()


# --- netlink ---------------------------------------------------------------------------


class NetlinkWatcher(Watcher):
    backend = NETLINK
    RESYNC = 60.0  # read everything again this often: the kernel drops events when pressed

    def __init__(self, wifi_refresh: float = 2.0) -> None:
        super().__init__()
        self.wifi_refresh = wifi_refresh
        self._events: Any = None
        self._wifi: dict[int, str | None] | None = None
        self._poke = asyncio.Event()
        self._lost = False  # events were lost: read everything again

    async def start(self) -> None:
        from pyroute2 import AsyncIPRoute
        from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR, RTMGRP_LINK

        # subscribe before the dump, so nothing that happens in between is missed
        self._events = AsyncIPRoute()
        try:
            await self._events.bind(groups=RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR)
            self.state = await self._dump()
        except BaseException:
            self._events.close()
            self._events = None
            raise
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._refresh())]

    async def _dump(self) -> InterfaceState:
        from pyroute2 import AsyncIPRoute

        state = InterfaceState()
        async with AsyncIPRoute() as ipr:
            async for msg in await ipr.link("dump"):
                state = apply_message(state, msg)
            async for msg in await ipr.addr("dump"):
                state = apply_message(state, msg)
        self._wifi = await wifi_ssids()
        return state.with_wifi(self._wifi or {})

    async def _read(self) -> None:
        while True:
            try:
                batch = [msg async for msg in self._events.get()]  # one receive per call
            except Exception as exc:  # e.g. ENOBUFS: events were lost
                log.warning("netlink events failed (%s): reading the interfaces again", exc)
                self._lost = True
                self._poke.set()
                await asyncio.sleep(0.5)
                continue
            state = self.state
            for msg in batch:
                state = apply_message(state, msg)
                if msg.get("event") == "RTM_NEWLINK":
                    self._poke.set()  # Wi-Fi (dis)association shows as a link change
            self._publish(state.with_wifi(self._wifi or {}))

    async def _refresh(self) -> None:
        """SSIDs after link events, and every `wifi_refresh` s while there is Wi-Fi;
        everything every RESYNC s, and at once after lost events."""
        loop = asyncio.get_running_loop()
        resync_at = loop.time() + self.RESYNC
        while True:
            timeout = min(self.wifi_refresh if self._wifi else self.RESYNC,
                          max(resync_at - loop.time(), 0))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), timeout)
            self._poke.clear()
            try:
                if self._lost or loop.time() >= resync_at:
                    self._lost, resync_at = False, loop.time() + self.RESYNC
                    self._publish(await self._dump())
                else:
                    self._wifi = await wifi_ssids()
                    self._publish(self.state.with_wifi(self._wifi or {}))
            except Exception as exc:
                log.warning("reading the interfaces failed: %s", exc)

    async def close(self) -> None:
        await super().close()
        if self._events is not None:
            self._events.close()
            self._events = None


class ThreadedWatcher(Watcher):
    """Another watcher, run on a plain asyncio loop in a thread of its own.

    pyroute2 opens its netlink sockets with `create_datagram_endpoint`, which uvloop (the
    gateway's loop) refuses for AF_NETLINK ("cannot open a UDP handle, invalid family 16"):
    on uvloop the netlink watcher could not start, and the gateway fell back to polling,
    seeing a change ~1 s late instead of ~0.1 s. Its states come back to the caller's loop.
    """

    def __init__(self, make: Callable[[], Watcher]) -> None:
        super().__init__()
        self._make = make
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        main = asyncio.get_running_loop()
        started: asyncio.Future = main.create_future()

        def run() -> None:
            loop = asyncio.SelectorEventLoop()  # not uvloop: see above
            self._loop = loop
            try:
                loop.run_until_complete(self._watch(main, started))
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="lpgw-netwatch", daemon=True)
        self._thread.start()
        await started

    async def _watch(self, main: asyncio.AbstractEventLoop, started: asyncio.Future) -> None:
        inner = self._make()
        try:
            await inner.start()
        except BaseException as exc:
            main.call_soon_threadsafe(_settle, started, exc)
            return
        self._task = asyncio.current_task()
        main.call_soon_threadsafe(self._started, inner, started)
        try:
            while True:
                state = await inner.changed()
                main.call_soon_threadsafe(self._publish, state)
        except asyncio.CancelledError:
            pass
        finally:
            await inner.close()

    def _started(self, inner: Watcher, started: asyncio.Future) -> None:
        self.backend = inner.backend
        self.state = inner.state
        _settle(started, None)

    async def close(self) -> None:
        if self._loop is not None and self._task is not None:
            with contextlib.suppress(RuntimeError):  # its loop already closed
                self._loop.call_soon_threadsafe(self._task.cancel)
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10)
            self._thread = None


def _settle(future: asyncio.Future, exc: BaseException | None) -> None:
    if not future.done():
        if exc is None:
            future.set_result(None)
        else:
            future.set_exception(exc)


def apply_message(state: InterfaceState, msg: Any) -> InterfaceState:
    """One rtnetlink message (link or address, new or deleted) applied to the state."""
    event = msg.get("event")
    index = msg.get("index")
    if event in ("RTM_NEWLINK", "RTM_DELLINK"):
        if event == "RTM_DELLINK":
            return state.without_link(index)
        flags = msg.get("flags") or 0
        return state.with_link(index, msg.get("ifname") or f"if{index}",
                               up=bool(flags & IFF_UP and flags & IFF_RUNNING),
                               loopback=bool(flags & IFF_LOOPBACK))
    if event in ("RTM_NEWADDR", "RTM_DELADDR"):
        # IFA_LOCAL is our end of a point-to-point link; IFA_ADDRESS the peer's there
        raw = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
        if not raw:
            return state
        address = ipaddress.ip_address(raw)
        flags = msg.get("IFA_FLAGS") or msg.get("flags") or 0
        if event == "RTM_DELADDR" or flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED):
            return state.without_address(index, address)
        return state.with_address(index, address)
    return state


_nl80211_missing_logged = False


async def wifi_ssids() -> dict[int, str | None] | None:
    """Wi-Fi interfaces (by index) and their associated SSID; None where nl80211 is absent."""
    global _nl80211_missing_logged
    try:
        from pyroute2 import AsyncIW
    except ImportError:
        return None
    iw = None
    try:
        iw = AsyncIW()
        await iw.setup_endpoint()  # binds and resolves the nl80211 family: ENOENT without it
        found: dict[int, str | None] = {}
        async for msg in await iw.get_interfaces_dump():
            ssid = msg.get_attr("NL80211_ATTR_SSID")
            if isinstance(ssid, bytes):
                ssid = ssid.decode("utf-8", "backslashreplace")
            found[msg.get_attr("NL80211_ATTR_IFINDEX")] = ssid or None
        return found
    except Exception as exc:  # no cfg80211 module: NetlinkError ENOENT, and kin
        if not _nl80211_missing_logged:
            log.info("no nl80211 (%s): no Wi-Fi interfaces or SSIDs known", exc)
            _nl80211_missing_logged = True
        return None
    finally:
        if iw is not None:
            iw.close()


# --- netifaces polling -----------------------------------------------------------------


class PollingWatcher(Watcher):
    backend = NETIFACES

    def __init__(self, interval: float = 2.0) -> None:
        super().__init__()
        self.interval = interval

    async def start(self) -> None:
        self.state = poll_netifaces()
        self._tasks = [asyncio.create_task(self._poll())]

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self._publish(poll_netifaces())
            except OSError as exc:
                log.warning("interface poll failed: %s", exc)


def poll_netifaces() -> InterfaceState:
    """The state as netifaces (getifaddrs) and SIOCGIFFLAGS see it right now."""
    import netifaces

    state = InterfaceState()
    for name in netifaces.interfaces():
        try:
            index = socket.if_nametoindex(name)
        except OSError:
            continue  # went away while we looked
        flags = _if_flags(name)
        state = state.with_link(index, name, up=bool(flags & IFF_UP and flags & IFF_RUNNING),
                                loopback=bool(flags & IFF_LOOPBACK))
        found = netifaces.ifaddresses(name)
        for family in (netifaces.AF_INET, netifaces.AF_INET6):
            for entry in found.get(family, []):
                with contextlib.suppress(ValueError):
                    address = ipaddress.ip_address(entry["addr"].split("%")[0])
                    state = state.with_address(index, address)
    wifi = {i.index: None for i in state.interfaces if _is_wireless(i.name)}
    return state.with_wifi(wifi)


def _if_flags(name: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            raw = fcntl.ioctl(s.fileno(), SIOCGIFFLAGS,
                              struct.pack("16sH14x", name.encode()[:15], 0))
        except OSError:
            return 0
    return struct.unpack("16sH14x", raw)[1]


def _is_wireless(name: str) -> bool:
    """Linux sysfs knows; elsewhere we cannot tell, so the interface counts as wired."""
    return Path(f"/sys/class/net/{name}/wireless").exists()


# --- choosing one ----------------------------------------------------------------------


async def open_watcher(poll_interval: float = 2.0, forced: str | None = None) -> Watcher:
    """A started watcher: netlink where it works, else netifaces."""
    backend = choose_backend(sys.platform, _importable("pyroute2"), _importable("netifaces"),
                             forced)
    if backend == NETLINK:
        watcher: Watcher = ThreadedWatcher(lambda: NetlinkWatcher(wifi_refresh=poll_interval))
        try:
            await watcher.start()
            return watcher
        except Exception as exc:  # OSError, pyroute2's NetlinkError
            if forced or not _importable("netifaces"):
                raise
            log.warning("netlink unavailable (%s): polling interfaces with netifaces", exc)
    watcher = PollingWatcher(poll_interval)
    await watcher.start()
    return watcher


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


async def _main(backend: str | None, watch: bool, interval: float) -> None:
    watcher = await open_watcher(interval, forced=backend)
    try:
        print(json.dumps({"backend": watcher.backend, "interfaces": watcher.state.to_dict()}),
              flush=True)
        while watch:
            state = await watcher.changed()
            print(json.dumps({"backend": watcher.backend, "interfaces": state.to_dict()}),
                  flush=True)
    finally:
        await watcher.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="print the interface state lpgw sees")
    parser.add_argument("--backend", choices=(NETLINK, NETIFACES))
    parser.add_argument("--watch", action="store_true", help="print every change")
    parser.add_argument("--interval", type=float, default=2.0,
                        help="seconds between polls (netifaces) or SSID refreshes (netlink)")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args.backend, args.watch, args.interval))
