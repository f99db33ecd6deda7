"""Mutual TLS and authorization on a real ``ledgerd dev``-style server (SQLite store, gRPC over
TLS on loopback): who gets in, who may call what, and that a refusal changes nothing.

* no client certificate, a certificate of another CA, an expired one: the handshake fails;
* a service may use the public API, but not the node-to-node ``ShardOwnerService`` (an
  ``ApplyCredits`` that would mint money is refused and the wallet is unchanged), nor create
  a wallet that may go negative, nor freeze one; an operator may;
* a principal the policy does not know is refused; the policy file is read again when it
  changes;
* idempotency keys are scoped to the certificate's identity: the ``ledger-caller`` header
  is ignored;
* a server without TLS refuses to listen on a non-loopback address.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os

import grpc
import pytest

from ledger import server
from ledger.core import audit, codec
from ledger.core.model import ApplyCredits, Credit
from ledger.security import authz, certs
from ledger.security.tls import TlsFiles
from ledgerpb import ledger_pb2 as pb
from ledgerpb import ledger_pb2_grpc as pb_grpc
from ledgerpb import shard_pb2 as spb
from ledgerpb import shard_pb2_grpc as spb_grpc
from shard_router import shard_of

SHARDS = 4
CALL_TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    issued = certs.make_dev_pki(d, nodes=("n1",), services=("payments", "other"),
                                operators=("ops",))
    ca = issued["ca"]
    issued["expired"] = certs.issue(ca, d / "expired", "service", "late", days=-10)
    issued["stranger"] = certs.issue(ca, d / "stranger", "service", "stranger",
                                     uri="spiffe://elsewhere/service/stranger")
    foreign = certs.make_ca(d / "foreign", name="another CA")
    issued["foreign"] = certs.issue(foreign, d / "foreign", "service", "payments")
    (d / "policy.json").write_text(json.dumps(authz.DEFAULT_POLICY))
    return d, issued


@pytest.fixture(scope="module")
async def ledger(pki, tmp_path_factory):
    d, _ = pki
    security = server.Security(tls=TlsFiles.from_dir(d, "node-n1"),
                               policy=str(d / "policy.json"))
    running = await server.start_dev(tmp_path_factory.mktemp("secure"), port=0,
                                     shard_count=SHARDS, security=security)
    try:
        yield running
    finally:
        await running.close()


def channel(pki, running, who: str | None) -> grpc.aio.Channel:
    d, issued = pki
    ca = (d / "ca.pem").read_bytes()
    if who is None:
        creds = grpc.ssl_channel_credentials(root_certificates=ca)
    else:
        files = issued[who]
        creds = grpc.ssl_channel_credentials(root_certificates=ca,
                                             private_key=files.key.read_bytes(),
                                             certificate_chain=files.cert.read_bytes())
    return grpc.aio.secure_channel(f"127.0.0.1:{running.port}", creds)


async def call(pki, running, who, method, request, caller="spoofed"):
    async with channel(pki, running, who) as ch:
        stub = pb_grpc.LedgerServiceStub(ch)
        return await getattr(stub, method)(request, timeout=CALL_TIMEOUT_S,
                                           metadata=(("ledger-caller", caller),))


async def audited(running, wallet_id: str) -> list[audit.AuditRecord]:
    """The audit records of the shard that holds ``wallet_id``."""
    rows = await running.store.read_audit(shard_of(wallet_id, SHARDS))
    return [r for row in rows for r in audit.decode_records(row.records)]


async def balance(pki, running, wallet_id: str) -> int:
    got = await call(pki, running, "service/payments", "GetWallet",
                     pb.GetWalletRequest(wallet_id=wallet_id))
    return got.wallet.balance_minor


@pytest.mark.parametrize("who", [None, "foreign", "expired"])
async def test_no_certificate_another_ca_or_an_expired_one_is_refused(pki, ledger, who):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(pki, ledger, who, "GetWallet", pb.GetWalletRequest(wallet_id="w"))
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE  # no TLS session: nothing ran


async def test_a_service_uses_the_api_but_not_the_node_to_node_service(pki, ledger):
    await call(pki, ledger, "service/payments", "CreateWallet",
               pb.CreateWalletRequest(idempotency_key="w-victim", wallet_id="victim",
                                      currency="CNY"))
    before = await balance(pki, ledger, "victim")
    credit = Credit(1, "t-forged", "TRANSFER", "nowhere", "victim", 10**6, "CNY", 1)
    request = spb.ExecuteRequest(
        shard=shard_of("victim", SHARDS), codec_version=codec.FORMAT_VERSION,
        commands=codec.dumps([ApplyCredits((shard_of("victim", SHARDS) + 1) % SHARDS,
                                           (credit,))]))
    async with channel(pki, ledger, "service/payments") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await spb_grpc.ShardOwnerServiceStub(ch).Execute(request, timeout=CALL_TIMEOUT_S)
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "service/payments" in err.value.details()
    assert await balance(pki, ledger, "victim") == before  # nothing minted
    # A node identity passes the policy (the call then reaches the shard's owner).
    async with channel(pki, ledger, "node/n1") as ch:
        ok = await spb_grpc.ShardOwnerServiceStub(ch).Execute(spb.ExecuteRequest(
            shard=0, codec_version=codec.FORMAT_VERSION, commands=codec.dumps([])),
            timeout=CALL_TIMEOUT_S)
    assert ok.epoch > 0


async def test_only_privileged_callers_create_wallets_that_may_go_negative(pki, ledger):
    mint = pb.CreateWalletRequest(idempotency_key="w-mint", wallet_id="mint", currency="CNY",
                                  allow_negative=True)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(pki, ledger, "service/payments", "CreateWallet", mint)
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert ("ledger-field", "allow_negative") in tuple(err.value.trailing_metadata())
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await call(pki, ledger, "service/payments", "GetWallet",
                   pb.GetWalletRequest(wallet_id="mint"))
    assert missing.value.code() is grpc.StatusCode.NOT_FOUND  # refused: nothing created
    made = await call(pki, ledger, "operator/ops", "CreateWallet", mint)
    assert made.wallet.allow_negative


async def test_only_operators_freeze_wallets(pki, ledger):
    await call(pki, ledger, "service/payments", "CreateWallet",
               pb.CreateWalletRequest(idempotency_key="w-fz", wallet_id="fz", currency="CNY"))
    freeze = pb.SetWalletFrozenRequest(wallet_id="fz", frozen=True, reason="fraud")
    from prometheus_client import REGISTRY
    labels = {"method": "/ledger.v1.LedgerService/SetWalletFrozen", "code": "PERMISSION_DENIED"}
    refusals = REGISTRY.get_sample_value("ledger_authz_refusals_total", labels) or 0
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(pki, ledger, "service/payments", "SetWalletFrozen", freeze)
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    # Audited: counted (and logged on ``ledger.audit``, principal and method only).
    assert REGISTRY.get_sample_value("ledger_authz_refusals_total", labels) == refusals + 1
    assert not (await call(pki, ledger, "service/payments", "GetWallet",
                           pb.GetWalletRequest(wallet_id="fz"))).wallet.frozen
    done = await call(pki, ledger, "operator/ops", "SetWalletFrozen", freeze)
    assert done.wallet.frozen


@pytest.mark.parametrize("what", ["wallet-limits", "default-limits", "confirm-device"])
async def test_only_operators_set_limits_and_confirm_devices(pki, ledger, what):
    # A payment service may not lift a limit or vouch for a device (the thief's own device).
    wallet = "rl-" + what
    await call(pki, ledger, "service/payments", "CreateWallet", pb.CreateWalletRequest(
        idempotency_key="w-" + wallet, wallet_id=wallet, currency="CNY"))
    method, request = {
        "wallet-limits": ("SetRiskLimits", pb.SetRiskLimitsRequest(
            wallet_id=wallet, window_ms=60_000, max_count=1)),
        "default-limits": ("SetRiskLimits", pb.SetRiskLimitsRequest(
            window_ms=60_000, max_count=1000)),
        "confirm-device": ("ConfirmDevice", pb.ConfirmDeviceRequest(
            wallet_id=wallet, device_id="stolen-phone")),
    }[what]

    async def risk():
        return (await call(pki, ledger, "service/payments", "GetWallet",
                           pb.GetWalletRequest(wallet_id=wallet))).wallet.risk

    before = await risk()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(pki, ledger, "service/payments", method, request)
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert await risk() == before  # nothing changed
    await call(pki, ledger, "operator/ops", method, request)
    after = await risk()
    assert after.window_ms == 60_000 if method == "SetRiskLimits" else \
        list(after.devices) == ["stolen-phone"]


async def test_keys_are_scoped_to_the_certificate_not_the_header(pki, ledger):
    # Two services, the same key and the same (ignored) header: two requests, two wallets.
    for who, wallet in (("service/payments", "scoped-a"), ("service/other", "scoped-b")):
        made = await call(pki, ledger, who, "CreateWallet", pb.CreateWalletRequest(
            idempotency_key="same-key", wallet_id=wallet, currency="CNY"), caller="shared")
        assert made.wallet.wallet_id == wallet and not made.replayed


async def test_an_unknown_principal_is_refused_and_the_policy_reloads(pki, ledger):
    d, _ = pki
    get = pb.GetWalletRequest(wallet_id="victim")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(pki, ledger, "stranger", "GetWallet", get)
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    policy = d / "policy.json"
    doc = dict(authz.DEFAULT_POLICY, allow_rules=authz.DEFAULT_POLICY["allow_rules"] + [
        {"name": "stranger-reads", "source": {"principals": ["spiffe://elsewhere/*"]},
         "request": {"paths": ["/ledger.v1.LedgerService/GetWallet"]}}])
    policy.write_text(json.dumps(doc))
    stamp = os.stat(policy).st_mtime_ns + 10**9
    os.utime(policy, ns=(stamp, stamp))
    loop = asyncio.get_running_loop()
    give_up = loop.time() + 3 * authz.RELOAD_CHECK_S + 5
    while True:
        try:
            await call(pki, ledger, "stranger", "GetWallet", get)
            break
        except grpc.aio.AioRpcError as exc:
            assert exc.code() is grpc.StatusCode.PERMISSION_DENIED
            assert loop.time() < give_up, "the changed policy was not picked up"
            await asyncio.sleep(authz.RELOAD_CHECK_S / 2)
    # The audit trail says which policy is in force from where on: the reload is recorded
    # on the shards this node serves, with the new file's digest (what sha256sum prints).
    digest = hashlib.sha256(policy.read_bytes()).hexdigest()
    await call(pki, ledger, "service/payments", "CreateWallet", pb.CreateWalletRequest(
        idempotency_key="w-after-reload", wallet_id="after-reload", currency="CNY"))
    records = await audited(ledger, "after-reload")
    reloads = [r for r in records if r.method == "PolicyReloaded"]
    assert reloads and reloads[-1].detail.startswith(f"sha256:{digest} ")
    assert reloads[-1].principal == "spiffe://redledger/node/n1"
    assert reloads[-1].subject == authz.DEFAULT_POLICY["name"]
    # The shard's first record is the takeover, naming the node and what it enforced.
    assert records[0].method == "TakeOver"
    assert records[0].principal == "spiffe://redledger/node/n1"
    assert "policy redledger-default sha256:" in records[0].detail
    assert "certificate spiffe://redledger/node/n1 sha256:" in records[0].detail
    policy.write_text(json.dumps(authz.DEFAULT_POLICY))


async def test_plaintext_on_a_network_address_is_refused(tmp_path):
    with pytest.raises(server.StartupRefused, match="not a loopback address"):
        await server.start_dev(tmp_path, host="0.0.0.0", port=0, shard_count=SHARDS)


async def test_certificates_rotate_without_a_restart(tmp_path):
    old = certs.make_dev_pki(tmp_path / "old", nodes=("n1",), services=("payments",),
                             operators=())
    live = tmp_path / "live"
    live.mkdir()
    for name in ("ca.pem", "node-n1.pem", "node-n1.key"):
        (live / name).write_bytes((tmp_path / "old" / name).read_bytes())
    running = await server.start_dev(tmp_path / "data", port=0, shard_count=SHARDS,
                                     security=server.Security(tls=TlsFiles.from_dir(
                                         live, "node-n1")))
    try:
        async def works(pki_dir, issued) -> bool:
            creds = grpc.ssl_channel_credentials(
                root_certificates=(pki_dir / "ca.pem").read_bytes(),
                private_key=issued.key.read_bytes(), certificate_chain=issued.cert.read_bytes())
            async with grpc.aio.secure_channel(f"127.0.0.1:{running.port}", creds) as ch:
                try:
                    await pb_grpc.LedgerServiceStub(ch).GetWallet(
                        pb.GetWalletRequest(wallet_id="nobody"), timeout=CALL_TIMEOUT_S)
                except grpc.aio.AioRpcError as exc:
                    return exc.code() is grpc.StatusCode.NOT_FOUND  # in, and answered
            return True

        assert await works(tmp_path / "old", old["service/payments"])
        new = certs.make_dev_pki(tmp_path / "new", nodes=("n1",), services=("payments",),
                                 operators=())
        for name in ("ca.pem", "node-n1.pem", "node-n1.key"):
            (live / name).write_bytes((tmp_path / "new" / name).read_bytes())
        # The next handshake reads the changed files: the new CA's clients get in, the old
        # CA's no longer do; the server never restarted.
        assert await works(tmp_path / "new", new["service/payments"])
        assert not await works(tmp_path / "old", old["service/payments"])
        # The rotation is in the audit trail of the shards the node serves: the new
        # certificate's identity and fingerprint, recorded under the node's identity.
        issued = new["service/payments"]
        creds = grpc.ssl_channel_credentials(
            root_certificates=(tmp_path / "new" / "ca.pem").read_bytes(),
            private_key=issued.key.read_bytes(), certificate_chain=issued.cert.read_bytes())
        async with grpc.aio.secure_channel(f"127.0.0.1:{running.port}", creds) as ch:
            await pb_grpc.LedgerServiceStub(ch).CreateWallet(pb.CreateWalletRequest(
                idempotency_key="w-rotated", wallet_id="rotated", currency="CNY"),
                timeout=CALL_TIMEOUT_S)
        _, fingerprint, _ = certs.describe((live / "node-n1.pem").read_bytes())
        rotations = [r for r in await audited(running, "rotated")
                     if r.method == "CertificateRotated"]
        assert [(r.subject, r.detail.split()[0]) for r in rotations] == [
            ("spiffe://redledger/node/n1", f"sha256:{fingerprint}")]
    finally:
        await running.close()


async def test_outgoing_node_calls_follow_a_rotation_without_a_restart(tmp_path):
    """A node's calls to other nodes (``GrpcShardTransport``) pick up its rotated certificate:
    after the rotation, a peer that trusts only the new CA refuses the old certificate and
    lets the rotated transport in, though that transport was made before the rotation."""
    from ledger.api.shard_service import TLS_RELOAD_CHECK_S, GrpcShardTransport
    from ledger.core.model import GetWallet

    for pki in ("old", "new"):
        certs.make_dev_pki(tmp_path / pki, nodes=("n1", "n2", "n3"), services=(),
                           operators=())
    own_dir = tmp_path / "own"
    own_dir.mkdir()

    def rotate_own(pki: str) -> None:
        for name in ("ca.pem", "node-n2.pem", "node-n2.key"):
            (own_dir / name).write_bytes((tmp_path / pki / name).read_bytes())

    async def peer(pki: str, name: str):
        return await server.start_dev(tmp_path / name, port=0, shard_count=SHARDS,
                                      security=server.Security(tls=TlsFiles.from_dir(
                                          tmp_path / pki, name)))

    async def answered(t: GrpcShardTransport, running) -> bool:
        try:
            outcome = (await t.execute(f"127.0.0.1:{running.port}", 0, [GetWallet("nobody")],
                                       False, asyncio.get_running_loop().time() + 5))[0]
        except ConnectionError:
            return False
        return outcome.field == "wallet_id"  # WALLET_NOT_FOUND: in, and answered

    rotate_own("old")
    now = [0.0]
    transport = GrpcShardTransport(TlsFiles.from_dir(own_dir, "node-n2"), clock=lambda: now[0])
    stale = GrpcShardTransport(TlsFiles.from_dir(tmp_path / "old", "node-n2"))
    before = await peer("old", "node-n1")
    after = None
    try:
        assert await answered(transport, before) and await answered(stale, before)
        rotate_own("new")
        after = await peer("new", "node-n3")  # trusts only the new CA
        assert not await answered(stale, after)  # the old certificate is refused
        now[0] += TLS_RELOAD_CHECK_S
        assert await answered(transport, after)  # the rotated files, no restart
    finally:
        await transport.close()
        await stale.close()
        await before.close()
        if after is not None:
            await after.close()
