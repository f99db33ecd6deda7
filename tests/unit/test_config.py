"""The deployment file: regions with their datacenters and contact points, etcd, settings;
a wrong file is refused naming the field."""

import pytest

from ledger import config

GOOD = """
shards = 64
keyspace = "prod"
[etcd]
endpoints = ["10.0.0.1:2379", "10.0.0.2:2379"]
prefix = "/ledger"
[[regions]]
name = "shanghai"
datacenter = "sh-dc"
cassandra = ["127.0.0.1:9042", "127.0.0.4:9042"]
replicas = 2
[[regions]]
name = "shenzhen"
cassandra = ["127.0.0.2:9042"]
"""


def write(tmp_path, text):
    path = tmp_path / "ledger.toml"
    path.write_text(text)
    return path


def test_a_good_file(tmp_path):
    cfg = config.load(write(tmp_path, GOOD))
    assert [r.name for r in cfg.regions] == ["shanghai", "shenzhen"]
    assert cfg.region("shanghai").cassandra == ("127.0.0.1:9042", "127.0.0.4:9042")
    assert cfg.replication == {"sh-dc": 2, "shenzhen": 1}
    assert (cfg.shards, cfg.keyspace, cfg.etcd_prefix) == (64, "prod", "/ledger")
    with pytest.raises(config.ConfigError, match="beijing"):
        cfg.region("beijing")


@pytest.mark.parametrize("text,field", [
    ("", "regions"),
    ('[[regions]]\nname = "a"\n', "cassandra"),
    ('[[regions]]\ncassandra = ["h:1"]\n', "name"),
    ('[[regions]]\nname = "a"\ncassandra = ["h:1"]\nreplicas = 0\n', "replicas"),
    ('[[regions]]\nname = "a"\ncassandra = ["h:1"]\n[[regions]]\nname = "a"\n'
     'cassandra = ["h:2"]\n', "unique"),
    ('[etcd]\nendpoints = ["h:2379", "h"]\n[[regions]]\nname = "a"\ncassandra = ["h:1"]\n',
     r"etcd.endpoints\[1\]"),
    ('[etcd]\nendpoints = ["h:2379,h:2380"]\n[[regions]]\nname = "a"\ncassandra = ["h:1"]\n',
     r"etcd.endpoints\[0\]"),
    ('[etcd]\nendpoints = []\n[[regions]]\nname = "a"\ncassandra = ["h:1"]\n', "at least one"),
])
def test_a_wrong_file_names_the_field(tmp_path, text, field):
    with pytest.raises(config.ConfigError, match=field):
        config.load(write(tmp_path, text))


def test_a_node_and_ledgerctl_are_given_every_etcd_member(tmp_path):
    """Not just the first: losing that member's region must not cut a node off etcd."""
    import argparse

    from ledger.cli import ledgerd

    args = argparse.Namespace(config=write(tmp_path, GOOD), region="shanghai", _given=())
    ledgerd._apply_config(args)
    assert args.etcd == "10.0.0.1:2379,10.0.0.2:2379"
