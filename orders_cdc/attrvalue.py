"""DynamoDB AttributeValue <-> plain Python, with exact numbers.

Wire form is what DynamoDB puts in a change record: ``{"N": "12.50"}``, ``{"B": "<base64>"}``, ...
Numbers become ``Decimal`` and stay exact end to end; ``dumps_exact`` writes them back as the
same literal, because a float would silently change prices and 38-digit ids.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Callable, Mapping, Set
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import orjson
from boto3.dynamodb.types import DYNAMODB_CONTEXT, TypeSerializer

__all__ = [
    "AttributeValueError",
    "marshal",
    "unmarshal",
    "unmarshal_map",
    "to_json_compatible",
    "dumps_exact",
]


class AttributeValueError(ValueError):
    """A value that is not a valid DynamoDB AttributeValue; ``path`` says where (``items[2].price``)."""

    def __init__(self, reason: str, path: str = "") -> None:
        self.reason = reason
        self.path = path
        super().__init__(f"{path}: {reason}" if path else reason)

    def _within(self, segment: str) -> AttributeValueError:
        # Paths are built while unwinding, so the success path never pays for string building.
        if not self.path:
            path = segment
        elif self.path.startswith("["):
            path = segment + self.path
        else:
            path = f"{segment}.{self.path}"
        return AttributeValueError(self.reason, path)


# DynamoDB's documented number limits: 38 significant digits, magnitude 1E-130 .. 9.99..9E+125.
_MAX_DIGITS = 38
_MIN_ADJUSTED = -130
_MAX_ADJUSTED = 125
# Decimal() alone also takes "NaN", "Infinity", " 1 " and "1_000"; DynamoDB never emits those.
# Linear: each digit can belong to one place only ("[0-9]+\.?[0-9]*" let a long digit run be
# split every way, so 8,000 digits and an "x" took 1.5 s to refuse). [0-9]: \d is Unicode.
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
# Longer than any literal of a number DynamoDB can hold (38 digits, an exponent, zeros to
# pad +125 or -130): refused before any parsing.
_MAX_LITERAL = 200
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _type_name(value: object) -> str:
    return type(value).__name__


def _s(v: Any) -> str:
    if type(v) is not str:
        raise AttributeValueError(f"S value must be a string, got {_type_name(v)}")
    return v


def _show(v: Any) -> str:
    # Error messages end up in logs and the dead-letter queue; a 1 MB attribute should not.
    text = repr(v)
    return text if len(text) <= 60 else f"{text[:45]}...({len(text)} chars)"


def _n(v: Any) -> Decimal:
    if type(v) is str and len(v) > _MAX_LITERAL:
        raise AttributeValueError(f"N value {_show(v)} is longer than any DynamoDB number ({_MAX_LITERAL} chars)")
    if type(v) is not str or _NUMBER.fullmatch(v) is None:
        raise AttributeValueError(f"N value {_show(v)} is not a number literal")
    try:
        d = Decimal(v)
    except ArithmeticError:  # an exponent too large for Decimal itself, e.g. "1E+99999999999999999999"
        raise AttributeValueError(f"N value {_show(v)} is outside DynamoDB's range") from None
    # Cheap pre-check: a literal of <= 38 characters cannot hold more than 38 digits.
    if len(v) > _MAX_DIGITS:
        digits = d.as_tuple().digits
        n = len(digits)
        while n > 1 and digits[n - 1] == 0:  # trailing zeros are not significant to DynamoDB
            n -= 1
        if n > _MAX_DIGITS:
            raise AttributeValueError(f"N value {_show(v)} has {n} significant digits (max {_MAX_DIGITS})")
    if d:
        adjusted = d.adjusted()
        if adjusted > _MAX_ADJUSTED or adjusted < _MIN_ADJUSTED:
            raise AttributeValueError(
                f"N value {_show(v)} is outside DynamoDB's range (1E-130 .. 9.9999999999999999999999999999999999999E+125)"
            )
    return d


def _b(v: Any) -> bytes:
    if type(v) is str:
        try:
            return base64.b64decode(v, validate=True)
        except ValueError as e:  # binascii.Error, or non-ASCII text
            raise AttributeValueError(f"B value is not valid base64 ({e})") from None
    # boto3's low-level client has already decoded B to bytes; accept that shape as-is.
    if isinstance(v, (bytes, bytearray)):
        return bytes(v)
    raise AttributeValueError(f"B value must be a base64 string, got {_type_name(v)}")


def _bool(v: Any) -> bool:
    if type(v) is not bool:
        raise AttributeValueError(f"BOOL value must be true or false, got {_show(v)}")
    return v


def _null(v: Any) -> None:
    if v is not True:
        raise AttributeValueError(f"NULL value must be true, got {_show(v)}")
    return None


def _m(v: Any) -> dict[str, Any]:
    if type(v) is not dict:
        raise AttributeValueError(f"M value must be an object, got {_type_name(v)}")
    return _map(v)


def _l(v: Any) -> list[Any]:
    if type(v) is not list:
        raise AttributeValueError(f"L value must be an array, got {_type_name(v)}")
    i = 0
    try:
        out = []
        for i, item in enumerate(v):
            out.append(_value(item))
        return out
    except AttributeValueError as e:
        raise e._within(f"[{i}]") from None


def _set_of(tag: str, convert: Callable[[Any], Any]) -> Callable[[Any], set[Any]]:
    def convert_set(v: Any) -> set[Any]:
        if type(v) is not list:
            raise AttributeValueError(f"{tag} value must be an array, got {_type_name(v)}")
        if not v:
            raise AttributeValueError(f"{tag} value is an empty set (DynamoDB sets are never empty)")
        i = 0
        try:
            out = set()
            for i, item in enumerate(v):
                out.add(convert(item))
            return out
        except AttributeValueError as e:
            raise e._within(f"[{i}]") from None

    return convert_set


# The table the module is built around: one converter per type key, no reflection.
_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "S": _s,
    "N": _n,
    "B": _b,
    "BOOL": _bool,
    "NULL": _null,
    "M": _m,
    "L": _l,
    "SS": _set_of("SS", _s),
    "NS": _set_of("NS", _n),
    "BS": _set_of("BS", _b),
}


def _value(av: Any) -> Any:
    if type(av) is not dict or len(av) != 1:
        if type(av) is not dict:
            raise AttributeValueError(f"AttributeValue must be an object, got {_type_name(av)}")
        raise AttributeValueError(f"AttributeValue must have exactly one type key, got {_show(sorted(map(str, av)))}")
    ((tag, v),) = av.items()
    convert = _CONVERTERS.get(tag)
    if convert is None:
        raise AttributeValueError(f"unknown AttributeValue type {_show(tag)}")
    return convert(v)


def _segment(name: str) -> str:
    return name if _IDENT.fullmatch(name) else f"[{orjson.dumps(name).decode()}]"


def _map(m: dict[str, Any]) -> dict[str, Any]:
    name = ""
    try:
        out = {}
        for name, av in m.items():
            out[name] = _value(av)
        return out
    except AttributeValueError as e:
        raise e._within(_segment(name)) from None


# Fast path. Decoding is hot (every record, every attribute) and boto3's TypeDeserializer spends
# most of its time in per-value dispatch. This path inlines the common types into one loop and
# accepts only what the checked converters above accept; anything it is unsure about goes to the
# checked converter, and any exception makes the caller redo the whole value on the checked
# path, which is the source of truth and builds the error path.
_Decimal = Decimal

# Order data repeats the same few number literals (quantities, versions, catalogue prices), and
# Decimal() plus the range checks are most of the cost of an N. Decimals are immutable, so a
# bounded literal -> Decimal cache is safe; it is cleared rather than LRU-managed to stay cheap.
_NUMBER_CACHE: dict[str, Decimal] = {}
_NUMBER_CACHE_SIZE = 4096
_ONLY_STR = {str}


def _fast_number(v: str) -> Decimal:
    d = _Decimal(v)
    # len <= 38 bounds the digit count; isascii + the "_"/whitespace checks exclude the spellings
    # Decimal() tolerates but DynamoDB never writes; is_finite excludes NaN/Infinity.
    if not (
        len(v) <= _MAX_DIGITS
        and v.isascii()
        and d.is_finite()
        and "_" not in v
        and v[0] > " "
        and v[-1] > " "
        and _MIN_ADJUSTED <= d.adjusted() <= _MAX_ADJUSTED
    ):
        d = _n(v)
    if len(_NUMBER_CACHE) >= _NUMBER_CACHE_SIZE:
        _NUMBER_CACHE.clear()
    _NUMBER_CACHE[v] = d
    return d


def _fast_map(m: dict[str, Any]) -> dict[str, Any]:
    numbers = _NUMBER_CACHE
    out = {}
    for name, av in m.items():
        if len(av) == 1:
            v = av.get("S")
            if type(v) is str:
                out[name] = v
                continue
            v = av.get("N")
            if type(v) is str:
                d = numbers.get(v)
                out[name] = _fast_number(v) if d is None else d
                continue
            v = av.get("M")
            if type(v) is dict:
                out[name] = _fast_map(v)
                continue
            v = av.get("L")
            if type(v) is list:
                out[name] = [_fast_value(x) for x in v]
                continue
            v = av.get("BOOL")
            if type(v) is bool:
                out[name] = v
                continue
            if av.get("NULL") is True:
                out[name] = None
                continue
            v = av.get("SS")
            # set(map(type, v)) runs in C: one check for "non-empty list of strings only".
            if type(v) is list and v and set(map(type, v)) == _ONLY_STR:
                out[name] = set(v)
                continue
        out[name] = _value(av)
    return out


def _fast_value(av: dict[str, Any]) -> Any:
    if len(av) == 1:
        v = av.get("S")
        if type(v) is str:
            return v
        v = av.get("N")
        if type(v) is str:
            d = _NUMBER_CACHE.get(v)
            return _fast_number(v) if d is None else d
        v = av.get("M")
        if type(v) is dict:
            return _fast_map(v)
    return _value(av)


# The same fast path in C (orders_cdc/_avfast.c), where it was built: 1.9-2.7x this one in B2. It
# defers to _fast_number and _value where the Python loop does, except that it also decodes
# canonical base64 (B, BS) itself; results and errors are the same either way (test_attrvalue
# runs on both). ORDERS_CDC_PURE_PYTHON=1 turns it off (to compare, or to debug).
_py_fast_map, _py_fast_value = _fast_map, _fast_value
try:
    from orders_cdc import _avfast
except ImportError:  # not built (no C compiler where it was installed): the Python loop above
    _avfast = None
if _avfast is not None and os.environ.get("ORDERS_CDC_PURE_PYTHON", "") in ("", "0"):
    _avfast.configure(_fast_number, _value, _NUMBER_CACHE)
    _fast_map, _fast_value = _avfast.fast_map, _avfast.fast_value
ACCELERATED = _fast_map is not _py_fast_map


def _guard(fn: Callable[[Any], Any], arg: Any, root: str) -> Any:
    try:
        return fn(arg)
    except AttributeValueError as e:
        raise e._within(root) if root else e from None
    except RecursionError:
        # DynamoDB caps nesting at 32 levels; anything deep enough to blow the stack is not a real item.
        raise AttributeValueError("AttributeValue nested too deeply", root) from None


def unmarshal(av: dict[str, Any], root: str = "") -> Any:
    """One AttributeValue -> Python. ``root`` prefixes error paths (e.g. ``"NewImage.status"``)."""
    try:
        return _fast_value(av)
    except Exception:  # noqa: BLE001 - any surprise is re-diagnosed by the checked path below
        pass
    return _guard(_value, av, root)


def unmarshal_map(m: dict[str, Any], root: str = "") -> dict[str, Any]:
    """An item / image (``{name: AttributeValue}``) -> ``{name: value}``."""
    if type(m) is not dict:
        raise AttributeValueError(f"attribute map must be an object, got {_type_name(m)}", root)
    try:
        return _fast_map(m)
    except Exception:  # noqa: BLE001 - any surprise is re-diagnosed by the checked path below
        pass
    return _guard(_map, m, root)


# ---------------------------------------------------------------------------------------------
# Python -> AttributeValue (for writes)

_boto3_serialize = TypeSerializer().serialize


def marshal(value: Any) -> dict[str, Any]:
    """boto3's ``TypeSerializer().serialize``, with the types the handlers write most (str,
    bool, Decimal, int) done directly: the same result and the same number checks
    (DYNAMODB_CONTEXT traps inexact and out-of-range values), without its per-value type probing."""
    kind = type(value)
    if kind is str:
        return {"S": value}
    if kind is Decimal or kind is int:
        number = str(DYNAMODB_CONTEXT.create_decimal(value))
        if number in ("Infinity", "NaN"):
            raise TypeError("Infinity and NaN not supported")
        return {"N": number}
    if kind is bool:
        return {"BOOL": value}
    return _boto3_serialize(value)


def request_map(m: dict[str, Any]) -> dict[str, Any]:
    """A wire-form attribute map (already validated: ``unmarshal_map`` took it) as botocore's
    DynamoDB client takes it: the same AttributeValues, B and BS as bytes (botocore base64-encodes
    them again). Cheaper than unmarshal + ``marshal`` of every value, and exact by construction."""
    return {k: _request_value(av) for k, av in m.items()}


def _request_value(av: dict[str, Any]) -> dict[str, Any]:
    ((tag, v),) = av.items()
    if tag == "M":
        return {"M": request_map(v)}
    if tag == "L":
        return {"L": [_request_value(x) for x in v]}
    if tag == "B":
        return {"B": _b(v)}
    if tag == "BS":
        return {"BS": [_b(x) for x in v]}
    return av


# ---------------------------------------------------------------------------------------------
# Output


def _iso_utc(dt: datetime) -> str:
    if dt.tzinfo is None:
        # A naive datetime is ambiguous (kclpy's local-time arrival stamps are the cautionary tale).
        raise TypeError(f"naive datetime {dt!r} cannot be written as UTC")
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _sorted_set(s: Set[Any]) -> list[Any]:
    try:
        return sorted(s)
    except TypeError:
        # Mixed-type sets never come out of DynamoDB, but output must still be deterministic.
        return sorted(s, key=lambda x: (type(x).__name__, repr(x)))


def _b64(b: bytes | bytearray | memoryview) -> str:
    return base64.b64encode(b).decode("ascii")


def to_json_compatible(value: Any) -> Any:
    """Python value -> JSON-shaped value. Decimals stay Decimal (write them with ``dumps_exact``);
    bytes -> base64, sets -> sorted lists, datetimes -> ``...T..:..:..ffffffZ``."""
    if isinstance(value, Mapping):
        return {k: to_json_compatible(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_compatible(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return [to_json_compatible(v) for v in _sorted_set(value)]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _b64(value)
    if isinstance(value, datetime):
        return _iso_utc(value)
    return value


def _default(obj: Any) -> Any:
    if isinstance(obj, Decimal):
        if not obj.is_finite():
            raise TypeError(f"{obj} has no JSON representation")
        # str(Decimal) is always a valid JSON number for finite values, and is the exact literal.
        return orjson.Fragment(str(obj))
    if isinstance(obj, (set, frozenset)):
        return _sorted_set(obj)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return _b64(obj)
    if isinstance(obj, datetime):
        return _iso_utc(obj)
    if isinstance(obj, tuple):
        return list(obj)
    if isinstance(obj, int):
        # Only reached for ints beyond 64 bits (see _wrap_big_ints); Python's repr is exact.
        return orjson.Fragment(str(obj))
    raise TypeError(f"cannot serialise {_type_name(obj)}")


def _wrap_big_ints(value: Any) -> Any:
    # orjson refuses ints beyond 64 bits and never hands them to default=, so wrap them first.
    if type(value) is int:
        return orjson.Fragment(str(value)) if not -(2**63) <= value < 2**64 else value
    if isinstance(value, Mapping):
        return {k: _wrap_big_ints(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = _sorted_set(value) if isinstance(value, (set, frozenset)) else value
        return [_wrap_big_ints(v) for v in items]
    return value


_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME


def dumps_exact(obj: Any) -> bytes:
    """JSON bytes with Decimals as their exact literals (``Decimal("1.50")`` -> ``1.50``)."""
    try:
        return orjson.dumps(obj, default=_default, option=_OPTIONS)
    except orjson.JSONEncodeError as e:
        if "Integer exceeds 64-bit range" not in str(e):
            raise
        return orjson.dumps(_wrap_big_ints(obj), default=_default, option=_OPTIONS)
