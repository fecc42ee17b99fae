"""Request bodies read as RFC 8259 JSON, strictly: UTF-8 only, no control characters in any
string, bounded nesting. What fails is a `RequestValidationError`, FastAPI's 422 (main.py's
`invalid_request` shapes it); FastAPI's own reading answers bytes that are not UTF-8,
another charset or deep nesting with an undocumented 400, and lets an escaped NUL through
to fields that do not check for it (PostgreSQL then refuses the row: a 500).

Routers opt in with `APIRouter(route_class=StrictJSONRoute)` (FastAPI's documented way to
customise how a route reads its request): the body is read and checked before FastAPI's
handler, which then finds it parsed already.
"""

import json
import re
from collections.abc import Callable, Coroutine
from email.message import Message
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

from schemas import BODY_UNSAFE

# C0 controls but tab, LF and CR; DEL; C1. As a JSON escape (\u0000, after an even number of
# backslashes) or as a character (DEL and C1 may be written raw; raw C0 json refuses itself).
# Tab and line breaks are content in a text; the fields that refuse them say so themselves.
_ESCAPED_CONTROL = re.compile(
    r"(?<!\\)(?:\\\\)*\\u00(?:0[0-8bBcCeEfF]|1[0-9a-fA-F]|7[fF]|[89][0-9a-fA-F])"
)
_RAW_CONTROL = re.compile(r"[\x7f-\x9f]")
# Far deeper than any body of ours; well inside the interpreter's recursion limit.
MAX_DEPTH = 32


class UnreadableBody(ValueError):
    """The body is not JSON as we read it; `loc` is where, from the body down."""

    def __init__(self, message: str, loc: tuple[str | int, ...], kind: str = "json_invalid"):
        super().__init__(message)
        self.loc = loc
        self.kind = kind

    def as_validation_error(self) -> RequestValidationError:
        return RequestValidationError(
            [{"type": self.kind, "loc": ("body", *self.loc), "msg": str(self), "input": None}]
        )


# What almost every caller sends: no need to parse the header.
_PLAIN_JSON = frozenset(("application/json", "application/json; charset=utf-8"))


def is_json(content_type: str | None) -> bool:
    """Whether FastAPI reads a body of this type as JSON (it needs the header)."""
    if not content_type:
        return False
    if content_type.lower() in _PLAIN_JSON:
        return True
    header = Message()
    header["content-type"] = content_type
    subtype = header.get_content_subtype()
    return header.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


def parse_json(body: bytes, content_type: str | None = None) -> Any:
    """The JSON value of `body`, or an `UnreadableBody` saying what is wrong and where."""
    if content_type and content_type.lower() not in _PLAIN_JSON:
        header = Message()
        header["content-type"] = content_type
        charset = header.get_param("charset")
        if isinstance(charset, str) and charset.lower() not in ("utf-8", "utf8"):
            raise UnreadableBody(f"JSON must be UTF-8, not charset {charset[:40]}", ())
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnreadableBody(f"not valid UTF-8 (byte {exc.start})", ()) from None
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise UnreadableBody(f"JSON decode error: {exc.msg}", (exc.pos,)) from None
    except RecursionError:
        raise UnreadableBody(f"nested deeper than {MAX_DEPTH} levels", ()) from None
    except ValueError as exc:  # an integer past the interpreter's digit limit, NaN
        raise UnreadableBody(f"JSON decode error: {str(exc)[:80]}", ()) from None
    # Only a body with this many brackets can be nested this deep (a count is cheap).
    if text.count("[") + text.count("{") > MAX_DEPTH and _depth(value) > MAX_DEPTH:
        raise UnreadableBody(f"nested deeper than {MAX_DEPTH} levels", ())
    if _has_control(text):
        # Rare: find the string, to name the field.
        raise UnreadableBody(
            "must not contain control characters", _control_path(value), "string_control"
        )
    return value


def _has_control(text: str) -> bool:
    # The cheap tests first: a bulk of 10,000 addresses is 300 KB read on every request.
    if "\\u00" in text and _ESCAPED_CONTROL.search(text):
        return True
    if text.isascii():
        return "\x7f" in text
    return _RAW_CONTROL.search(text) is not None


def _no_constant(name: str) -> Any:
    # Python's json takes NaN and Infinity; RFC 8259 has no such values.
    raise ValueError(f"{name} is not a JSON value")


def _depth(value: Any) -> int:
    """How deep `value`'s arrays and objects nest (a scalar is 0), without recursion."""
    deepest = 0
    pending: list[tuple[int, Any]] = [(0, value)]
    while pending:
        depth, item = pending.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            continue
        deepest = max(deepest, depth + 1)
        pending.extend((depth + 1, child) for child in item)
    return deepest


def _control_path(value: Any) -> tuple[str | int, ...]:
    """Where in `value` the first string holding a control character is."""
    pending: list[tuple[tuple[str | int, ...], Any]] = [((), value)]
    while pending:
        path, item = pending.pop()
        if isinstance(item, str) and BODY_UNSAFE.search(item):
            return path
        if isinstance(item, dict):
            for key, child in item.items():
                if BODY_UNSAFE.search(key):
                    return (*path, key)
                pending.append(((*path, key), child))
        elif isinstance(item, list):
            pending.extend(((*path, index), child) for index, child in enumerate(item))
    return ()


class StrictJSONRoute(APIRoute):
    """A route whose JSON body is read by `parse_json` before FastAPI's handler runs."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def strict(request: Request) -> Response:
            content_type = request.headers.get("content-type")
            if is_json(content_type):
                body = await request.body()
                if body:
                    try:
                        # Starlette's Request.json() returns what it finds here.
                        request._json = parse_json(body, content_type)
                    except UnreadableBody as exc:
                        raise exc.as_validation_error() from None
            return await handler(request)

        return strict
