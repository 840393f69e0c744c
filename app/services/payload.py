"""Request-body decoding shared by the HTTP and WebSocket entry points.

Two guards run on the raw bytes, before any Python object is built (both C-speed ``bytes`` methods):

- **Nesting depth** (``MAX_JSON_DEPTH``): a tensor has at most 8 dimensions, so a legitimate body nests a
  dozen levels; anything deeper than 64 is refused with a 400 naming the limit. (orjson itself stops at
  1024, Python's json at the recursion limit with a ``RecursionError``, and orjson cannot write back
  what is deeper than 255: all of that was a 500.)
- **Value count** (``check_value_budget``): the number of scalars in a JSON body is its number of commas
  outside strings, plus one. A caller that knows the most values a request can carry (the model's
  bound, ``app.services.validation.value_budget``) refuses an oversize body before parsing it: a
  7.3 MB nested list cost ~0.5 s of event-loop CPU (orjson + numpy) on this machine before its 422;
  counting commas costs ~2 ms.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

from app.errors import BadRequest, InvalidInput

MAX_JSON_DEPTH = 64
# Values a body may carry beyond the tensors' own (names, shapes, parameters, outputs).
VALUE_BUDGET_SLACK = 4096

# Keep only brackets, with ``{}`` folded onto ``[]``: one ``replace(b"[]", b"")`` pass then removes exactly
# one level of nesting (the innermost pairs).
_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def _too_deep(max_depth: int) -> BadRequest:
    return BadRequest(
        f"request body is nested more than {max_depth} levels deep",
        {"field": "body", "max_depth": max_depth},
    )


def _bracket_depth(raw: bytes, max_depth: int) -> str:
    """``"ok"`` if the brackets of the text nest at most ``max_depth`` levels, ``"deep"`` if more,
    ``"unbalanced"`` if they do not pair up (invalid JSON, or brackets inside strings). Brackets inside
    strings can only add levels: with strings present, "deep" and "unbalanced" are measured again on the
    parsed value."""
    skeleton = raw.translate(_BRACKETS, _NOT_BRACKETS)
    for _ in range(max_depth):
        if not skeleton:
            return "ok"
        shorter = skeleton.replace(b"[]", b"")
        if len(shorter) == len(skeleton):
            return "unbalanced"
        skeleton = shorter
    return "deep" if skeleton else "ok"


def _value_depth_at_most(value: Any, max_depth: int) -> bool:
    """Breadth-first over containers only, one level at a time."""
    level = [value]
    for _ in range(max_depth):
        children: list[Any] = []
        for item in level:
            if isinstance(item, list):
                children.extend(x for x in item if isinstance(x, list | dict))
            elif isinstance(item, dict):
                children.extend(x for x in item.values() if isinstance(x, list | dict))
        if not children:
            return True
        level = children
    return False


def _decode(raw: bytes | str, max_depth: int) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):
            raise _too_deep(max_depth) from None
        try:
            return json.loads(raw)
        except RecursionError:
            raise _too_deep(max_depth) from None
        except (ValueError, UnicodeDecodeError):
            raise BadRequest(f"request body is not valid JSON: {exc}", {"field": "body"}) from None


def parse_json(
    raw: bytes | str, *, max_depth: int = MAX_JSON_DEPTH, max_values: int | None = None, what: str = "request"
) -> Any:
    """Strict JSON via orjson. Bodies with NaN/Infinity literals (what Python's json.dumps writes) are
    accepted here so that validation can answer 422 naming the input, rather than a vague 400.
    Deeper than ``max_depth``: 400 ``bad_request`` with ``details.max_depth``. ``max_values`` (the
    model's ``value_budget``): more values than that is a 422 before anything is parsed."""
    if not raw:
        raise BadRequest("request body is empty; expected JSON", {"field": "body"})
    data = raw.encode() if isinstance(raw, str) else raw
    check_value_budget(data, max_values, what=what)
    if data.count(b"[") + data.count(b"{") <= max_depth:  # so few brackets cannot nest deeper
        return _decode(raw, max_depth)
    verdict = _bracket_depth(data, max_depth)
    if verdict == "ok":
        return _decode(raw, max_depth)
    if verdict == "deep" and b'"' not in data:
        raise _too_deep(max_depth)  # no strings: the bracket count is exact
    value = _decode(raw, max_depth)  # invalid JSON fails here with orjson's message
    if not _value_depth_at_most(value, max_depth):
        raise _too_deep(max_depth)
    return value


def count_values(raw: bytes) -> int:
    """Scalars in a JSON text, counted on the bytes: commas outside strings, plus one. (Every comma
    separates two values, and a container with n > 0 children holds n - 1 commas.)"""
    commas = raw.count(b",")
    if commas and b'"' in raw:
        commas -= sum(m.group().count(b",") for m in _JSON_STRING.finditer(raw) if b"," in m.group())
    return commas + 1


def check_value_budget(raw: bytes, budget: int | None, *, what: str = "request") -> None:
    """Refuse (422, before any parsing) a body carrying more values than ``budget`` allows, plus
    ``VALUE_BUDGET_SLACK`` for names, shapes and parameters. ``budget=None``: no bound known."""
    if budget is None:
        return
    allowed = budget + VALUE_BUDGET_SLACK
    if raw.count(b",") < allowed:  # the cheap upper bound already fits: the common case
        return
    values = count_values(raw)
    if values > allowed:
        raise InvalidInput(
            f"inputs: the body carries {values} values; the {what} accepts at most {budget} "
            f"(max_batch_size x tensor dims)",
            {"field": "inputs", "expected": {"max_values": budget}, "received": {"values": values}},
        )
