"""Limits of the imperative shell (owners, node, servers), each with its unit and effect."""

# Commands one group commit folds into a single journal append. More wait for the next one.
GROUP_COMMIT_COMMANDS_MAX = 4096

# Commands queued for one shard owner. Past this, new commands get OVERLOADED at once.
OWNER_QUEUE_COMMANDS_MAX = 200_000

# Snapshots (ledger.compaction) bound replay on takeover; the journal they cover is then
# truncated. One is due after this many journal batches or events since the latest one...
SNAPSHOT_EVERY_BATCHES = 2_000
SNAPSHOT_EVERY_EVENTS = 100_000
# ...and once at least this many events per record of the state (wallets, kept transfers,
# holds) were journaled since: building a snapshot costs about as much per record as replay
# costs per event, so this keeps compaction CPU within about twice the replay CPU of the
# journal it removes, and replay after a takeover within ~1/ratio events per record.
SNAPSHOT_EVENTS_PER_RECORD_MIN = 0.5
# Journal batches read per round trip by a compaction, and journal bytes one compaction
# reads at most (a longer journal is compacted in rounds of about this much: memory bound).
COMPACTION_PAGE_BATCHES = 64
COMPACTION_JOURNAL_BYTES_MAX = 256 * 1024 * 1024
# Build snapshots (decode, fold, encode) in a worker process rather than a thread of this
# one: a thread shares the GIL and the garbage collector with the event loop, and stalled it
# for up to 161 ms (100 k kept transfers, loaded 2-core box) where a process stalled it for
# about as long as an idle loop is late anyway (README "Snapshots and replay").
COMPACTION_IN_PROCESS = True
# Compactions running at once in one process (each holds a copy of its shard's state).
COMPACTIONS_CONCURRENT_MAX = 2
# The worker processes that build snapshots run at this niceness (added to the node's; 19 at
# most): a snapshot is background work, and at nice 0 two of them (14-15 s each on the loaded
# 2-core box) took CPU time the node's own threads then lacked: in a kill-region drill at load
# a node whose compactions ran sent two keep-alives 1.91 s apart (lease 2 s) and its event
# loop stalled 1.54 s (README, "Failover at load"). Niceness only lowers the workers' share
# when the CPU is contended; on an idle machine they run as fast as before.
COMPACTION_NICE = 10
# One compaction's deadline (s), its attempts before it waits for the next due point, and the
# pause after a failed attempt (doubling up to the maximum; also the wait after giving up).
SNAPSHOT_TIMEOUT_S = 600.0
SNAPSHOT_ATTEMPTS_MAX = 4
SNAPSHOT_RETRY_BACKOFF_S = 1.0
SNAPSHOT_RETRY_BACKOFF_MAX_S = 60.0

# A takeover replay writes the rows of the batches it replays; a store that times out is
# retried this many times, the pause doubling from the first value up to the maximum (s),
# before the takeover fails and the shard is released (7.5 s of pauses in all).
REPLAY_ROW_WRITE_ATTEMPTS_MAX = 5
REPLAY_ROW_WRITE_BACKOFF_S = 0.5
REPLAY_ROW_WRITE_BACKOFF_MAX_S = 4.0

# Shard takeovers (fence, load, replay) one node runs at once; the others wait their turn.
# Of these, REPLAYS_CONCURRENT_MAX fold at once: folds are CPU-bound (run all at once on 2
# cores, every shard of a failed-over region serves only when the slowest is done, and the
# node's lease keep-alives starve meanwhile), fences and loads are round trips to the store.
# On a planned drain under load, with the rows mark (takeovers write almost no rows), two
# takeovers at a time left the fifth shard waiting up to 1.1 s for a slot while each fold
# took 15-70 ms (README, "Planned drain").
TAKEOVERS_CONCURRENT_MAX = 8
REPLAYS_CONCURRENT_MAX = 2

