"""The authorization policy engine (``ledger.security.authz``): gRPC authorization-policy
semantics (deny rules first, then allow rules, anything unmatched refused), pattern matching
of principals and paths, refusal of policies it does not understand, and reload on change."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger.security.authz import DEFAULT_POLICY, PRIVILEGED_NEGATIVE_WALLET, Authorizer, \
    Policy, PolicyError

NODE = "spiffe://redledger/node/n1"
SERVICE = "spiffe://redledger/service/payments"
OPERATOR = "spiffe://redledger/operator/ops"
EXECUTE = "/ledger.v1.ShardOwnerService/Execute"
TRANSFER = "/ledger.v1.LedgerService/Transfer"


def test_the_default_policy_keeps_node_methods_and_minting_to_nodes_and_operators():
    p = Policy.parse(DEFAULT_POLICY)
    assert p.verdict(SERVICE, TRANSFER)[0]
    assert p.verdict(SERVICE, "/grpc.health.v1.Health/Check")[0]
    assert not p.verdict(SERVICE, EXECUTE)[0]
    assert not p.verdict(SERVICE, PRIVILEGED_NEGATIVE_WALLET)[0]
    assert p.verdict(NODE, EXECUTE)[0] and p.verdict(OPERATOR, PRIVILEGED_NEGATIVE_WALLET)[0]
    assert not p.verdict(None, TRANSFER)[0]  # no certificate: nothing
    assert not p.verdict("spiffe://other/service/payments", TRANSFER)[0]


def test_deny_rules_win_over_allow_rules_and_unmatched_is_refused():
    p = Policy.parse({"name": "t",
                      "deny_rules": [{"name": "no-batch", "source": {"principals": [SERVICE]},
                                      "request": {"paths": ["*/BatchTransfer"]}}],
                      "allow_rules": [{"name": "all", "source": {"principals": ["*"]}}]})
    assert p.verdict(SERVICE, "/ledger.v1.LedgerService/BatchTransfer") == (
        False, "deny rule no-batch")
    assert p.verdict(SERVICE, TRANSFER) == (True, "all")
    assert p.verdict(None, TRANSFER) == (False, "no allow rule matches")  # "*": authenticated


def test_a_rule_without_source_matches_callers_without_certificates_too():
    p = Policy.parse({"name": "t", "allow_rules": [
        {"name": "health", "request": {"paths": ["/grpc.health.v1.Health/*"]}}]})
    assert p.verdict(None, "/grpc.health.v1.Health/Check")[0]
    assert not p.verdict(None, TRANSFER)[0]


@pytest.mark.parametrize("doc, why", [
    ({"allow_rules": [{"name": "a"}]}, "name"),
    ({"name": "t"}, "allow_rules"),
    ({"name": "t", "allow_rules": [{"name": "a", "request": {"headers": []}}]}, "supported"),
    ({"name": "t", "allow_rules": [{"name": "a", "request": {"paths": ["/a*b*"]}}]}, "pattern"),
    ({"name": "t", "audit_logging_options": {}, "allow_rules": [{"name": "a"}]}, "unknown"),
])
def test_policies_it_does_not_understand_are_refused(doc, why):
    with pytest.raises(PolicyError, match=why):
        Policy.parse(doc)


_name = st.text("abcdefghijklmnopqrstuvwxyz/._-:", min_size=1, max_size=30)


@given(value=_name, cut=st.integers(min_value=0, max_value=30))
def test_patterns_match_exactly_by_prefix_and_by_suffix(value, cut):
    def allowed(pattern):
        return Policy.parse({"name": "t", "allow_rules": [
            {"name": "r", "request": {"paths": [pattern]}}]}).verdict(None, value)[0]
    assert allowed(value) and allowed("*")
    assert allowed(value[:cut] + "*") and allowed("*" + value[cut:])
    assert not allowed(value + "x") and not allowed("x" + value)


def test_the_policy_file_is_read_again_when_it_changes_and_a_bad_one_keeps_the_last(tmp_path):
    now = [0.0]
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(DEFAULT_POLICY))
    authz = Authorizer(path, clock=lambda: now[0])
    assert not authz.allows(SERVICE, EXECUTE)
    doc = dict(DEFAULT_POLICY, allow_rules=DEFAULT_POLICY["allow_rules"] + [
        {"name": "payments-may-execute", "source": {"principals": [SERVICE]},
         "request": {"paths": [EXECUTE]}}])
    path.write_text(json.dumps(doc))
    os.utime(path, ns=(1, 10**18))
    assert not authz.allows(SERVICE, EXECUTE)  # not looked at again within RELOAD_CHECK_S
    now[0] += 2
    assert authz.allows(SERVICE, EXECUTE)
    path.write_text("{not json")
    os.utime(path, ns=(1, 2 * 10**18))
    now[0] += 2
    assert authz.allows(SERVICE, EXECUTE)  # the policy before stays
