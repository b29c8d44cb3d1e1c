"""Structured log records like containerd's (logrus text format), with request context.

One record is one line::

    time="2026-11-22T05:02:52.123456000Z" level=info msg="serving /run/containerd/s/ab12" \
namespace=default sandbox=web container=web logger=shim runtime=io.containerd.fractal.v1 pid=4242

``time``, ``level`` and ``msg`` first (logrus' order), then the fields: the process' defaults
(e.g. ``namespace``, ``sandbox``), the fields bound in the current context (:func:`bind`,
e.g. ``container``, ``exec``), the record's own (``log.info(..., extra={"fields": {...}})``),
``logger`` (the Python logger's name), then the process' trailing fields (``runtime``, ``pid``).
Values are quoted as logrus quotes them: only when they hold a character outside
``[A-Za-z0-9-._/@^+]`` (or are empty), with Go-style escapes, so a record never spans lines
(a traceback goes into ``error="..."`` with ``\\n`` escapes).  Every value is bounded
(:func:`clip`): ``msg``, ``error`` and ``stack`` at ``MAX_TEXT`` characters, other fields at
``MAX_FIELD``, the rest replaced by ``...(N chars)`` -- much of what the shim logs comes from
the guest (ids, events, error messages), and a 1 MiB id must not become a 1 MiB log record.  ``JsonFormatter`` writes the
same keys as one JSON object per line (logrus' JSON format).

Context fields live in a :class:`contextvars.ContextVar`: asyncio copies the context into
every task it creates, so whatever a request handler binds is carried by every record logged
while handling it -- and by the tasks it starts (stdio relays, exit waiters) -- without passing
ids around.  Threads do not inherit it (so the process-wide fields are formatter defaults).

Standard library only (``logging``, ``contextvars``, ``json``, ``time``): the shim daemon
imports this before it serves, and the snapshotter and CLI share it.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import time
from typing import Any, Callable, Iterator, Mapping

RUNTIME = "io.containerd.fractal.v1"

#: Fields bound in the current context (an immutable dict-like tuple of pairs).
_FIELDS: contextvars.ContextVar[tuple[tuple[str, str], ...]] = contextvars.ContextVar(
    "fractal_log_fields", default=())

#: logrus level names (CRITICAL is logrus' fatal).
LEVELS = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning",
          logging.ERROR: "error", logging.CRITICAL: "fatal"}

_SAFE_RE = re.compile(r"[A-Za-z0-9\-._/@^+]+")
#: Go strconv.Quote-style escapes of what must not appear raw in a quoted value.
_ESCAPES = {ord('"'): '\\"', ord("\\"): "\\\\", ord("\n"): "\\n", ord("\t"): "\\t",
            ord("\r"): "\\r"}
_ESCAPES.update({c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F) if c not in _ESCAPES})


#: longest msg/error/stack value and longest other field value of a record (characters)
MAX_TEXT = 16 * 1024
MAX_FIELD = 1024
_LONG_KEYS = frozenset({"msg", "error", "stack"})


def clip(value: str, limit: int) -> str:
    """`value` cut to `limit` characters, saying how long it was."""
    if len(value) <= limit:
        return value
    return f"{value[:limit]}...({len(value)} chars)"


def _bounded(pairs: dict[str, str]) -> dict[str, str]:
    return {k: clip(v, MAX_TEXT if k in _LONG_KEYS else MAX_FIELD) for k, v in pairs.items()}


def fields() -> dict[str, str]:
    """The fields bound in the current context."""
    return dict(_FIELDS.get())


def bind(**kv: Any) -> contextvars.Token:
    """Add fields to the current context (empty values are left out); returns the token for
    :func:`unbind`.  In an asyncio task the binding lasts as long as the task (and is inherited
    by the tasks it creates)."""
    merged = dict(_FIELDS.get())
    merged.update((k, str(v)) for k, v in kv.items() if v not in (None, ""))
    return _FIELDS.set(tuple(merged.items()))


def unbind(token: contextvars.Token) -> None:
    _FIELDS.reset(token)


@contextlib.contextmanager
def bound(**kv: Any) -> Iterator[None]:
    """``with bound(container=cid): ...``: fields for the records logged inside."""
    token = bind(**kv)
    try:
        yield
    finally:
        unbind(token)


def quote(value: str) -> str:
    """A logrus text value: bare if every character is safe, else a Go-style quoted string."""
    if _SAFE_RE.fullmatch(value):
        return value
    return '"' + value.translate(_ESCAPES) + '"'


def timestamp(created: float) -> str:
    """RFC 3339 with nanoseconds in UTC, as containerd's log.RFC3339NanoFixed."""
    secs = int(created)
    micros = int((created - secs) * 1e6)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{micros:06d}000Z"


