"""agent.net.netlink_watch in the test's own network namespace (no root needed: dump + subscribe)."""
from __future__ import annotations

import select

import pytest

from agent.net.backend import read_links
from agent.net.netlink_watch import LinkWatcher


def test_watcher_knows_the_current_links_and_never_blocks():
    expected = read_links()
    with LinkWatcher() as w:
        assert len(w.links) == len(expected)
        for index, link in w.links.items():
            assert expected.by_index(index) == link
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