# Warm standbys (ledger.node.Node): a node about to be handed shards by a planned move loads
# and folds at most this many at once, besides its takeovers (their folds take the
# takeovers' REPLAYS_CONCURRENT_MAX slots). Few: nobody waits on a warm-up but the move, and
# the store may be a node just back from a crash: five warm-ups at once there (8 journal
# spans in flight each) timed out on reads ("received only 1 responses").
WARMS_CONCURRENT_MAX = 2
# A warm state whose last read is older than this is dropped and loaded again: the journal has
# run on since, and the tail a takeover would read grows with it (s).
WARM_KEEP_S = 10.0
# A warm state older than this is brought up to date: the batches appended since its last
# read are read and folded onto it (``load_after``), so a standby follows the journal and a
# takeover replays at most about this long a tail (s). A read per standby per period.
WARM_FOLLOW_S = 2.0
# A gain that comes while its standby's follow runs waits this long, after its fence, for the
# follow to end (one tail read and its fold) before it loads the shard afresh (s). 1 s cost
# a kill-region failover 1 s: the follow's read had gone to the region just lost.
WARM_FOLLOW_WAIT_S = 0.5
# A warm-up whose load found more than this many batches reads what was appended meanwhile
# (at most WARM_CATCH_UP_ROUNDS_MAX reads in all): a first load through a Cassandra node just
# back from a crash took 8-15 s, time in which the serving owner appended hundreds of batches.
WARM_CATCH_UP_BATCHES = 64
WARM_CATCH_UP_ROUNDS_MAX = 3
# After a warm-up failed (the store unreachable, a read timed out), the shard is warmed again
# after this long (s): the reads that did complete were repaired meanwhile, so a retry on a
# store that is catching up goes further.
WARM_RETRY_S = 2.0

# A node that stops serving a shard waits up to this long for the shard's rows to be written
# and marked (``JournalStore.flush_rows``) before it lets etcd hand the shard on, so that the
# next owner's replay writes none of them again (``ledger.compaction.replay``). Bounded: a
# store that cannot be reached must not hold a release (the next owner then writes them).
RELEASE_ROWS_FLUSH_S = 0.5
# An owner starts a journal append only while its node's lease stays valid this long without
# another keep-alive (s); otherwise it holds its queue until etcd answers one (or confirms the
# lease of a suspended node). An append whose write ends after the lease's local deadline is
# never acknowledged and costs the shard a takeover, so the headroom covers an append's write
# (under load on the three-region path: tens to a few hundred ms). Keep-alives are sent every
# third of the TTL, so with a healthy etcd the lease always has more than this left.
APPEND_LEASE_HEADROOM_S = 0.5

# Credits sent to one destination shard in one ApplyCredits call of the crediting pipeline.
CREDITS_PER_DELIVERY_MAX = 2_000

# Credit linger: when the credits ready to leave go to at least CREDIT_LINGER_FANOUT_MIN
# destination shards with fewer than CREDIT_LINGER_PER_DEST each on average, the pipeline
# lets the next appends' credits join for up to CREDIT_LINGER_MS before sending (a
# destination's step costs about as much as ten credits in it). ledger-bench hot-envelope,
# one run each: linger 0 -> 0.41 appends and 216 us of ledger CPU per grab; 100 ms -> 0.20,
# 164 us; 200 ms -> 0.13, 138 us (every receiver still credited 1.6 s after the first grab,
# within twice the grab window); 300 ms gained nothing more. A single transfer's credit (one
# destination) and a batch spread over the shards never wait.
CREDIT_LINGER_MS = 200
CREDIT_LINGER_FANOUT_MIN = 16
CREDIT_LINGER_PER_DEST = 8

# Credits nobody waits for (a grab's: its answer went out with the decision; the credit is
# asynchronous) linger longer: until CREDIT_LINGER_ASYNC_PER_DEST per destination on average,
# or until the shard stopped owing new credits (for twice the usual gap between its appends
# that owe credits, within CREDIT_LINGER_IDLE_MIN_MS..CREDIT_LINGER_IDLE_MAX_MS), and never
# beyond CREDIT_LINGER_ASYNC_MS. A hot envelope's 10,000 grabs owe ~40 credits to each of 256
# shards: they then cost one step per receiver shard, run after the grabs instead of among
# them, and the moment the grabs stop the credits leave. As soon as a caller waits for a
# credit (a Transfer's answer holds for its credit leg), that destination's credits go at
# CREDIT_LINGER_MS.
# Measured in the ledger process (``python -m tests.tools.hotgrab``, 3 rounds each, the
# session's start then this rule): 6,006-6,212 -> 8,408-10,293 grabs/s, 0.129 -> 0.052-0.077
# appends per grab; the CPU of a grab with its credit moved little (171-184 -> 137-181 us):
# the grabs go faster because their credits wait until the grabs stop.
CREDIT_LINGER_ASYNC_MS = 1_000
CREDIT_LINGER_ASYNC_PER_DEST = 64
CREDIT_LINGER_IDLE_MIN_MS = 50
CREDIT_LINGER_IDLE_MAX_MS = 400
# Destination shards sent lingered credits nobody waits for in one round while the shard
# still owes new ones (``ShardOwner._rounds``).
CREDIT_DESTS_PER_ROUND = 32

# How long an acknowledgement of delivered credits may wait for a group commit to ride in
# before it is journaled on its own (ms).
ACK_DELAY_MS = 200

