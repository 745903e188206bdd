"""The widget protocol: error codes, frame validation and envelopes, in one place."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson

PROTOCOL_VERSION: Final = 1

# The closed set of error codes (DESIGN §3).
BAD_REQUEST: Final = "bad_request"
UNKNOWN_TYPE: Final = "unknown_type"
TOO_LARGE: Final = "too_large"
RATE_LIMITED: Final = "rate_limited"
CONSENT_REQUIRED: Final = "consent_required"
SESSION_INVALID: Final = "session_invalid"
UPSTREAM_UNAVAILABLE: Final = "upstream_unavailable"
UPSTREAM_TIMEOUT: Final = "upstream_timeout"
UPSTREAM_REJECTED: Final = "upstream_rejected"
STORAGE_UNAVAILABLE: Final = "storage_unavailable"
INTERNAL: Final = "internal"

ERROR_CODES: Final = frozenset(
    {
        BAD_REQUEST,
        UNKNOWN_TYPE,
        TOO_LARGE,
        RATE_LIMITED,
        CONSENT_REQUIRED,
        SESSION_INVALID,
        UPSTREAM_UNAVAILABLE,
        UPSTREAM_TIMEOUT,
        UPSTREAM_REJECTED,
        STORAGE_UNAVAILABLE,
        INTERNAL,
    }
)

MAX_CLIENT_ID = 128
MAX_HISTORY_LIMIT = 100


class ProtocolError(Exception):
    """A typed failure answered to the client as an `error` frame."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        id: str | None = None,
        retry_after: float | None = None,
        outcome: str | None = None,
        reason: str | None = None,
    ) -> None:
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id
        self.retry_after = retry_after
        # a finer cause within the code, from a closed set (docs/protocol.md): `busy`
        self.reason = reason
        # the message outcome for metrics when the code alone does not say it
        self.outcome = outcome


# Field specs: name -> (accepted types, required). bool is excluded from int on purpose.
Spec = Mapping[str, tuple[tuple[type, ...], bool]]

CLIENT_FRAMES: Final[dict[str, Spec]] = {
    "hello": {
        "v": ((int,), True),
        "session_token": ((str, type(None)), False),
        "consent": ((dict, type(None)), False),
        "signals": ((dict, type(None)), False),
        "user": ((dict, type(None)), False),
        "age_confirmed": ((bool,), False),
        "context": ((dict, type(None)), False),
    },
    "message": {"id": ((str,), True), "text": ((str,), True)},
    "consent": {
        "grant": ((list,), False),
        "revoke": ((list,), False),
        "age_confirmed": ((bool,), False),
    },
    "history": {"before": ((int, type(None)), False), "limit": ((int, type(None)), False)},
    "ping": {},
}


@dataclass(frozen=True)
class Frame:
    """A validated client frame."""

    type: str
    data: dict[str, Any]


def parse_frame(raw: str | bytes) -> Frame:
    """Decode and validate one client frame, raising ProtocolError with a typed code."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ProtocolError(BAD_REQUEST, "frame is not valid JSON") from None
    if not isinstance(data, dict):
        raise ProtocolError(BAD_REQUEST, "frame must be a JSON object")
    ftype = data.get("type")
    # errors name the frame's id when it has one short enough to echo (even if empty)
    raw_id = data.get("id")
    msg_id = raw_id if isinstance(raw_id, str) and len(raw_id) <= MAX_CLIENT_ID else None
    if not isinstance(ftype, str):
        raise ProtocolError(BAD_REQUEST, "frame needs a string 'type'", id=msg_id)
    spec = CLIENT_FRAMES.get(ftype)
    if spec is None:
        raise ProtocolError(UNKNOWN_TYPE, "unknown frame type", id=msg_id)
    for name, value in data.items():
        if name == "type":
            continue
        field = spec.get(name)
        if field is None:
            raise ProtocolError(BAD_REQUEST, f"unknown field {name!r} in {ftype}", id=msg_id)
        types, _ = field
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise ProtocolError(BAD_REQUEST, f"field {name!r} has the wrong type", id=msg_id)
    for name, (_, required) in spec.items():
        if required and name not in data:
            raise ProtocolError(BAD_REQUEST, f"{ftype} needs field {name!r}", id=msg_id)
    if ftype == "message":
        if not 0 < len(data["id"]) <= MAX_CLIENT_ID:
            raise ProtocolError(BAD_REQUEST, "message id must be 1-128 characters", id=msg_id)
        if not data["text"].strip():
            raise ProtocolError(BAD_REQUEST, "message text is empty", id=msg_id)
    if ftype == "history":
        limit = data.get("limit")
        if limit is not None and not 1 <= limit <= MAX_HISTORY_LIMIT:
            raise ProtocolError(BAD_REQUEST, f"limit must be 1-{MAX_HISTORY_LIMIT}")
        before = data.get("before")
        if before is not None and not 0 < before < 2**63:
            raise ProtocolError(BAD_REQUEST, "before must be a positive seq")
    if ftype == "consent":
        for key in ("grant", "revoke"):
            if not all(isinstance(p, str) for p in data.get(key, ())):
                raise ProtocolError(BAD_REQUEST, f"{key} must list purpose names")
    if ftype == "hello" and data["v"] != PROTOCOL_VERSION:
        raise ProtocolError(BAD_REQUEST, "unsupported protocol version")
    return Frame(ftype, data)


def error_frame(exc: ProtocolError) -> dict[str, Any]:
    """The `error` envelope for a typed failure."""
    frame: dict[str, Any] = {"type": "error", "code": exc.code, "message": exc.message}
    if exc.id is not None:
        frame["id"] = exc.id
    if exc.retry_after is not None:
        frame["retry_after"] = exc.retry_after
    if exc.reason is not None:
        frame["reason"] = exc.reason
    return frame


def ack(msg_id: str, seq: int | None) -> dict[str, Any]:
    """The visitor message is stored (seq) or deliberately not stored (seq None)."""
    return {"type": "ack", "id": msg_id, "seq": seq}


def delta(msg_id: str, text: str) -> dict[str, Any]:
    """A piece of the streamed reply."""
    return {"type": "delta", "id": msg_id, "text": text}


def done(msg_id: str, seq: int | None, finish_reason: str) -> dict[str, Any]:
    """The reply is complete (and stored when seq is set)."""
    return {"type": "done", "id": msg_id, "seq": seq, "finish_reason": finish_reason}


def consent_required(purposes: list[str]) -> dict[str, Any]:
    """The policy needs these purposes before chatting."""
    return {"type": "consent_required", "purposes": purposes}


def encode(frame: Mapping[str, Any]) -> bytes:
    """Serialize a frame to the UTF-8 JSON a WebSocket text frame carries."""
    return orjson.dumps(frame)