class _Base(logging.Formatter):
    def __init__(self, defaults: Mapping[str, Any] | None = None,
                 trailing: Mapping[str, Any] | None = None, *, logger_field: bool = True) -> None:
        super().__init__()
        self.defaults = {k: str(v) for k, v in (defaults or {}).items() if v not in (None, "")}
        self.trailing = {k: str(v) for k, v in (trailing or {}).items() if v not in (None, "")}
        self.logger_field = logger_field

    def pairs(self, record: logging.LogRecord) -> dict[str, str]:
        out = {"time": timestamp(record.created),
               "level": LEVELS.get(record.levelno, record.levelname.lower()),
               "msg": record.getMessage()}
        out.update(self.defaults)
        ctx = getattr(record, "ctx_fields", None)  # set by ContextFilter when one is used
        out.update(_FIELDS.get() if ctx is None else ctx)
        extra = getattr(record, "fields", None)
        if isinstance(extra, Mapping):
            out.update((str(k), str(v)) for k, v in extra.items())
        if self.logger_field:
            out["logger"] = record.name
        out.update(self.trailing)
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["error"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return out


class LogfmtFormatter(_Base):
    """containerd's (logrus) text format: ``key=value`` pairs on one line."""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={quote(v)}" for k, v in _bounded(self.pairs(record)).items())


class JsonFormatter(_Base):
    """logrus' JSON format: one object per line, the same keys."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_bounded(self.pairs(record)), ensure_ascii=False)


class ContextFilter(logging.Filter):
    """Copies the context's fields onto the record (for handlers that format elsewhere,
    e.g. behind a QueueHandler); formatters read the context themselves otherwise."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.ctx_fields = _FIELDS.get()
        return True


def formatter(fmt: str = "text", **kw: Any) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter(**kw)
    if fmt == "text":
        return LogfmtFormatter(**kw)
    raise ValueError(f"unknown log format {fmt!r} (want text or json)")


def setup(stream: Any, *, debug: bool = False, fmt: str = "text", level: int | None = None,
          debug_loggers: tuple[str, ...] = (), **kw: Any) -> logging.Handler:
    """Route the root logger to ``stream`` in ``fmt``: INFO, or DEBUG with ``debug``.  With
    ``debug_loggers``, debug is turned on for those loggers only (the root stays at INFO:
    e.g. grpc's own debug output is noise to a user)."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter(fmt, **kw))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    if level is None:
        level = logging.DEBUG if debug and not debug_loggers else logging.INFO
    root.setLevel(level)
    if debug:
        for name in debug_loggers:
            logging.getLogger(name).setLevel(logging.DEBUG)
    return handler


# -- the shim's ttrpc services ----------------------------------------------------------------


_request_log = logging.getLogger("shim.request")


def request_fields(msg: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    cid = getattr(msg, "id", "") or getattr(msg, "container_id", "")
    if not cid and type(msg).__name__ == "StringValue":  # shim/layers.py: a JSON object
        try:
            from ccpu.agent import jsonbound  # a deep request must not break the logging

            obj = jsonbound.loads(msg.value or "{}")
            cid = obj.get("container", "") if isinstance(obj, dict) else ""
        except ValueError:
            cid = ""
    if isinstance(cid, str) and cid:
        out["container"] = cid
    exec_id = getattr(msg, "exec_id", "")
    if isinstance(exec_id, str) and exec_id:
        out["exec"] = exec_id
    return out


def with_request_fields(methods: Mapping[str, tuple[type, Callable[..., Any]]]
                        ) -> dict[str, tuple[type, Callable[..., Any]]]:
    """Wrap a ttrpc method table (``{name: (request class, async handler(msg, ctx))}``) so that
    every record logged while a request is handled carries its ``container`` (the request's
    ``id``) and ``exec`` (``exec_id``).  ccpu.ttrpc runs each call in an asyncio task of its
    own, so the binding is left in place for the rest of that task: the server's own
    "handler failed" record after the handler raised carries the ids too."""
    out: dict[str, tuple[type, Callable[..., Any]]] = {}
    for name, (cls, handler) in methods.items():
        async def call(msg: Any, ctx: Any, _handler: Callable[..., Any] = handler,
                       _name: str = name) -> Any:
            bind(**request_fields(msg))
            if _request_log.isEnabledFor(logging.DEBUG):  # -debug: one record per request
                _request_log.debug("%s %s", getattr(ctx, "service", ""), _name)
            return await _handler(msg, ctx)

        out[name] = (cls, call)
    return out
