"""X-Request-ID: every HTTP request's id (the client's header, or one made here), echoed on its
response and carried by every log line written while it is served: the guide's `xid` pattern, a
context variable that a logging filter reads.

Sanic serves a connection's requests one after another in one task, and the engine reports a
finished request (RequestStream.close, AsyncEngine.embed) in the task of the HTTP request it
belongs to, so the variable set when a request's head arrives is the one its log lines see.
"""
from __future__ import annotations

import logging
import uuid
from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports this module for its log format, and needs no Sanic for that
    from sanic import Request

HEADER = "X-Request-ID"
# What the handler of `jaxserve serve` prints; xid_tag is " [xid=...]" inside a request, else "".
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s%(xid_tag)s: %(message)s"
_MAX_LENGTH = 200  # a longer client id is cut: it is echoed and logged, never trusted

_current: ContextVar[Request | None] = ContextVar("jaxserve_request", default=None)


def begin(request: Request) -> str:
    """Give a request whose head just arrived its id (request.ctx.request_id) and make it the
    current request of this task."""
    request_id = request.headers.get("x-request-id", "")[:_MAX_LENGTH] or uuid.uuid4().hex
    request.ctx.request_id = request_id
    _current.set(request)
    return request_id


def current_request() -> Request | None:
    """The HTTP request this task serves (None outside one: the engine thread, start-up)."""
    return _current.get()


def current() -> str:
    """The current request's id, "" outside a request."""
    request = _current.get()
    return getattr(request.ctx, "request_id", "") if request is not None else ""


class XidFilter(logging.Filter):
    """Sets `xid` on each record: the current request's id, unless the caller named one
    (``extra={"xid": ...}``: the engine thread, which serves every request at once), and
    `xid_tag` for LOG_FORMAT. Put it on a handler, so records of every child logger pass it."""

    def filter(self, record: logging.LogRecord) -> bool:
        xid = getattr(record, "xid", None) or current()
        record.xid = xid
        record.xid_tag = f" [xid={xid}]" if xid else ""
        return True
