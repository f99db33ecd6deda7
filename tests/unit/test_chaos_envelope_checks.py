"""The hot-envelope drill's checks (``clients.chaos.checks``), fed recorded answers and what
GetEnvelope, GetWallet and GetTransfer said: each defect they exist for is found, and a
clean record passes. No cluster, no processes."""

from __future__ import annotations

import random

from clients.chaos import checks
from clients.chaos.constants import ALL_SCENARIOS, FAULTS, SCENARIOS
from clients.chaos.drills import plan_steps
from clients.chaos.model import DrillConfig, FaultWindow, ScenarioReport


def grab(position: int, receiver: str, amount: int) -> dict:
    return {"position": position, "receiver": receiver, "amount": amount,
            "transfer_id": f"t-{receiver}"}


def answer(g: dict) -> dict:
    return {k: g[k] for k in ("position", "amount", "transfer_id")}


RECEIVERS = {f"r{i}" for i in range(6)}
# r0..r2 acknowledged; r3's answer was lost but the ledger has it; r4's answer was lost and
# the ledger does not have it; r5 never grabbed.
LEDGER = [grab(0, "r0", 10), grab(1, "r1", 7), grab(2, "r3", 12), grab(3, "r2", 1)]
ACKED = {g["receiver"]: answer(g) for g in LEDGER if g["receiver"] in ("r0", "r1", "r2")}


def test_clean_record_passes_and_counts():
    problems, figures = checks.grab_problems(LEDGER, ACKED, {"r3", "r4"},
                                             {"r3": answer(LEDGER[2])}, RECEIVERS)
    assert problems == []
    assert figures["grabs_in_ledger"] == 4 == figures["acknowledged"] + figures[
        "unanswered_held_by_ledger"]
    assert figures["unanswered_held_by_ledger"] == 1 and figures["settled_ok"] == 1
    assert figures["positions_0_to_n_minus_1"] and figures["receivers_distinct"]
    assert figures["grabbed_minor"] == 30


def test_a_share_granted_twice_is_found():
    twice = [*LEDGER[:3], grab(2, "r2", 1)]          # position 2 twice, 3 missing
    problems, figures = checks.grab_problems(twice, ACKED, {"r3"}, {}, RECEIVERS)
    assert not figures["positions_0_to_n_minus_1"] and figures["granted_twice"] == [2]
    assert any("granted twice [2], missing [3]" in p for p in problems), problems
    two_shares = [*LEDGER, grab(4, "r0", 3)]          # one receiver, two shares
    problems, figures = checks.grab_problems(two_shares, ACKED, {"r3"}, {}, RECEIVERS)
    assert not figures["receivers_distinct"]
    assert any("two shares" in p for p in problems), problems


def test_an_acknowledged_grab_lost_or_changed_is_found():
    problems, figures = checks.grab_problems(
        [g for g in LEDGER if g["receiver"] != "r1"], ACKED, {"r3"}, {}, RECEIVERS)
    assert figures["acknowledged_lost"] == 1 and figures["lost"] == ["r1"]
    assert any("acknowledged grabs lost" in p for p in problems), problems
    changed = {**ACKED, "r0": {**ACKED["r0"], "amount": 11}}
    problems, figures = checks.grab_problems(LEDGER, changed, {"r3"}, {}, RECEIVERS)
    assert figures["differ"] and any("differ" in p for p in problems), problems


def test_a_grab_granted_to_a_refused_or_unknown_wallet_is_found():
    # r3's request was refused (not unanswered), yet the ledger holds its grab.
    problems, figures = checks.grab_problems(LEDGER, ACKED, set(), {}, RECEIVERS)
    assert figures["granted_unacknowledged"] == ["r3"]
    assert any("although their request was refused" in p for p in problems)
    assert any("acknowledged 3 + unanswered that it holds 0 = 3" in p for p in problems)
    problems, figures = checks.grab_problems([*LEDGER, grab(4, "mallory", 2)], ACKED,
                                             {"r3"}, {}, RECEIVERS)
    assert figures["strangers"] == ["mallory"] and problems


def transfer(g: dict, **changes) -> dict:
    return {"state": "TRANSFER_STATE_COMMITTED", "credited": True, "amount": g["amount"],
            "to": g["receiver"], "kind": "TRANSFER_KIND_ENVELOPE_GRAB", **changes}


def test_credits_exactly_once():
    balances = {r: 0 for r in RECEIVERS} | {g["receiver"]: g["amount"] for g in LEDGER}
    transfers = {g["transfer_id"]: transfer(g) for g in LEDGER}
    problems, figures = checks.credit_problems(LEDGER, balances, transfers)
    assert problems == [] and figures["transfers_credited"] == 4
    # A credit applied twice, a credit missing, a transfer not credited.
    problems, figures = checks.credit_problems(
        LEDGER, {**balances, "r0": 20, "r5": 3},
        {**transfers, "t-r1": transfer(LEDGER[1], credited=False)})
    assert len(figures["balances_wrong"]) == 2 and figures["transfers_credited"] == 3
    assert len(problems) == 2
    problems, _ = checks.credit_problems(LEDGER, balances, {**transfers, "t-r3": None})
    assert problems


def test_refund_exactly():
    envelope = {"state": "ENVELOPE_STATE_REFUNDED", "total_minor": 1000,
                "refunded_minor": 970, "amount_left_minor": 0}
    refund = {"state": "TRANSFER_STATE_COMMITTED", "credited": True, "amount": 970,
              "to": "s", "kind": "TRANSFER_KIND_ENVELOPE_REFUND"}
    problems, figures = checks.refund_problems(envelope, 30, 1500, 1470, refund)
    assert problems == [] and figures["refund_exact"] and figures["sender_balance_exact"]
    problems, figures = checks.refund_problems({**envelope, "state": "ENVELOPE_STATE_EXPIRED",
                                                "refunded_minor": 960}, 30, 1500, 1470,
                                               {**refund, "amount": 960})
    assert not figures["refund_exact"] and not figures["sender_balance_exact"]
    assert len(problems) == 3, problems
    problems, _ = checks.refund_problems(envelope, 30, 1500, 1470, None)
    assert problems == ["the refund transfer is not committed and credited for 970: None"]


def test_hot_envelope_is_a_scenario_of_two_faults_and_random_never_picks_it():
    assert "hot-envelope" in SCENARIOS and "hot-envelope" in ALL_SCENARIOS
    assert "hot-envelope" not in FAULTS
    assert plan_steps("hot-envelope", random.Random(1), DrillConfig()) == ["kill-owner",
                                                                           "kill-region"]
    for seed in range(50):
        assert set(plan_steps("random", random.Random(seed), DrillConfig())) <= set(FAULTS)


def test_summarize_counts_grabs_per_window():
    report = ScenarioReport("hot-envelope")
    report.windows = [FaultWindow("kill-owner", "r1-n0", 10.0, 14.0)]
    report.envelope_plot = ([(t / 2 - 0.1, t / 2, "ok") for t in range(1, 20)]
                            + [(t / 2 - 0.1, t / 2, "ok") for t in range(26, 40)])
    checks.summarize(report, [], ())
    assert report.windows[0].notes["grabs_acked"] == 3          # 13.0, 13.5, 14.0
    assert report.windows[0].notes["grab_ack_gap_max_s"] == 3.0  # 9.5 -> 13.0
