"""``--etcd HOST:PORT[,HOST:PORT...]``: every member of the etcd cluster, parsed or refused."""

from __future__ import annotations

import subprocess
import sys

import pytest

from shard_router.endpoints import parse_endpoints


def test_a_list_of_members_is_parsed_in_order():
    assert parse_endpoints("127.0.0.1:2379, 127.0.0.2:2379,:2381") == [
        ("127.0.0.1", 2379), ("127.0.0.2", 2379), ("127.0.0.1", 2381)]


@pytest.mark.parametrize("bad", ["", "127.0.0.1", "127.0.0.1:", "a:2379,", "a:0", "a:70000"])
def test_an_entry_without_a_port_is_refused_naming_it(bad):
    with pytest.raises(ValueError, match="is not HOST:PORT"):
        parse_endpoints(bad)


def test_ledgerd_refuses_a_malformed_etcd_flag_before_starting():
    done = subprocess.run([sys.executable, "-m", "ledger.cli.ledgerd", "node", "--region", "r1",
                           "--etcd", "127.0.0.1:2379,127.0.0.2"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "argument --etcd: etcd endpoint '127.0.0.2' is not HOST:PORT" in done.stderr
