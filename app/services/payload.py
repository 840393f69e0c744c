"""Request-body decoding shared by the HTTP and WebSocket entry points (and the jobs service): large
bodies are decoded off the event loop (``decode_off_loop``).

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

import asyncio
import gc
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import orjson

from app.errors import BadRequest, GatewayError, InvalidInput

T = TypeVar("T")
# Bodies larger than this are decoded in a worker thread: parsing and validating a few MB costs tens of
# milliseconds, which would hold every other request on the event loop; small bodies (the common case)
# are decoded in place, where a thread hop would cost more than the decode.
OFF_LOOP_BYTES = 256 * 1024


async def decode_off_loop(size: int, decode: Callable[..., T], *args: Any) -> T:
    """``decode(*args)``, in a worker thread when the body is ``size`` > ``OFF_LOOP_BYTES`` bytes."""
    if size <= OFF_LOOP_BYTES:
        return decode(*args)
    return await asyncio.to_thread(decode, *args)


MAX_JSON_DEPTH = 64
# Values a body may carry beyond the tensors' own (names, shapes, parameters, outputs).
VALUE_BUDGET_SLACK = 4096
# Arrays and objects a body may hold beyond its tensors' own (the body, tensor entries, shapes, parameters).
CONTAINER_SLACK = 256


@dataclass(frozen=True, slots=True)
class ContainerBudget:
    """The most arrays and objects a request's tensors can hold: ``fixed`` whatever the values, plus
    ``per_value`` for each value (the nesting levels below a variable dimension, where every array holds
    at least one value). From the model (``app.services.validation.container_budget``), else ``ANY_MODEL``."""

    fixed: int
    per_value: int


# No model known yet (a job body, a WebSocket frame): a tensor has at most 8 dimensions, so each value
# sits in at most 8 arrays of its own.
ANY_MODEL = ContainerBudget(0, 8)
_WHITESPACE = b" \t\r\n"
_FEW_STRINGS = 4096

# Keep only brackets, with ``{}`` folded onto ``[]``: one ``replace(b"[]", b"")`` pass then removes exactly
# one level of nesting (the innermost pairs).
_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # unrolled: runs at C speed
_SMALL_SKELETON = 2048  # brackets: at most 64 passes over 2 KB, cheaper than numpy's set-up
_OPEN = np.int8(92)  # between "[" (91) and "]" (93)


def _too_deep(max_depth: int) -> BadRequest:
    return BadRequest(
        f"request body is nested more than {max_depth} levels deep",
        {"field": "body", "max_depth": max_depth},
    )


def _bracket_depth(raw: bytes, max_depth: int) -> str:
    """``"ok"`` if the brackets of the text nest at most ``max_depth`` levels, ``"deep"`` if more,
    ``"unbalanced"`` if they do not pair up (invalid JSON, or brackets inside strings). Brackets inside
    strings can only add levels: with strings present, "deep" and "unbalanced" are measured again on the
    parsed value. Large bodies: one linear pass in numpy over the brackets (a running sum of +1 / -1); the
    pass per level it replaces cost 1.6 s for a 7.3 MB ``[[[[…]]]]``."""
    skeleton = raw.translate(_BRACKETS, _NOT_BRACKETS)
    if len(skeleton) <= _SMALL_SKELETON:  # a few µs: one ``replace`` pass per level, innermost pairs first
        for _ in range(max_depth):
            if not skeleton:
                return "ok"
            shorter = skeleton.replace(b"[]", b"")
            if len(shorter) == len(skeleton):
                return "unbalanced"
            skeleton = shorter
        return "deep" if skeleton else "ok"
    steps = np.frombuffer(skeleton, dtype=np.uint8).view(np.int8)
    levels = np.cumsum(_OPEN - steps, dtype=np.int32)  # "[" (91) -> +1, "]" (93) -> -1
    if int(levels.min()) < 0 or int(levels[-1]) != 0:
        return "unbalanced"
    return "deep" if int(levels.max()) > max_depth else "ok"


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


# Above this many arrays and objects, the cyclic garbage collector is paused while a body is parsed: every
# new list counts as an allocation, and the collections that set off took ~80% of the time of a body of a
# million small arrays (0.9 s -> 0.2 s for 7.3 MB); the lists are acyclic, so nothing is left behind.
_GC_PAUSE_CONTAINERS = 50_000


def _decode(raw: bytes | str, max_depth: int, containers: int = 0) -> Any:
    if containers > _GC_PAUSE_CONTAINERS and gc.isenabled():
        gc.disable()
        try:
            return _decode(raw, max_depth)
        finally:
            gc.enable()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):
            raise _too_deep(max_depth) from None
        if len(raw) > SLOW_PARSE_MAX_BYTES:
            # Python's json is ~10x slower than orjson and holds the interpreter lock throughout (a 7 MB body:
            # ~0.35 s, the event loop's too): above this size only orjson's verdict is given.
            raise _not_json(raw, exc) from None
        try:
            value = json.loads(raw)
        except RecursionError:
            raise _too_deep(max_depth) from None
        except (ValueError, UnicodeDecodeError):
            raise BadRequest(f"request body is not valid JSON: {exc}", {"field": "body"}) from None
        escaped = "\\u" in raw if isinstance(raw, str) else b"\\u" in raw
        if escaped:  # Python's json lets a lone "\ud800" escape in: refuse it
            _refuse_lone_surrogates(value)
        return value


# Bodies orjson refuses are parsed again by Python's json up to this size, to name the input that holds a
# NaN/Infinity literal or a lone surrogate (~10 ms at this size); larger ones get orjson's message.
SLOW_PARSE_MAX_BYTES = 256 * 1024


def _not_json(raw: bytes | str, exc: orjson.JSONDecodeError) -> GatewayError:
    data = raw.encode(errors="surrogatepass") if isinstance(raw, str) else raw
    if b"NaN" in data or b"Infinity" in data:
        return InvalidInput(
            "values must be finite numbers: the body holds NaN or Infinity literals (not JSON either)",
            {"field": "body", "expected": "finite numbers"},
        )
    return BadRequest(f"request body is not valid JSON: {exc}", {"field": "body"})


def _refuse_lone_surrogates(value: Any) -> None:
    """400 naming the first string (or object key) holding a lone UTF-16 surrogate, which is not text:
    it cannot be encoded as UTF-8 (for Triton, the cache key, an error body or a log line)."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                where = f"{path}.{_printable(key)}" if path else _printable(key)
                if not _is_text(key):
                    raise _not_text(where, "a name")
                stack.append((where, child))
        elif isinstance(item, list):
            stack.extend(
                (f"{path}[{i}]", child)
                for i, child in enumerate(item)
                if isinstance(child, str | list | dict)
            )
        elif isinstance(item, str) and not _is_text(item):
            raise _not_text(path or "body", "a value")


