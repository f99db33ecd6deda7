"""How a red envelope is split: the amount of each share, as a pure function.

Kinds:

- ``FIXED``: equal shares. Each is ``total // shares``; the first ``total % shares`` positions
  get one more minor unit, so the shares sum exactly to the total. The seed plays no part.
- ``EXCLUSIVE``: one share, for one receiver; it is the whole envelope.
- ``LUCKY``: random shares by the "double mean" rule (as WeChat's lucky money). The grab at
  a position, with ``left`` minor units and ``n`` shares left, draws an integer uniformly in
  ``[min, 2 * left // n - min]``. The mean of that range is the remaining average
  ``left / n`` (up to integer rounding: the floor of ``2 * left / n`` makes it at most half a
  minor unit lower, and the last share takes the difference), so no position is favoured
  on average: grabbing early is not worth more than grabbing late. The top is also capped at
  ``left - min * (n - 1)`` so every share after it can still get ``min``; while
  ``left >= min * n`` holds (a precondition, kept by every draw) that cap never cuts below
  the double mean and the range is never empty. The last share takes what is left, so the
  shares sum exactly to the total and each is at least ``min``.

Why pure: the draw at a position is a function of ``(seed, position)`` (the random integer,
from blake2b) and of what is left (the range). The seed is chosen once, when the envelope is
created, and journaled with it; grabs happen in journal order. A replay of the journal, on any
machine and any Python version, recomputes the same amounts and never draws again, so there is
nothing random to record per grab and nothing to disagree about between an owner and its
successor. The seed itself comes from outside the core (the core reads no ``os.urandom``).

Uniform without bias: the integer is taken from an 8-byte blake2b digest of the seed, the
position and a counter, by rejection sampling: a digest at or above the largest multiple of
the range size below ``2**64`` is rejected and the counter moves on, so ``digest % size`` is
exactly uniform (no modulo bias). Money is int minor units throughout, never float.
"""

from __future__ import annotations

from hashlib import blake2b

from ledger.core.invariants import ensure

KIND_FIXED = "FIXED"
KIND_LUCKY = "LUCKY"
KIND_EXCLUSIVE = "EXCLUSIVE"
ENVELOPE_KINDS = (KIND_FIXED, KIND_LUCKY, KIND_EXCLUSIVE)

_DIGEST_BYTES = 8
_DIGEST_SPACE = 1 << (8 * _DIGEST_BYTES)
# Domain separation: these digests are never confused with another use of blake2b.
_PERSON = b"redledger.split"


def _uniform(seed: int, position: int, low: int, high: int) -> int:
    """An integer in ``[low, high]``, uniform over the digests of ``(seed, position)``.

    Args:
        seed: The envelope's seed (any int; encoded in decimal, so the encoding is canonical).
        position: The 0-based grab position.
        low: The smallest value.
        high: The largest value (``>= low``).
    """
    size = high - low + 1
    ensure(1 <= size <= _DIGEST_SPACE, "draw range [%d, %d] out of bounds", low, high)
    limit = _DIGEST_SPACE - _DIGEST_SPACE % size  # largest multiple of size <= 2**64
    counter = 0
    while True:
        message = f"{seed}:{position}:{counter}".encode()
        value = int.from_bytes(
            blake2b(message, digest_size=_DIGEST_BYTES, person=_PERSON).digest(), "big")
        if value < limit:
            return low + value % size
        counter += 1


def share_amount(kind: str, seed: int, position: int, total_minor: int, shares: int,
                 left_minor: int, left_shares: int, min_share_minor: int) -> int:
    """The amount of the share grabbed at ``position`` (0-based: the position-th grab),
    when ``left_minor`` and ``left_shares`` are what is left before it.

    Args:
        kind: One of ``ENVELOPE_KINDS``.
        seed: The envelope's seed (ignored by ``FIXED`` and ``EXCLUSIVE``).
        position: The 0-based grab position, ``shares - left_shares``.
        total_minor: The envelope's total.
        shares: The envelope's number of shares.
        left_minor: Minor units left before this grab.
        left_shares: Shares left before this grab (``>= 1``).
        min_share_minor: The least any share gets (``LUCKY``).

    Raises:
        InvariantViolation: on inputs no valid envelope produces (validate first).
    """
    ensure(kind in ENVELOPE_KINDS, "unknown envelope kind %r", kind)
    ensure(1 <= left_shares <= shares, "left_shares %d not in [1, %d]", left_shares, shares)
    ensure(position == shares - left_shares, "position %d with %d of %d shares left",
           position, left_shares, shares)
    if kind == KIND_FIXED:
        return total_minor // shares + (1 if position < total_minor % shares else 0)
    if kind == KIND_EXCLUSIVE:
        ensure(shares == 1, "exclusive envelope with %d shares", shares)
        return left_minor
    ensure(min_share_minor >= 0, "negative min share %d", min_share_minor)
    ensure(left_minor >= min_share_minor * left_shares,
           "%d minor units left cannot give %d shares at least %d",
           left_minor, left_shares, min_share_minor)
    if left_shares == 1:
        return left_minor
    upper = min(2 * left_minor // left_shares - min_share_minor,
                left_minor - min_share_minor * (left_shares - 1))
    return _uniform(seed, position, min_share_minor, upper)


def all_shares(kind: str, seed: int, total_minor: int, shares: int,
               min_share_minor: int) -> list[int]:
    """Every share of an envelope, in grab order (for tests and the bench's sum checks)."""
    amounts: list[int] = []
    left = total_minor
    for position in range(shares):
        amount = share_amount(kind, seed, position, total_minor, shares, left,
                              shares - position, min_share_minor)
        amounts.append(amount)
        left -= amount
    return amounts


def validate_terms(kind: str, total_minor: int, shares: int,
                   min_share_minor: int) -> str | None:
    """The name of the first bad field of an envelope's terms, or None when they are good.

    Checked in order: ``kind`` is one of ``ENVELOPE_KINDS``; ``shares >= 1`` (and exactly 1
    for ``EXCLUSIVE``); ``total_minor >= shares * min_share_minor`` (every share gets at
    least the minimum). Configurable maximums are checked elsewhere.
    """
    if kind not in ENVELOPE_KINDS:
        return "kind"
    if shares < 1 or (kind == KIND_EXCLUSIVE and shares != 1):
        return "shares"
    if total_minor < shares * min_share_minor:
        return "total_minor"
    return None
