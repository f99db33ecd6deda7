"""OpenTelemetry traces, on when a collector is configured (``ledgerd --otlp-endpoint``, or the
standard ``OTEL_EXPORTER_OTLP_ENDPOINT``): a span per call served (kind SERVER, named by the
gRPC method, child of the caller's ``traceparent``) and per node-to-node call (kind CLIENT,
its context sent on in the call's metadata), exported in batches over OTLP/gRPC. So one
client request is one trace across every node that handles it, next to the request id that
the logs carry (``ledger.runtime.requests``; it is a span attribute too).

Off (the default), nothing is traced and the call path pays one flag test per call. The
ledger keeps its own tracer provider rather than the process-global one, so tests can turn
tracing on and off again (``configure``/``disable``); the propagator is W3C Trace Context.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from opentelemetry import propagate
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

SERVICE_NAME = "redledger"

_tracer: Tracer | None = None
_provider: Any = None


def enabled() -> bool:
    return _tracer is not None


def configure(endpoint: str | None, node: str, exporter: Any = None) -> bool:
    """Turn tracing on: spans go to the OTLP collector at ``endpoint`` (``host:port`` or a
    URL; plaintext on loopback), or to ``exporter`` (tests: an in-memory one, exported as
    each span ends). Returns whether tracing is on."""
    global _tracer, _provider
    if not endpoint and exporter is None:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create(
        {"service.name": SERVICE_NAME, "service.instance.id": node}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        target = str(endpoint) if "://" in str(endpoint) else f"http://{endpoint}"
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(
            endpoint=target, insecure=target.startswith("http://"))))
    _provider, _tracer = provider, provider.get_tracer("ledger")
    return True


def disable() -> None:
    """Turn tracing off, exporting what is buffered."""
    global _tracer, _provider
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


@contextlib.contextmanager
def server_span(method: str, metadata: Any, request_id: str) -> Iterator[Any]:
    """The span of one call served, child of the caller's trace context (if it sent one).
    Yields the span (None when tracing is off); the caller sets its gRPC code."""
    tracer = _tracer
    if tracer is None:
        yield None
        return
    carrier = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in metadata or ()}
    with tracer.start_as_current_span(method, context=propagate.extract(carrier),
                                      kind=SpanKind.SERVER,
                                      attributes={"rpc.system": "grpc",
                                                  "ledger.request_id": request_id}) as span:
        yield span


def end_code(span: Any, code: str) -> None:
    if span is not None:
        span.set_attribute("rpc.grpc.status_code", code)
        if code not in ("OK", "CANCELLED"):
            span.set_status(Status(StatusCode.ERROR, code))


@contextlib.contextmanager
def client_span(method: str) -> Iterator[list[tuple[str, str]]]:
    """A span around a call to another node; yields the metadata that carries its context
    (empty when tracing is off)."""
    tracer = _tracer
    if tracer is None:
        yield []
        return
    with tracer.start_as_current_span(method, kind=SpanKind.CLIENT,
                                      attributes={"rpc.system": "grpc"}):
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        yield list(carrier.items())
