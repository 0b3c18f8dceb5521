"""agent.net.netlink_watch against iproute2's own view of the links (`ip -j -d link`): in the
test's network namespace (no root needed: dump + subscribe) and in a fresh one with known links
(root)."""
from __future__ import annotations

import select

import pytest

from agent.net.backend import read_links
from agent.net.netlink_watch import LinkWatcher


def test_watcher_knows_the_current_links_and_never_blocks():
    # the truth is iproute2's view, read before and after the watcher's own dump; other sessions
    # add and remove taps in this namespace, so a read with a change in between is done again
    for _ in range(50):
        expected = _ip_links(None)
        w = LinkWatcher()
        if _ip_links(None) == expected:
            break
        w.close()
    else:
        pytest.fail("the namespace's links changed during each of 50 reads")
    with w:
        assert _watched(w) == expected
        assert isinstance(w.fileno(), int)
        select.select([w], [], [], 0)       # usable in a select loop
        assert isinstance(w.poll(), list)   # returns at once even with nothing to read


def test_watcher_table_is_bounded_and_counts_what_it_did_not_keep():
    n = len(read_links())
    with LinkWatcher(max_links=1) as w:
        assert len(w.links) == 1
        assert w.links_over_limit == n - 1


@pytest.mark.parametrize("kw", [{"max_links": 0}, {"max_events": 0}])
def test_watcher_rejects_non_positive_bounds(kw):
    with pytest.raises(ValueError):
        LinkWatcher(**kw)


# --- against iproute2's own view (`ip -j -d link`), in a namespace of known links ----------------

def _ip_links(netns_name: str | None) -> dict[int, tuple[str, str]]:
    """ifindex -> (name, kind) as `ip -j -d link show` reports them; a tun device's kind is its
    type (tap or tun), as ip prints it under linkinfo.info_data."""
    import json
    import subprocess

    from conftest import require_tool

    ip = require_tool("ip", "Debian package iproute2")
    where = ["-n", netns_name] if netns_name else []
    out = subprocess.run([ip, *where, "-j", "-d", "link", "show"], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    links = {}
    for link in json.loads(out):
        info = link.get("linkinfo") or {}
        kind = info.get("info_kind", "")
        if kind == "tun":
            kind = (info.get("info_data") or {}).get("type", "tun")
        links[link["ifindex"]] = (link["ifname"], kind)
    return links


def _ip(netns_name: str, *args: str) -> None:
    import subprocess

    from conftest import require_tool

    ip = require_tool("ip", "Debian package iproute2")
    subprocess.run([ip, "-n", netns_name, *args], check=True, capture_output=True, timeout=60)


def _watched(w: LinkWatcher) -> dict[int, tuple[str, str]]:
    return {i: (link.ifname, link.kind) for i, link in w.links.items()}


def test_watcher_table_and_events_agree_with_ip_link(netns):
    name, path = netns
    _ip(name, "tuntap", "add", "dev", "vra-tap0", "mode", "tap")
    _ip(name, "link", "add", "vra-v0", "type", "veth", "peer", "name", "vra-v1")
    with LinkWatcher(netns=path) as w:
        expected = _ip_links(name)
        assert {kind for _, kind in expected.values()} >= {"tap", "veth"}, expected
        assert _watched(w) == expected
        _ip(name, "tuntap", "add", "dev", "vra-tun0", "mode", "tun")
        _ip(name, "link", "set", "vra-v0", "name", "vra-renamed")
        _ip(name, "link", "del", "vra-tap0")
        after = _ip_links(name)
        events = []
        deadline = 600      # polls of up to 0.1 s: a condition wait, not a timing
        while _watched(w) != after and deadline:
            select.select([w], [], [], 0.1)
            events += w.poll()
            deadline -= 1
        assert _watched(w) == after, (events, after)
    tun = next(i for i, (n, _) in after.items() if n == "vra-tun0")
    tap = next(i for i, (n, _) in expected.items() if n == "vra-tap0")
    renamed = next(i for i, (n, _) in after.items() if n == "vra-renamed")
    seen = {(e.action, e.link.ifindex) for e in events}
    assert ("added", tun) in seen and ("removed", tap) in seen and ("changed", renamed) in seen
    assert after[tun][1] == "tun" and after[renamed][1] == "veth"
