"""Risk controls the shard's writer enforces: velocity limits and the device step-up check.

Why in the writer: a check made by a service in front of the ledger reads a balance or a
count, then the ledger decides later; two requests that each pass the check together break
the limit (TigerBeetle's users report exactly this race with application-side limits). Here
the check and the debit are one decision of the shard's owner, which serializes every debit
of the wallet, so a limit holds however many requests race.

The rules (``ShardState._risk_refusal``, evaluated on every debit of a user wallet: Transfer,
Withdraw, the funding of a red envelope, CreateHold, and each item of a linked chain; the
ledger's own accounts, settlement and escrows, are exempt):

* **Velocity.** At most ``max_amount_minor`` out and at most ``max_count`` debits within a
  rolling ``window_ms``. A debit counts when it is decided (a hold when it is created, a
  chain item when it is prepared), and keeps counting if the hold is released or the chain
  aborts: the limit bounds what a wallet tried to move, which is what a thief would do. The
  window is kept in buckets of ``window_ms // BUCKETS``: a check sums every bucket from the
  one holding ``now - window_ms`` on, so a debit counts for at least ``window_ms`` and at most
  one bucket longer (never shorter: the error is on the safe side; until 2026-11-27 the sum
  started ``BUCKETS`` buckets back, up to 59 ms short of a window that is not a multiple of
  60 ms, found by the property test). Buckets are kept for two windows behind the newest
  debit, so a command stamped earlier than one before it (coordinators' clocks differ) is
  still checked against everything in its window. Refused with VELOCITY_LIMIT_EXCEEDED, a recorded decision (a retry of the same
  key gets the same answer, like INSUFFICIENT_FUNDS).
* **Step-up.** A debit above ``step_up_above_minor`` from a device the wallet has not
  confirmed is refused with STEP_UP_REQUIRED (field ``device_id``). The device id comes with
  the request; a request without one counts as an unknown device. A device becomes known only
  through ``ConfirmDevice`` (an authorized call, made by the risk service once the user
  passed a second check), never by being used: else a thief would make one small payment
  first. The refusal is NOT recorded under the idempotency key, so the client retries the
  same request, with the same key, once the device is confirmed.

Limits are set per wallet, or for every wallet of the ledger as the default
(``SetRiskLimits`` with an empty wallet id, applied on every shard). Both are journaled, so a
new owner enforces exactly what the old one did, and a replay rebuilds the windows from the
decided debits. Nothing is limited until a limit is set: the ledger cannot know which
wallets are consumers and which are merchants or payroll accounts that move millions; the
risk service sets the default and the exceptions (README "Risk controls").
"""

from __future__ import annotations

from dataclasses import dataclass, field

# A wallet's own setting "use the default" (``window_ms`` and ``step_up_above_minor``).
INHERIT = -1
# Buckets per window: the check sums about BUCKETS + 1 of them.
BUCKETS = 60
# Confirmed devices kept per wallet; confirming one more forgets the oldest.
DEVICES_MAX = 32
# Bounds of a velocity window.
WINDOW_MIN_MS = 1_000
WINDOW_MAX_MS = 31 * 24 * 3600 * 1000
DEVICE_ID_MAX = 128


@dataclass(slots=True, frozen=True)
class Limits:
    """Limits in force (the default of a shard, or what a wallet inherits or sets).

    ``window_ms`` 0: no velocity limit; ``max_amount_minor`` / ``max_count`` 0: that side is
    not limited; ``step_up_above_minor`` 0: no step-up check."""

    window_ms: int = 0
    max_amount_minor: int = 0
    max_count: int = 0
    step_up_above_minor: int = 0


NO_LIMITS = Limits()


@dataclass(slots=True)
class WalletRisk:
    """One wallet's own risk settings and what its velocity window holds.

    ``window_ms`` / ``step_up_above_minor`` are INHERIT when the wallet follows the shard's
    default. ``buckets`` maps a bucket index (``at_ms // width``) to [amount, count] of the
    debits decided in it, counted for ``usage_window_ms`` (when the window in force changes,
    the count starts again: buckets of another width cannot be re-cut)."""

    wallet_id: str
    window_ms: int = INHERIT
    max_amount_minor: int = 0
    max_count: int = 0
    step_up_above_minor: int = INHERIT
    devices: list[str] = field(default_factory=list)
    usage_window_ms: int = 0
    buckets: dict[int, list[int]] = field(default_factory=dict)

    def limits(self, default: Limits) -> Limits:
        """The limits in force for this wallet under ``default``."""
        if self.window_ms == INHERIT:
            window, amount, count = (default.window_ms, default.max_amount_minor,
                                     default.max_count)
        else:
            window, amount, count = self.window_ms, self.max_amount_minor, self.max_count
        step_up = (default.step_up_above_minor if self.step_up_above_minor == INHERIT
                   else self.step_up_above_minor)
        return Limits(window, amount, count, step_up)

    def record(self) -> list:
        """The wallet's snapshot record (``ledger.core.codec``)."""
        return [self.wallet_id, self.window_ms, self.max_amount_minor, self.max_count,
                self.step_up_above_minor, list(self.devices), self.usage_window_ms,
                [[index, amount, count] for index, (amount, count) in self.buckets.items()]]

    @classmethod
    def from_record(cls, r: list) -> "WalletRisk":
        return cls(r[0], r[1], r[2], r[3], r[4], list(r[5]), r[6],
                   {index: [amount, count] for index, amount, count in r[7]})

    def note_debit(self, window_ms: int, amount_minor: int, at_ms: int) -> None:
        """Count a decided debit in the window ``window_ms`` (> 0) in force."""
        if self.usage_window_ms != window_ms:
            self.usage_window_ms, self.buckets = window_ms, {}
        width = bucket_width(window_ms)
        index = at_ms // width
        held = self.buckets.get(index)
        if held is None:
            self.buckets[index] = [amount_minor, 1]
            oldest = (at_ms - 2 * window_ms) // width
            for stale in [i for i in self.buckets if i < oldest]:
                del self.buckets[stale]
        else:
            held[0] += amount_minor
            held[1] += 1

    def used(self, window_ms: int, now_ms: int) -> tuple[int, int]:
        """(amount, count) of the debits in the window ending at ``now_ms``."""
        if self.usage_window_ms != window_ms or not self.buckets:
            return 0, 0
        oldest = (now_ms - window_ms) // bucket_width(window_ms)
        amount = count = 0
        for index, (a, c) in self.buckets.items():
            if index >= oldest:
                amount += a
                count += c
        return amount, count


def bucket_width(window_ms: int) -> int:
    return max(1, window_ms // BUCKETS)


@dataclass(slots=True, frozen=True)
class RiskView:
    """A wallet's risk controls as ``GetWallet`` shows them (``ShardState.risk_view``)."""

    limits: Limits
    velocity_own: bool       # the wallet's own velocity limit, not the default
    step_up_own: bool
    used_amount_minor: int   # within the window now
    used_count: int
    devices: tuple[str, ...]
