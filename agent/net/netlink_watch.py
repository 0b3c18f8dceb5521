"""Follow link creation/removal (RTNLGRP_LINK) in one network namespace without polling.

`LinkWatcher.fileno()` is a non-blocking rtnetlink socket for a select/poll loop; when it is
readable call `poll()`, which returns the LinkEvents decoded since the last call (at most
`max_events`; the rest stay in the socket for the next call). The watcher keeps a table of
the links it knows, bounded by `max_links` (links beyond the bound are counted, not kept).
If the kernel had to drop notifications (ENOBUFS: the socket buffer overflowed), the table
is re-read from a dump, `overruns` counts it, and the links that appeared or disappeared
meanwhile are reported as events with `resync=True` (a link created and removed in between,
or a change of a link, is lost).
"""
from __future__ import annotations

import errno
import socket
import time
from dataclasses import dataclass
from typing import Optional

from agent.net.backend import LinkInfo, link_info_from_msg, open_iproute


class LinkAction:
    ADDED = "added"
    CHANGED = "changed"      # RTM_NEWLINK for a link already known (flags, name, carrier...)
    REMOVED = "removed"


@dataclass(frozen=True, slots=True)
class LinkEvent:
    ts_ns: int               # CLOCK_MONOTONIC when decoded (not when the kernel sent it)
    action: str              # LinkAction.*
    link: LinkInfo
    resync: bool = False     # derived from a table re-read after an overrun, not a notification


class LinkWatcher:
    def __init__(self, netns: Optional[str] = None, max_links: int = 4096,
                 max_events: int = 1024, rcvbuf: int = 1 << 20):
        from pyroute2 import netns as pr_netns
        from pyroute2.netlink.rtnl import RTMGRP_LINK
        from pyroute2.netlink.rtnl.marshal import MarshalRtnl

        if max_links <= 0 or max_events <= 0:
            raise ValueError("max_links and max_events must be positive")
        self.netns = netns
        self.max_links = max_links
        self.max_events = max_events
        if netns is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        else:
            # the socket belongs to the namespace it is created in (pyroute2 forks into it)
            sock = pr_netns.create_socket(netns, socket.AF_NETLINK, socket.SOCK_RAW,
                                          socket.NETLINK_ROUTE, flags=0)
        self._sock = sock
        self._marshal = MarshalRtnl()
        self._pending: list[LinkEvent] = []
        self.links: dict[int, LinkInfo] = {}
        self.links_over_limit = 0   # RTM_NEWLINK of unknown links not kept (table full)
        self.overruns = 0           # ENOBUFS: notifications lost, table re-read
        self.unexpected = 0         # messages other than RTM_NEWLINK/RTM_DELLINK
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.bind((0, RTMGRP_LINK))
            sock.setblocking(False)
            self._resync()          # after bind: nothing created from now on can be missed
        except BaseException:
            sock.close()
            raise

    def fileno(self) -> int:
        return self._sock.fileno()

    def _resync(self) -> None:
        with open_iproute(self.netns) as ipr:
            links = [link_info_from_msg(m) for m in ipr.get_links()]
        self.links = {}
        for link in links:
            self._remember(link)

    def _resync_with_events(self) -> None:
        """Re-read the table; report what changed meanwhile as events marked `resync`."""
        before = self.links
        self._resync()
        now = time.monotonic_ns()
        for index, link in before.items():
            if index not in self.links:
                self._pending.append(LinkEvent(now, LinkAction.REMOVED, link, resync=True))
        for index, link in self.links.items():
            if index not in before:
                self._pending.append(LinkEvent(now, LinkAction.ADDED, link, resync=True))

    def _remember(self, link: LinkInfo) -> bool:
        if link.ifindex not in self.links and len(self.links) >= self.max_links:
            self.links_over_limit += 1
            return False
        self.links[link.ifindex] = link
        return True

    def _drain(self) -> None:
        """Discard what is queued: the kernel reports ENOBUFS before the notifications it still
        holds, which are older than the table about to be re-read (a queued `added` of a link
        whose removal was dropped would bring it back)."""
        while True:
            try:
                self._sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise

    def _read_socket(self) -> None:
        while len(self._pending) < self.max_events:
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self.overruns += 1
                self._drain()
                self._resync_with_events()
                continue
            now = time.monotonic_ns()
            for msg in self._marshal.parse(data):
                event = msg.get("event")
                if event not in ("RTM_NEWLINK", "RTM_DELLINK"):
                    self.unexpected += 1
                    continue
                link = link_info_from_msg(msg)
                if event == "RTM_DELLINK":
                    self.links.pop(link.ifindex, None)
                    self._pending.append(LinkEvent(now, LinkAction.REMOVED, link))
                else:
                    known = link.ifindex in self.links
                    self._remember(link)
                    self._pending.append(
                        LinkEvent(now, LinkAction.CHANGED if known else LinkAction.ADDED, link))

    def poll(self) -> list[LinkEvent]:
        """Events available now (never blocks). Call when fileno() is readable, or any time."""
        self._read_socket()
        out, self._pending = self._pending[:self.max_events], self._pending[self.max_events:]
        return out

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "LinkWatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
