"""Authorization: a policy with the semantics of gRPC's authorization policy, enforced by a
server interceptor on every method of every port.

Policy file (JSON)::

    {"name": "redledger",
     "deny_rules":  [{"name": "...", "source": {"principals": [...]}, "request": {"paths": [...]}}],
     "allow_rules": [...]}

A rule matches a call when its ``source`` matches the caller and its ``request`` matches the
method; an absent ``source.principals`` matches any caller (also one without a certificate),
an absent ``request.paths`` any method. A string pattern is exact, ``prefix*``, ``*suffix``, or
``*`` (for principals: any authenticated caller). Deny rules are looked at first: any match
refuses the call. Then allow rules: any match lets it through. Anything unmatched is refused.
Refusals are UNAUTHENTICATED for a caller without an identity, PERMISSION_DENIED otherwise;
each is logged (principal, method, rule), nothing runs and nothing changes. Header matchers
of gRPC's format are not supported (a policy with them is refused when loaded).

Actions finer than a method are checked by the servicer against pseudo-methods of the
``ledger.v1.Privileged`` namespace (``PRIVILEGED_NEGATIVE_WALLET``: creating a wallet that
may go negative, i.e. a mint). The policy file is read again when it changes (checked at
most every ``RELOAD_CHECK_S`` on calls); a file that does not parse keeps the policy before
it, loudly.

The matcher is our own (grpcio does not ship this engine for Python).
"""

from __future__ import annotations

import contextvars
import hashlib
import inspect
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import grpc

from ledger import metrics
from ledger.api.handlers import rewrap
from ledger.security.certs import TRUST_DOMAIN
from ledger.security.tls import identity_of

log = logging.getLogger("ledger.security")
# Refused calls: principal and method only (never a request's content), on their own logger
# so that operators can route them to their audit sink; counted in ``/metrics`` too.
audit_log = logging.getLogger("ledger.audit")

RELOAD_CHECK_S = 1.0
PRIVILEGED_NEGATIVE_WALLET = "/ledger.v1.Privileged/CreateNegativeWallet"

# The principal of the call this task serves (None: no mutual TLS on this port).
_principal: contextvars.ContextVar[str | None] = contextvars.ContextVar("ledger_principal",
                                                                        default=None)


def current_principal() -> str | None:
    """The authenticated caller of the call being served (``Authorization`` sets it)."""
    return _principal.get()


class PolicyError(ValueError):
    """The policy file is not a policy this engine understands."""


