"""Limits of shard routing, each with its unit and what happens when it is hit."""

# How long the router keeps retrying a shard that has no serving owner (ms), e.g. during a
# failover, for a call that carries no deadline of its own (an owner's crediting pipeline,
# reservation and chain resolution). After it the call is answered SHARD_UNAVAILABLE and the
# caller retries later. A call with a deadline (every API request: the caller's gRPC
# deadline, or ``coordinator.constants.REQUEST_DEADLINE_DEFAULT_S``) retries until then.
SHARD_RETRY_DEADLINE_MS = 10_000

# First pause between two attempts on a shard without a serving owner (ms); it doubles per
# attempt up to the maximum. Shorter finds a new owner sooner after a failover; longer sends
# fewer useless attempts while a shard is replayed.
SHARD_RETRY_BACKOFF_MS = 25
SHARD_RETRY_BACKOFF_MAX_MS = 500

# How long a node named owner of a shard, still taking it over (fence, load, replay), holds a
# call for it before it answers "not owner" and the caller routes again (s). Measured on a
# planned drain under load (README, "Planned drain"): a takeover served 0.1-0.9 s after it was
# named; a call held that long is answered the moment the shard serves.
TAKEOVER_WAIT_S_MAX = 3.0

# The longest an owner waits for its successor's warm standby before a planned hand-over
# (failback, ``ledgerctl failover``; s). Waiting costs the clients nothing (the old owner
# serves meanwhile); handing over to a node that cannot yet read its journal costs them the
# whole takeover, or more: on a region just back from a crash (its Cassandra node restarted
# on this loaded 2-core machine) reads timed out for up to 2 minutes, and a takeover whose
# fence failed gave the shard up and won it again every 3.5 s, unserved for 80 s (README,
# "Heal without stalls"). The bound is a trade: past it a move completes onto a node that may
# still fail its takeovers (the shard then waits for the node's store, as it did without
# standbys); short of it a successor that never says it is warm (a store that stays broken, a
# bug) holds the move, and the drills and operators wait. The warm-ups that succeeded on a
# restarted Cassandra node here took 8-24 s; at 120 s the suite's hot-envelope drill took
# 138 s longer (its failback waited out the bound), so 45 s. ``ledgerd node --warm-wait-s``.
WARM_WAIT_S = 45.0
# How long an owner waits for the warm standby of a successor whose store says it is catching
# up with the other regions (its node key's ``catching_up``: another region's Cassandra still
# holds hints for it, ``CassandraStore.catching_up``) before it hands the shard over anyway.
# Longer than WARM_WAIT_S because handing over then makes things worse, not merely slower: in
# the kill-region drill a failback onto a node whose Cassandra was replaying hints (dropping
# most mutations sent to it) stopped every acknowledgement for 20 s, while the old owners
# served on. ``ledgerd node --catch-up-wait-s``.
CATCH_UP_WAIT_S = 300.0
