"""Does a keyspace's replication keep an acknowledged commit through the loss of a region?
(``ledger.store.replication``: pure functions, no cluster.)"""

import pytest

from ledger.store.replication import (check_replication, default_replication,
                                      format_replication, parse_replication)

THREE = ["r1", "r2", "r3"]


def reasons(verdict) -> str:
    return " | ".join(verdict.reasons)


def test_one_replica_in_each_of_three_regions_survives():
    v = check_replication({"r1": 1, "r2": 1, "r3": 1}, regions=THREE)
    assert v.survives_region_loss and v.reasons == ()
    assert (v.total, v.quorum) == (3, 2)
    assert "survives the loss of any one" in v.describe()


def test_a_quorum_in_one_region_is_refused():
    # {r1: 3, r2: 1, r3: 1}: 5 replicas, quorum 3, and r1 alone has 3.
    v = check_replication({"r1": 3, "r2": 1, "r3": 1}, regions=THREE)
    assert not v.survives_region_loss
    assert (v.total, v.quorum) == (5, 3)
    text = reasons(v)
    assert "datacenter r1 holds 3 of 5 replicas, a quorum (3) by itself" in text
    assert "losing datacenter r1 leaves 2 of 5 replicas, fewer than the quorum of 3" in text
    # r2 and r3 are not blamed: losing either leaves 4 of 5.
    assert "datacenter r2" not in text and "datacenter r3" not in text
    assert v.describe().startswith("replication {r1: 3, r2: 1, r3: 1} does not survive")


def test_two_two_one_survives():
    v = check_replication({"r1": 2, "r2": 2, "r3": 1}, regions=THREE)
    assert v.survives_region_loss, reasons(v)
    assert (v.total, v.quorum) == (5, 3)


@pytest.mark.parametrize("replication", [{"r1": 2, "r2": 2, "r3": 2},
                                         {"r1": 3, "r2": 3, "r3": 3},
                                         {"r1": 1, "r2": 1, "r3": 1, "r4": 1},
                                         {"r1": 2, "r2": 1, "r3": 1, "r4": 1}])
def test_balanced_layouts_survive(replication):
    assert check_replication(replication).survives_region_loss


def test_one_region_is_refused_in_a_multi_region_deployment():
    v = check_replication({"r1": 1}, regions=THREE)
    assert not v.survives_region_loss
    text = reasons(v)
    assert "region datacenter r2 holds no replica of the keyspace" in text
    assert "region datacenter r3 holds no replica of the keyspace" in text
    assert "all 1 replica(s) are in datacenter r1" in text


def test_one_region_alone_cannot_survive_a_region_loss():
    v = check_replication({"r1": 3}, regions=["r1"])
    assert not v.survives_region_loss
    assert "all 3 replica(s) are in datacenter r1" in reasons(v)


def test_two_regions_stop_when_either_is_lost():
    v = check_replication({"r1": 1, "r2": 1}, regions=["r1", "r2"])
    assert not v.survives_region_loss
    assert "losing datacenter r1 leaves 1 of 2 replicas, fewer than the quorum of 2: " \
           "commits stop" in reasons(v)
    # Nobody holds a quorum alone: no data loss, only a stop.
    assert "by itself" not in reasons(v)


def test_a_declared_region_without_replicas_is_named():
    v = check_replication({"r1": 1, "r2": 1, "r4": 1}, regions=THREE)
    assert not v.survives_region_loss
    assert reasons(v) == "region datacenter r3 holds no replica of the keyspace"


def test_local_serial_never_survives():
    v = check_replication({"r1": 1, "r2": 1, "r3": 1}, serial_consistency="LOCAL_SERIAL",
                          commit_consistency="LOCAL_QUORUM")
    assert not v.survives_region_loss
    assert "LOCAL_SERIAL" in reasons(v) and "LOCAL_QUORUM" in reasons(v)


@pytest.mark.parametrize("level", ["EACH_QUORUM", "ALL"])
def test_commit_levels_that_need_every_region_stop_on_a_region_loss(level):
    v = check_replication({"r1": 1, "r2": 1, "r3": 1}, commit_consistency=level)
    assert not v.survives_region_loss
    assert f"commit consistency {level} needs every datacenter" in reasons(v)


def test_simple_strategy_is_refused():
    v = check_replication({"replication_factor": 3}, strategy="SimpleStrategy")
    assert not v.survives_region_loss
    assert "SimpleStrategy" in reasons(v)


def test_fewer_nodes_than_replicas_is_counted():
    # Configured {r1: 3, r2: 2, r3: 2} would survive, but r1 has one node: 5 of 7 replicas
    # exist, quorum 4; losing r2 or r3 leaves 3.
    assert check_replication({"r1": 3, "r2": 2, "r3": 2}).survives_region_loss
    v = check_replication({"r1": 3, "r2": 2, "r3": 2}, nodes={"r1": 1, "r2": 2, "r3": 2})
    assert not v.survives_region_loss
    text = reasons(v)
    assert "datacenter r1 has 1 node(s) for 3 replicas" in text
    assert "losing datacenter r2 leaves 3 of 7 replicas" in text


def test_a_datacenter_without_nodes_makes_commits_impossible():
    v = check_replication({"r1": 1, "r2": 1, "r3": 1}, nodes={"r1": 1})
    assert not v.survives_region_loss
    assert "only 1 of the 3 configured replicas exist" in reasons(v)


def test_no_replicas_at_all():
    v = check_replication({})
    assert not v.survives_region_loss
    assert "no replicas" in reasons(v)


def test_parse_replication_from_system_schema():
    assert parse_replication({"class": "org.apache.cassandra.locator.NetworkTopologyStrategy",
                              "r1": "1", "r2": "2"}) == (
        "NetworkTopologyStrategy", {"r1": 1, "r2": 2})
    assert parse_replication({"class": "org.apache.cassandra.locator.SimpleStrategy",
                              "replication_factor": "3"}) == (
        "SimpleStrategy", {"replication_factor": 3})


def test_default_replication_covers_every_region():
    assert default_replication("r1", None) == {"r1": 1}
    assert default_replication("r2", ["r1", "r2", "r3"]) == {"r1": 1, "r2": 1, "r3": 1}
    assert check_replication(default_replication("r1", THREE), regions=THREE) \
        .survives_region_loss


def test_verdict_as_dict_and_format():
    v = check_replication({"r2": 1, "r1": 3}, regions=["r1", "r2"])
    doc = v.as_dict()
    assert doc["survives_region_loss"] is False and doc["replicas"] == 4 and doc["quorum"] == 3
    assert doc["reasons"] == list(v.reasons)
    assert format_replication({"r2": 1, "r1": 3}) == "{r1: 3, r2: 1}"