# How long an admin note (a takeover, a policy or certificate change: ``ShardOwner.note_admin``)
# waits for a batch to ride in before it is journaled on its own (s). Busy shards record it in
# their next batch; a region's worth of idle shards taken over at once write theirs spread
# over the following seconds, not in the takeover's critical moments.
ADMIN_NOTE_LINGER_S = 5.0

# Pause of the crediting pipeline after a failed delivery before trying again (ms).
CREDIT_RETRY_BACKOFF_MS = 50

# How long a Transfer answer waits for its credit leg to land on another shard (ms). After
# it the answer says committed with credited=false; the pipeline still delivers the credit.
CREDIT_WAIT_MS = 2_000

# Stale credit reservations one owner asks one debit shard about in one ResolveReservations
# call; more are asked about on the next sweep.
RESERVATIONS_PER_RESOLVE_MAX = 2_000

# How often an owner drops stale credit reservations and purges expired idempotency keys (s).
RESERVATION_SWEEP_S = 1.0
# Expired envelopes an owner refunds per sweep (the rest wait for the next sweep).
ENVELOPE_REFUNDS_PER_SWEEP_MAX = 1_000
IDEMPOTENCY_SWEEP_S = 60.0

# How long key records of money movements (and key claims) stay in owner memory after they
# were made (ms); older ones are spilled: answered from the store (``ledger.core.spilled``),
# so an owner's memory stays flat however long it runs. Retries come within seconds in
# practice: a retry of a spilled key costs one store read, a new key none.
IDEMPOTENCY_MEMORY_MS = 10 * 60 * 1000
# The longest idempotency retention a node accepts (h): key rows live 24 h longer than this
# in Cassandra (``ledger.store.cassandra.constants.KEY_ROWS_TTL_S``).
IDEMPOTENCY_RETENTION_H_MAX = 7 * 24
# How often an owner spills (s).
IDEMPOTENCY_SPILL_EVERY_S = 30.0

# The router's retry budget and backoff are in ``shard_router.constants``.

# Timeout of one node-to-node ShardOwnerService call that carries no caller deadline (s): an
# owner's crediting pipeline and resolutions. Past it the call counts as unanswered and the
# router retries (on whoever owns the shard then). A call with a deadline uses the time left.
SHARD_RPC_TIMEOUT_S = 5.0

# Largest gRPC message (bytes) sent or received anywhere: the public server, the internal
# ShardOwnerService server, the node-to-node channel and the Python client all use it. A
# larger message fails with RESOURCE_EXHAUSTED. The largest valid BatchTransfer must always
# fit, on every hop: built with every field at its byte maximum and made of the characters the
# internal JSON codec escapes most (memo of control characters: 6 bytes each), its 10,000
# items measured 22.9 MiB as the node-to-node answer, 21.7 MiB as the node-to-node request
# and 7.5 MiB as the public answer (tests/e2e/test_limits.py builds it). A typical hot-wallet
# batch answers 3-7 MiB, above gRPC's default 4 MiB receive limit.
GRPC_MESSAGE_BYTES_MAX = 32 * 1024 * 1024

# A takeover replay (ledger.compaction.replay) folds the journal in a worker thread this many
# batches at a time: between slices the event loop runs (lease keep-alives, other owners), so
# a long replay does not stall the node.
REPLAY_SLICE_BATCHES = 64
# Rows a replay collects before it writes them to the store (ledger.compaction.replay): the
# memory a replay holds for rows is bounded by about this many; more means fewer, larger
# row writes.
REPLAY_ROWS_FLUSH = 10_000

# A takeover (fence, replay, serve) slower than this is logged as a warning rather than at
# debug level (s); nothing else changes.
SLOW_TAKEOVER_S = 3.0

# Reconciliation (ledger.reconcile, ``ledgerctl reconcile``): journal batches read per store
# call (more: fewer round trips, more memory per read)...
RECONCILE_JOURNAL_PAGE_BATCHES = 500
# ...how long materialized rows behind the journal may take to catch up before a difference
# counts as a finding (s), and how often they are looked at again meanwhile (s)...
RECONCILE_ROWS_SETTLE_S = 5.0
RECONCILE_ROWS_SETTLE_POLL_S = 0.2
# ...how long a hold may be seen past its timeout before it counts as outliving it (ms): the
# owner's sweep releases expired holds about once a second (RESERVATION_SWEEP_S)...
RECONCILE_HOLD_GRACE_MS = 5_000
# ...and how many times the read of one shard starts again because a compaction truncated
# its journal meanwhile; after that the shard's finding says "run again".
RECONCILE_SHARD_READ_ATTEMPTS_MAX = 5

# While this node's store is catching up with the other regions (warm standbys wait), the
# warning that says so is repeated at most this often (s); the change back is logged at once.
CATCH_UP_LOG_S = 30.0