def _pattern(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value or ("*" in value[1:-1]):
        raise PolicyError(f"{where}: {value!r} is not a pattern (exact, prefix*, *suffix or *)")
    return value


def _matches(pattern: str, value: str) -> bool:
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    return value == pattern


@dataclass(frozen=True)
class Rule:
    name: str
    principals: tuple[str, ...] | None  # None: any caller, authenticated or not
    paths: tuple[str, ...] | None       # None: any method

    def matches(self, principal: str | None, path: str) -> bool:
        if self.principals is not None:
            if principal is None or not any(_matches(p, principal) for p in self.principals):
                return False
        return self.paths is None or any(_matches(p, path) for p in self.paths)


@dataclass(frozen=True)
class Policy:
    name: str
    deny: tuple[Rule, ...]
    allow: tuple[Rule, ...]

    @classmethod
    def parse(cls, doc: Any) -> "Policy":
        if not isinstance(doc, dict) or not isinstance(doc.get("name"), str):
            raise PolicyError("a policy is an object with a name")
        unknown = set(doc) - {"name", "deny_rules", "allow_rules"}
        if unknown:
            raise PolicyError(f"unknown policy fields: {sorted(unknown)}")
        if not doc.get("allow_rules"):
            raise PolicyError("allow_rules must list at least one rule")

        def rules(key: str) -> tuple[Rule, ...]:
            out = []
            for i, r in enumerate(doc.get(key) or ()):
                where = f"{key}[{i}]"
                if not isinstance(r, dict) or not isinstance(r.get("name"), str):
                    raise PolicyError(f"{where}: a rule is an object with a name")
                if set(r) - {"name", "source", "request"}:
                    raise PolicyError(f"{where}: unknown fields {sorted(set(r) - {'name', 'source', 'request'})}")
                source, request = r.get("source") or {}, r.get("request") or {}
                if set(source) - {"principals"} or set(request) - {"paths"}:
                    raise PolicyError(f"{where}: only source.principals and request.paths are "
                                      f"supported")
                principals = source.get("principals")
                paths = request.get("paths")
                out.append(Rule(
                    r["name"],
                    None if principals is None else tuple(
                        _pattern(p, f"{where}.source.principals") for p in principals),
                    None if paths is None else tuple(
                        _pattern(p, f"{where}.request.paths") for p in paths)))
            return tuple(out)

        return cls(doc["name"], rules("deny_rules"), rules("allow_rules"))

    def verdict(self, principal: str | None, path: str) -> tuple[bool, str]:
        """(allowed, the deciding rule's name or why none)."""
        for rule in self.deny:
            if rule.matches(principal, path):
                return False, f"deny rule {rule.name}"
        for rule in self.allow:
            if rule.matches(principal, path):
                return True, rule.name
        return False, "no allow rule matches"


def _role(role: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/{role}/*"


# The policy a node enforces when TLS is on and no file is given (``ledgerctl certs`` writes
# the same as policy.json): nodes and operators may call everything (node-to-node execution,
# privileged actions); services may use the public API, health and reflection.
DEFAULT_POLICY: dict = {
    "name": "redledger-default",
    "deny_rules": [
        {"name": "risk-controls-are-for-operators", "source": {"principals": [_role("service")]},
         "request": {"paths": ["/ledger.v1.LedgerService/SetWalletFrozen",
                               "/ledger.v1.LedgerService/SetRiskLimits",
                               "/ledger.v1.LedgerService/ConfirmDevice"]}},
    ],
    "allow_rules": [
        {"name": "nodes", "source": {"principals": [_role("node")]}},
        {"name": "operators", "source": {"principals": [_role("operator")]}},
        {"name": "services", "source": {"principals": [_role("service")]},
         "request": {"paths": ["/ledger.v1.LedgerService/*", "/ledger.v1.RedEnvelopeService/*",
                               "/grpc.health.v1.Health/*",
                               "/grpc.reflection.v1alpha.ServerReflection/*",
                               "/grpc.reflection.v1.ServerReflection/*"]}},
    ],
}


def policy_digest(doc: Any) -> str:
    """SHA-256 (hex) of the built-in policy's canonical JSON (a policy file's digest is
    that of its bytes, what ``sha256sum`` prints): which policy was in force, as the audit
    trail records it."""
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


class Authorizer:
    """The policy in force: from a file (read again when it changes) or the default.

    ``on_reload`` (settable) is called on the event loop after a changed file took effect,
    with no arguments: the node records the new policy in its shards' audit chains."""

    def __init__(self, path: str | Path | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._path = Path(path) if path else None
        self._clock = clock
        self._stamp: int | None = None
        self._checked = 0.0
        self.on_reload: Callable[[], None] | None = None
        self.policy = Policy.parse(DEFAULT_POLICY)
        self.digest = policy_digest(DEFAULT_POLICY)
        if self._path is not None:
            self._stamp = os.stat(self._path).st_mtime_ns
            raw = self._path.read_bytes()
            self.policy = Policy.parse(json.loads(raw))  # errors: no start
            self.digest = hashlib.sha256(raw).hexdigest()

    @property
    def source(self) -> str:
        return str(self._path) if self._path is not None else "built-in"

    def _maybe_reload(self) -> None:
        if self._path is None or self._clock() - self._checked < RELOAD_CHECK_S:
            return
        self._checked = self._clock()
        try:
            stamp = os.stat(self._path).st_mtime_ns
            if stamp == self._stamp:
                return
            raw = self._path.read_bytes()
            policy = Policy.parse(json.loads(raw))
            self.policy, self.digest, self._stamp = policy, hashlib.sha256(raw).hexdigest(), stamp
            log.info("authorization policy %s reloaded (%s)", self.policy.name, self._path)
            if self.on_reload is not None:
                try:
                    self.on_reload()
                except Exception:  # the policy stands; only its record failed (logged)
                    log.exception("recording the policy reload failed")
        except (OSError, ValueError) as exc:
            log.error("authorization policy %s not reloaded, the one before stays: %s",
                      self._path, exc)

    def verdict(self, principal: str | None, path: str) -> tuple[bool, str]:
        self._maybe_reload()
        return self.policy.verdict(principal, path)

    def allows(self, principal: str | None, path: str) -> bool:
        return self.verdict(principal, path)[0]


def _refusal(principal: str | None) -> tuple[grpc.StatusCode, str]:
    if principal is None:
        return grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required"
    return grpc.StatusCode.PERMISSION_DENIED, f"{principal} may not call this method"


class Authorization(grpc.aio.ServerInterceptor):
    """Checks every call against the policy before its handler runs, and makes the caller's
    principal available to the handler (``current_principal``)."""

    def __init__(self, authorizer: Authorizer) -> None:
        self._authorizer = authorizer

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler]],
            handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        authorizer = self._authorizer

        async def admit(context: grpc.aio.ServicerContext) -> None:
            principal = identity_of(context)
            allowed, why = authorizer.verdict(principal, method)
            if not allowed:
                code, detail = _refusal(principal)
                audit_log.warning("authorization refused: principal=%s method=%s (%s)",
                                  principal or "-", method, why)
                metrics.AUTHZ_REFUSALS.labels(method, code.name).inc()
                await context.abort(code, detail)
            _principal.set(principal)

        def wrap(behavior: Callable) -> Callable:
            if inspect.isasyncgenfunction(behavior):
                async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                    await admit(context)
                    async for item in behavior(request, context):
                        yield item
                return stream

            async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await admit(context)
                result = behavior(request, context)
                return await result if inspect.isawaitable(result) else result
            return call

        return rewrap(handler, wrap)
