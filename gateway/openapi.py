"""The OpenAPI 3.1 document of every HTTP route, served at /openapi.json.

Routes are described here by hand (the admin API in full); a module that adds
routes may instead call `describe(method, path, operation)` from its own
`setup_routes`. tests/test_openapi.py fails when any registered route is missing.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from gateway.dsr import MAX_DETAILS

Operation = dict[str, Any]

_EXTRA: dict[str, dict[str, Operation]] = {}


def describe(method: str, path: str, operation: Operation) -> None:
    """Add (or replace) the description of one route: `path` is aiohttp's canonical form."""
    _EXTRA.setdefault(path, {})[method.lower()] = operation


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _err(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


def _obj(**props: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props}


S = {"type": "string"}
INT = {"type": "integer"}
B = {"type": "boolean"}
# a privacy signal as a widget may send it: on when true, 1, "1", "yes" or "true"
SIGNAL = {"anyOf": [B, INT, S, {"type": "null"}]}
T = {"type": "string", "format": "date-time"}
U = {"type": "string", "format": "uuid"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


# any route that reads or writes PostgreSQL, while it is unreachable (gateway/app.py)
_STORAGE_DOWN = "`storage_unavailable`: PostgreSQL is unreachable; try again"


def _admin(
    summary: str,
    ok: dict[str, Any],
    *,
    status: str = "200",
    body: dict[str, Any] | None = None,
    params: list[dict[str, Any]] | None = None,
    errors: tuple[str, ...] = (),
) -> Operation:
    """An admin operation: bearer auth, 401 always possible, plus the listed errors."""
    texts = {
        "400": "Malformed request (body, query or cursor)",
        "404": "Not found, malformed id, or another tenant's object",
        "409": "Conflict (concurrent update, last active key)",
        "422": "Validation failed; `fields` lists every problem",
    }
    responses: dict[str, Any] = {
        status: ok,
        "401": _err("Missing, malformed, wrong or revoked admin key"),
        "503": _err(_STORAGE_DOWN),
    }
    for code in errors:
        responses[code] = _err(texts[code])
    op: Operation = {
        "tags": ["admin"],
        "summary": summary,
        "security": [{"adminKey": []}],
        "responses": responses,
    }
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if params:
        op["parameters"] = params
    return op


def _q(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _p(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": U, "description": description}


def _simple(tag: str, summary: str, ok: dict[str, Any], **extra: Any) -> Operation:
    return {"tags": [tag], "summary": summary, "responses": {"200": ok}, **extra}


_POLICY = _obj(version=INT, policy={"type": "object"})
_UPSTREAM = _obj(
    configured=B, base_url=_nullable(S), model=_nullable(S), api_key_last4=_nullable(S)
)
_ADMIN_KEY = _obj(id=U, label=S, last4=S, created_at=T, revoked_at=_nullable(T))
_SITE_KEY = _obj(id=U, prefix=S, created_at=T, revoked_at=_nullable(T))
_CONV = _obj(id=U, started_at=T, last_message_at=T, message_count=INT, anonymized=B)
_MESSAGE = _obj(seq=INT, role=S, text=S, at=T, status=S, reply_to=_nullable(INT))
_AUDIT = _obj(seq=INT, at=T, actor=S, action=S, target=S, details={"type": "object"})
_PAGE = [_q("limit", {"type": "integer", "minimum": 1, "maximum": 100}, "page size (default 50)")]
_PRIVACY_REQUEST = _obj(
    id=U,
    regime={"enum": ["gdpr", "ccpa"]},
    kind=S,
    status={"enum": ["received", "acknowledged", "completed", "rejected"]},
    created_at=T,
    ack_due_at=T,
    due_at=T,
    acknowledged_at=_nullable(T),
    extended_at=_nullable(T),
    extension_days=_nullable(INT),
    extension_reason=_nullable(S),
    closed_at=_nullable(T),
    resolution=_nullable(S),
    details=_nullable(S),
    subject_id=_nullable(U),
    overdue=B,
    ack_overdue=B,
)

_ADMIN_PATHS: dict[str, dict[str, Operation]] = {
    "/api/admin/policy": {
        "get": _admin("The current policy (ETag is the version)", _json(_POLICY)),
        "put": _admin(
            "Store a new policy version from a full or partial document merged on the current one;"
            " optional If-Match: <version>",
            _json(_obj(version=INT, policy={"type": "object"}, diff={"type": "object"})),
            body={"type": "object", "description": "policy fields (DESIGN §4), or {policy: {...}}"},
            errors=("400", "409", "422"),
        ),
    },
    "/api/admin/policy/history": {
        "get": _admin(
            "Every policy version, newest first",
            _json(
                _obj(
                    versions={
                        "type": "array",
                        "items": _obj(
                            version=INT, created_at=T, created_by=S, diff={"type": "object"}
                        ),
                    },
                    next_before=_nullable(INT),
                )
            ),
            params=[
                _q("limit", {"type": "integer", "minimum": 1, "maximum": 100}, "default 100"),
                _q("before", INT, "only versions < before (next_before of the previous page)"),
            ],
            errors=("400",),
        )
    },
    "/api/admin/conversations": {
        "get": _admin(
            "Conversation metadata (never text), newest activity first",
            _json(_obj(conversations={"type": "array", "items": _CONV}, next_cursor=_nullable(S))),
            params=[
                *_PAGE,
                _q("cursor", S, "next_cursor of the previous page"),
                _q("since", T, "last_message_at >= since"),
                _q("until", T, "last_message_at < until"),
                _q("subject", U, "only this subject's conversations"),
            ],
            errors=("400",),
        )
    },
    "/api/admin/conversations/{conversation_id}": {
        "get": _admin(
            "A decrypted transcript; the read is audited before it is returned",
            _json(
                _obj(
                    id=U,
                    started_at=T,
                    last_message_at=T,
                    message_count=INT,
                    anonymized=B,
                    messages={"type": "array", "items": _MESSAGE},
                )
            ),
            params=[_p("conversation_id", "conversation id")],
            errors=("404",),
        )
    },
    "/api/admin/keys": {
        "get": _admin(
            "Admin keys (never the secret)",
            _json(_obj(keys={"type": "array", "items": _ADMIN_KEY})),
        ),
        "post": _admin(
            "Create an admin key; `key` is shown only in this response",
            _json({**_ADMIN_KEY, "properties": {**_ADMIN_KEY["properties"], "key": S}}, "Created"),
            status="201",
            body=_obj(label=S),
            errors=("400", "422"),
        ),
    },
    "/api/admin/keys/{key_id}": {
        "delete": _admin(
            "Revoke an admin key",
            _json(_ADMIN_KEY),
            params=[_p("key_id", "admin key id")],
            errors=("404", "409"),
        ),
    },
    "/api/admin/site-keys": {
        "get": _admin(
            "Widget site keys (prefix only)",
            _json(_obj(keys={"type": "array", "items": _SITE_KEY})),
        ),
        "post": _admin(
            "Create a widget site key; `key` is shown only in this response",
            _json({**_SITE_KEY, "properties": {**_SITE_KEY["properties"], "key": S}}, "Created"),
            status="201",
        ),
    },
    "/api/admin/site-keys/{key_id}": {
        "delete": _admin(
            "Revoke a widget site key",
            _json(_SITE_KEY),
            params=[_p("key_id", "site key id")],
            errors=("404",),
        ),
    },
    "/api/admin/upstream": {
        "get": _admin("The tenant's own upstream, if any (never the key)", _json(_UPSTREAM)),
        "put": _admin(
            "Use the tenant's own OpenAI-compatible upstream",
            _json(_UPSTREAM),
            body={**_obj(api_key=S, base_url=S, model=S), "required": ["api_key", "base_url"]},
            errors=("400", "422"),
        ),
        "delete": _admin("Go back to the gateway's upstream", _json(_UPSTREAM)),
    },
    "/api/admin/identity-secret": {
        "post": _admin(
            "Rotate the identity-verification secret; shown only in this response",
            _json(_obj(identity_secret=S, algorithm=S), "Created"),
            status="201",
        )
    },
    "/api/admin/subjects/erase-by-user": {
        "post": _admin(
            "Erase the subject linked to a verified site user id",
            _json(_obj(erased=B, subject_id=U, certificate={"type": "object"})),
            body={**_obj(user_id=S), "required": ["user_id"]},
            errors=("400", "404", "422"),
        )
    },
    "/api/admin/subjects/erase-by-conversation": {
        "post": _admin(
            "Erase the subject behind a conversation (any visitor, verified or not)",
            _json(_obj(erased=B, subject_id=U, certificate={"type": "object"})),
            body={**_obj(conversation_id=U), "required": ["conversation_id"]},
            errors=("400", "404", "422"),
        )
    },
    "/api/admin/audit": {
        "get": _admin(
            "Audit entries, newest first",
            _json(_obj(entries={"type": "array", "items": _AUDIT}, next_before=_nullable(INT))),
            params=[*_PAGE, _q("before", INT, "only entries with seq < before")],
            errors=("400",),
        )
    },
    "/api/admin/audit/verify": {
        "get": _admin(
            "Verify the tenant's audit hash chain",
            _json(_obj(ok=B, broken_at=_nullable(INT), checked=INT)),
        )
    },
}

# the fallback's body: a `message` frame that may carry the `hello` fields
_FALLBACK_BODY = {
    **_obj(
        type={"const": "message"},
        id={"type": "string", "minLength": 1, "maxLength": 128},
        text={"type": "string", "minLength": 1},
        hello={
            "anyOf": [
                {
                    **_obj(
                        session_token=_nullable(S),
                        consent=_nullable({"type": "object", "additionalProperties": B}),
                        signals=_nullable(_obj(dnt=SIGNAL, gpc=SIGNAL)),
                        user=_nullable(_obj(id=S, hash=S)),
                        age_confirmed=B,
                        context=_nullable({"type": "object"}),
                    ),
                    "additionalProperties": False,
                },
                {"type": "null"},
            ],
            "description": "the `hello` fields (`type` and `v` implied); null or absent: none",
        },
    ),
    "required": ["id", "text"],
    "additionalProperties": False,
}
# the site key is looked up (and the policy read) before anything is answered; this
# refusal is plain JSON, without CORS headers, so a browser page cannot read it
_SITE_DOWN = (
    "`storage_unavailable`: the site could not be looked up (PostgreSQL unreachable); "
    "Retry-After: 1. No CORS headers"
)

_WIDGET_PATHS: dict[str, dict[str, Operation]] = {
    "/v1/widget/ws": {
        "get": {
            "tags": ["widget"],
            "summary": "Widget WebSocket (protocol in docs/protocol.md); Origin must be allowed",
            "parameters": [{"name": "site", "in": "query", "required": True, "schema": S}],
            "responses": {
                "101": {"description": "Switching Protocols"},
                "403": {"description": "Origin not allowed or unknown site key"},
                "429": {
                    "description": "Too many open sockets from this address "
                    "(OMNIGATE_MAX_CONNECTIONS_PER_IP); Retry-After: 10",
                    "headers": {"Retry-After": {"schema": INT}},
                },
            },
        }
    },
    "/v1/widget/chat": {
        "post": {
            "tags": ["widget"],
            "summary": "HTTP fallback: one message, answered as text/event-stream",
            "parameters": [{"name": "site", "in": "query", "required": True, "schema": S}],
            "requestBody": {
                "required": True,
                "description": "A `message` frame (docs/protocol.md), at most "
                "OMNIGATE_MAX_FRAME_BYTES; another Content-Type than application/json, or a "
                "body that is not such a frame, is answered 200 with one `error` event",
                "content": {"application/json": {"schema": _FALLBACK_BODY}},
            },
            "responses": {
                "200": {
                    "description": "welcome/consent_required/ack/delta/done/error events; "
                    "every refusal of the body is an `error` event",
                    "content": {"text/event-stream": {"schema": S}},
                },
                "403": {"description": "Origin not allowed or unknown site key"},
                "405": {"description": "Any other method; Allow: OPTIONS,POST"},
                "503": _err(_SITE_DOWN),
            },
        },
        "options": {
            "tags": ["widget"],
            "summary": "CORS preflight",
            "parameters": [{"name": "site", "in": "query", "required": True, "schema": S}],
            "responses": {
                "204": {"description": "Preflight answered (allows the Content-Type header)"},
                "403": {"description": "Origin not allowed or unknown site key"},
                "503": _err(_SITE_DOWN),
            },
        },
    },
}


def _visitor(
    summary: str,
    ok: dict[str, Any] | None = None,
    *,
    status: str = "200",
    errors: dict[str, str] | None = None,
) -> Operation:
    """A visitor privacy operation, authenticated by the session (cookie or header).

    401 and 403 (`origin_not_allowed`: a cross-origin call from an origin the tenant
    does not allow) are always possible; `errors` adds the operation's own.
    """
    responses: dict[str, Any] = {
        status: ok or _json({"type": "object"}),
        "401": _err("`session_invalid`: no valid session"),
        "403": _err("`origin_not_allowed`: an Origin the tenant's policy does not allow"),
        "503": _err(_STORAGE_DOWN),
    }
    for code, text in (errors or {}).items():
        responses[code] = _err(text)
    return {
        "tags": ["privacy"],
        "summary": summary,
        "security": [{"session": []}],
        "responses": responses,
    }


_BAD_BODY = "`bad_request`: the body is not a JSON object"
_UNKNOWN_KIND = (
    f"`unknown_kind` (`allowed` lists the kinds), or `too_large`: details over {MAX_DETAILS}"
    " characters"
)


def _static(summary: str, media: str) -> Operation:
    return _simple("widget", summary, {"description": "OK", "content": {media: {"schema": S}}})


# Summaries of routes owned by the privacy and widget modules; their owners may
# refine them with describe() from their own setup_routes.
_PRIVACY_PATHS: dict[str, dict[str, Operation]] = {
    "/api/privacy/consent": {
        "get": _visitor("The visitor's current consent per purpose"),
        "post": _visitor(
            "Grant or revoke purposes",
            errors={"400": _BAD_BODY, "422": "`unknown_purpose`: not a list of known purposes"},
        ),
    },
    "/api/privacy/export": {"get": _visitor("Everything held about the visitor, as JSON")},
    "/api/privacy/delete": {
        "post": _visitor("Erase the visitor now; returns a signed certificate")
    },
    "/api/privacy/certificate-key": {
        "get": _simple(
            "privacy", "Public key that verifies deletion certificates", _json({"type": "object"})
        )
    },
    "/api/gdpr/request": {
        "post": _visitor(
            "File a GDPR request (acknowledged in 48 h, due in one month, 30 days at most)",
            _json({"type": "object"}, "Created"),
            status="201",
            errors={"400": _BAD_BODY, "422": _UNKNOWN_KIND},
        )
    },
    "/api/gdpr/request/{id}": {
        "get": _visitor(
            "Status of a GDPR or CCPA request",
            errors={"404": "`not_found`: no such request of this visitor, or a malformed id"},
        )
    },
    "/api/privacy/ccpa/request": {
        "post": _visitor(
            "File a CCPA request (due in 45 days)",
            _json({"type": "object"}, "Created"),
            status="201",
            errors={"400": _BAD_BODY, "422": _UNKNOWN_KIND},
        )
    },
    "/.well-known/gpc.json": {
        "get": _simple("privacy", "Global Privacy Control support", _json(_obj(gpc=B)))
    },
    "/api/admin/requests": {
        "get": _admin(
            "Privacy requests of the tenant, with deadlines (reading details is audited)",
            _json(
                _obj(
                    requests={"type": "array", "items": _PRIVACY_REQUEST},
                    next_cursor=_nullable(S),
                )
            ),
            params=[
                _q(
                    "status",
                    {
                        "enum": [
                            "received",
                            "acknowledged",
                            "completed",
                            "rejected",
                            "open",
                            "overdue",
                            "ack_overdue",
                        ]
                    },
                    "only requests of this status or filter (absent: all)",
                ),
                _q("limit", INT, "default 100, clamped to 1-1000"),
                _q("cursor", S, "next_cursor of the previous page (with the same status)"),
            ],
            errors=("400", "422"),
        )
    },
    "/api/admin/requests/{id}/{action}": {
        "post": _admin(
            "Acknowledge, extend, complete or reject a privacy request",
            _json(_PRIVACY_REQUEST),
            params=[
                _p("id", "request id"),
                {
                    "name": "action",
                    "in": "path",
                    "required": True,
                    "schema": {"enum": ["acknowledge", "extend", "complete", "reject"]},
                },
            ],
            errors=("404", "409", "422"),
        )
    },
    "/widget.js": {"get": _static("The embeddable widget script", "text/javascript")},
    "/widget.css": {"get": _static("The widget's stylesheet", "text/css")},
    "/demo": {"get": _static("Demo page embedding the widget", "text/html")},
    "/demo.css": {"get": _static("The demo page's stylesheet", "text/css")},
}

_OPS_PATHS: dict[str, dict[str, Operation]] = {
    "/healthz": {"get": _simple("operations", "The process answers", _json(_obj(status=S)))},
    "/readyz": {
        "get": {
            **_simple(
                "operations",
                "Database reachable and migrations current",
                _json(_obj(status=S, checks={"type": "object"})),
            ),
            "responses": {"200": _json(_obj(status=S)), "503": {"description": "Not ready"}},
        }
    },
    "/metrics": {
        "get": {
            **_simple(
                "operations",
                "Prometheus text format; a bearer token when OMNIGATE_METRICS_TOKEN is set,"
                " else loopback peers only",
                {"description": "OK", "content": {"text/plain": {"schema": S}}},
                security=[{"metricsToken": []}, {}],
            ),
            "responses": {
                "200": {"description": "OK", "content": {"text/plain": {"schema": S}}},
                "401": {"description": "A token is configured and the request lacks it"},
                "403": {
                    "description": "No token is configured and the peer is not loopback, "
                    "or the request came through a proxy"
                },
            },
        }
    },
    "/openapi.json": {"get": _simple("operations", "This document", _json({"type": "object"}))},
}


def document() -> dict[str, Any]:
    """The whole OpenAPI 3.1 document."""
    paths: dict[str, dict[str, Operation]] = {}
    for group in (_WIDGET_PATHS, _OPS_PATHS, _PRIVACY_PATHS, _ADMIN_PATHS, _EXTRA):
        for path, ops in group.items():
            paths.setdefault(path, {}).update(ops)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "omnigate",
            "version": "1",
            "description": "Privacy-enforcing gateway between a chat widget and an "
            "OpenAI-compatible model. Admin API reference: docs/admin-api.md.",
        },
        "paths": dict(sorted(paths.items())),
        "components": {
            "securitySchemes": {
                "adminKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A site-owner admin key (ak_...)",
                },
                "session": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Authorization",
                    "description": "`Session <token>`, or the __Host-omnigate_session cookie",
                },
                "metricsToken": {"type": "http", "scheme": "bearer"},
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message"],
                            "properties": {
                                "code": S,
                                "message": S,
                                "fields": {"type": "array", "items": _obj(field=S, message=S)},
                            },
                        }
                    },
                }
            },
        },
    }


async def openapi_json(request: web.Request) -> web.Response:
    """Serve the OpenAPI document."""
    return web.Response(body=orjson.dumps(document()), content_type="application/json")