def _is_text(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode()


def _not_text(field: str, what: str) -> BadRequest:
    return BadRequest(
        f"{field}: {what} holds a lone UTF-16 surrogate escape (e.g. \\ud800), which is not text; "
        "send valid Unicode",
        {"field": field},
    )


def parse_json(
    raw: bytes | str,
    *,
    max_depth: int = MAX_JSON_DEPTH,
    max_values: int | None = None,
    what: str = "request",
    containers: ContainerBudget = ANY_MODEL,
) -> Any:
    """Strict JSON via orjson. Bodies with NaN/Infinity literals (what Python's json.dumps writes) are
    accepted here so that validation can answer 422 naming the input, rather than a vague 400.
    Deeper than ``max_depth``: 400 ``bad_request`` with ``details.max_depth``. ``max_values`` (the
    model's ``value_budget``): more values than that is a 422 before anything is parsed; so is a body
    holding more arrays and objects than ``containers`` allows (``check_containers``). Every check is a
    linear pass at C speed over the bytes: no body within the size limit costs more than milliseconds
    before it is refused."""
    if not raw:
        raise BadRequest("request body is empty; expected JSON", {"field": "body"})
    data = raw.encode() if isinstance(raw, str) else raw
    check_value_budget(data, max_values, what=what)
    brackets = data.count(b"[") + data.count(b"{")
    if brackets <= max_depth:  # so few brackets cannot nest deeper
        return _decode(raw, max_depth)
    check_containers(data, containers, brackets, what=what, max_depth=max_depth)
    verdict = _bracket_depth(data, max_depth)
    if verdict == "ok":
        return _decode(raw, max_depth, brackets)
    if verdict == "deep" and b'"' not in data:
        raise _too_deep(max_depth)  # no strings: the bracket count is exact
    value = _decode(raw, max_depth, brackets)  # invalid JSON fails here with orjson's message
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


def _strings(data: bytes) -> list[bytes] | None:
    """The strings of a text with few of them (found by a quote search, each matched from its opening
    quote: no scan of the rest of the text); None when there are many."""
    if data.count(b'"') > _FEW_STRINGS:
        return None
    found, pos = [], 0
    while (start := data.find(b'"', pos)) >= 0:
        match = _JSON_STRING.match(data, start)
        if match is None:
            break  # unterminated: not JSON (orjson says so)
        found.append(match.group())
        pos = match.end()
    return found


def _outside_strings(data: bytes) -> bytes:
    """The text without its strings, for a text with many: quote parity in numpy (linear) when nothing
    is escaped; with escapes, the text as it is (brackets in strings then count, which can only refuse)."""
    if b"\\" in data:
        return data
    chars = np.frombuffer(data, dtype=np.uint8)
    quote = chars == ord('"')
    inside = (np.cumsum(quote, dtype=np.int32) & 1).astype(bool)  # from an opening quote to its closing one
    return chars[~inside | quote].tobytes()


def _structure(text: bytes, strings: list[bytes], count: Any) -> int:
    """``count(part)`` over the text less the same over its strings (what is not inside a string)."""
    return int(count(text)) - sum(int(count(s)) for s in strings)


def _arrays(part: bytes) -> int:
    return part.count(b"[") + part.count(b"{")


def _commas(part: bytes) -> int:
    return part.count(b",")


def _empty_arrays(part: bytes) -> int:
    return part.translate(_BRACKETS, _WHITESPACE).count(b"[]")


def check_containers(
    data: bytes,
    budget: ContainerBudget,
    brackets: int | None = None,
    *,
    what: str = "request",
    max_depth: int = MAX_JSON_DEPTH,
) -> None:
    """Refuse (422, before parsing) a body holding more arrays and objects than its tensors can:
    ``[[[]],[[]],…]`` or ``[[[[…]]]]`` of 7.3 MB carry no values but millions of arrays, each a Python list
    to build (~1-3 s of event-loop CPU). Values are counted as in ``count_values``, less empty arrays.
    Brackets and commas inside strings are not structure: they are counted apart and left out."""
    if brackets is None:
        brackets = _arrays(data)
    allowed = budget.fixed + CONTAINER_SLACK
    if brackets <= allowed:
        return
    strings = _strings(data) if b'"' in data else []
    if strings is None:  # many strings: count on the text without them
        data, strings = _outside_strings(data), []
        brackets = _arrays(data)
    containers = brackets - sum(_arrays(s) for s in strings)
    if containers <= allowed:
        return
    values = 0
    if budget.per_value:
        values = _structure(data, strings, _commas) + 1  # at most: empty arrays are not values
        if containers <= allowed + budget.per_value * values:
            values -= _structure(data, strings, _empty_arrays)
        allowed += budget.per_value * max(values, 0)
    if containers > allowed:
        if b"[" * (max_depth + 1) in data:  # a depth bomb: say so
            raise _too_deep(max_depth)
        raise InvalidInput(
            f"inputs: the body holds {containers} arrays and objects; a {what} holds at most {allowed} "
            f"(one array per row of each tensor, for {values} values)",
            {"field": "inputs", "expected": {"max_arrays": allowed}, "received": {"arrays": containers}},
        )
