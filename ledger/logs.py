"""How ledger processes log: text (the default) or JSON lines (``--log-format json``), every
record with the request id it was written for (``ledger.runtime.requests``; empty outside a
request) and the node.

JSON comes from ``python-json-logger`` (a well-kept formatter for the standard ``logging``
module): one object per line with ``time``, ``level``, ``logger``, ``message``,
``request_id``, ``node`` and, for an exception, ``exc_info``; a log pipeline indexes them
without parsing text. No request content is logged anywhere (no amounts with wallet ids, no
memos): records name methods, shards, references and ids.
"""

from __future__ import annotations

import logging

from pythonjsonlogger.json import JsonFormatter

from ledger.runtime.requests import REQUEST_ID

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s %(node)s"


class RequestContext(logging.Filter):
    """Adds ``request_id`` (of the request being served) and ``node`` to every record."""

    def __init__(self, node: str = "") -> None:
        super().__init__()
        self.node = node

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        record.node = self.node
        return True


def configure(level: str = "INFO", fmt: str = "text", node: str = "") -> None:
    """Set up the root logger of a ledger process (replaces its handlers)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}")
    handler = logging.StreamHandler()
    handler.addFilter(RequestContext(node))
    if fmt == "json":
        handler.setFormatter(JsonFormatter(
            JSON_FIELDS, rename_fields={"asctime": "time", "levelname": "level",
                                        "name": "logger"}))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
