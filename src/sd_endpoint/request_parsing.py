"""A request body to a ``ScoringRequest``, first step: the JSON, the contract's models and the row forms.

``decode_body`` turns bytes into a JSON value (UTF-8, no NaN, bounded nesting); ``parse_request`` validates
it against ``contract.ScoreRequest``, brings every row form (a prompt string, an object, a list matched
against ``columns``) to one ``contract.Row`` each, and hands them to ``request_resolution``. Every refusal
is an ``InvalidRequest`` whose message names the field and what it accepts.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
from pydantic import ValidationError

from sd_endpoint.contract import (
    COLUMNS,
    InputData,
    Limits,
    Parameters,
    Row,
    ScoreRequest,
    ScoringRequest,
    unencodable_at,
)
from sd_endpoint.errors import InvalidRequest, PayloadTooLarge
from sd_endpoint.request_resolution import resolve

# Deepest JSON nesting accepted. A valid request nests 4 levels ({"input_data": {"data": [[...]]}}); the
# bound keeps every later walk (pydantic, our own) far from Python's recursion limit.
MAX_JSON_DEPTH = 32

_JSON_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]++")
_STEP = np.zeros(256, dtype=np.int32)
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1


def json_depth(text: str) -> int:
    """How deep the brackets of a JSON text nest, counted without parsing (no recursion, no Python loop)."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)).encode("ascii")
    if not brackets:
        return 0
    return int(np.cumsum(_STEP[np.frombuffer(brackets, dtype=np.uint8)]).max())


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def decode_body(body: bytes | str, *, max_bytes: int | None = None) -> Any:
    """Bytes or text to a JSON value, refusing non-UTF-8, NaN and Infinity."""
    if max_bytes is not None and len(body) > max_bytes:
        raise PayloadTooLarge(f"Request body is {len(body)} bytes; the limit is {max_bytes}.")
    if isinstance(body, bytes):
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequest(f"Request body is not valid UTF-8: {exc}.") from None
    else:
        text = body
    if not text.strip():
        raise InvalidRequest('Request body is empty; expected a JSON object with "input_data".')
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise InvalidRequest(f"Request body nests {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted.")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError) as exc:
        raise InvalidRequest(f"Request body is not valid JSON: {exc}.") from None


def parse_request(body: bytes | str | Any, limits: Limits, *, decoded: bool = False) -> ScoringRequest:
    """Validate a request body into a ScoringRequest: raw bytes/text, or (``decoded``) a parsed JSON value."""
    payload = body if decoded or not isinstance(body, (bytes, str)) else decode_body(body)
    if not isinstance(payload, dict):
        raise InvalidRequest(f'Request body must be a JSON object with "input_data"; got a JSON {_json_type(payload)}.')
    if "input_data" not in payload:
        raise InvalidRequest('Missing "input_data": expected {"input_data": {"columns": ["prompt"], "data": ["..."]}}.')
    _check_strings(payload, "", 0)
    try:
        request = ScoreRequest.model_validate(payload, context={"limits": limits})
    except ValidationError as exc:
        raise InvalidRequest(_describe(exc)) from None
    params, where = _parameters(request)
    rows, labels = _rows(request.input_data, limits)
    return resolve(params, where, rows, labels, limits)


def _check_strings(value: Any, path: str, depth: int, *, strings: bool = True) -> None:
    """Refuse lone surrogates in keys and strings (they cannot be encoded, logged or echoed) and nesting
    past MAX_JSON_DEPTH (an already decoded body never went through ``decode_body``'s check).

    Row values are left to the row model, whose message names the column (prompt, negative_prompt).
    """
    if depth > MAX_JSON_DEPTH:
        raise InvalidRequest(f"{path or 'body'}: nests deeper than {MAX_JSON_DEPTH} levels.")
    if isinstance(value, str) and strings:
        bad = unencodable_at(value)
        if bad is not None:
            raise InvalidRequest(
                f"{path or 'body'}: holds a lone UTF-16 surrogate at character {bad}, which is not text."
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if strings and unencodable_at(str(key)) is not None:
                raise InvalidRequest(f"{path or 'body'}: a key holds a lone UTF-16 surrogate, which is not text.")
            _check_strings(item, where, depth + 1, strings=strings and where != "input_data.data")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_strings(item, f"{path}[{i}]", depth + 1, strings=strings)


def _parameters(request: ScoreRequest) -> tuple[Parameters, str]:
    """The request's parameters (from the top level or ``input_data``) and where they were, for messages."""
    data = request.input_data
    if request.parameters is not None and data.parameters is not None:
        raise InvalidRequest('"parameters" given both at the top level and inside "input_data"; send one of them.')
    params = request.parameters or data.parameters or Parameters.model_validate({})
    return params, "parameters" if request.parameters is not None else "input_data.parameters"


def _rows(data: InputData, limits: Limits) -> tuple[list[Row], list[int | str]]:
    """Every row as a ``Row``, whatever its form, and its label (``index``, else its position)."""
    columns = _check_columns(data.columns)
    if not data.data:
        raise InvalidRequest("input_data.data: must hold at least one row.")
    if data.index is not None and len(data.index) != len(data.data):
        raise InvalidRequest(
            f"input_data.index has {len(data.index)} entries but input_data.data has {len(data.data)} rows; "
            "they must match."
        )
    rows = [_row(i, item, columns, limits) for i, item in enumerate(data.data)]
    return rows, list(data.index) if data.index is not None else list(range(len(rows)))


def _check_columns(columns: list[str] | None) -> list[str] | None:
    if columns is None:
        return None
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        raise InvalidRequest(f"input_data.columns: unknown column(s) {_names(unknown)}; allowed: {', '.join(COLUMNS)}.")
    if len(set(columns)) != len(columns):
        raise InvalidRequest("input_data.columns: a column is listed twice.")
    if "prompt" not in columns:
        raise InvalidRequest("input_data.columns: must include 'prompt'.")
    return columns


def _row(pos: int, item: Any, columns: list[str] | None, limits: Limits) -> Row:
    where = f"input_data.data[{pos}]"
    if isinstance(item, str):
        if columns is not None and columns != ["prompt"]:
            raise InvalidRequest(
                f"{where}: a bare string row needs columns ['prompt']; with columns {columns} send a list "
                'or an object per row, e.g. {"prompt": "...", "negative_prompt": "..."}.'
            )
        fields: dict[str, Any] = {"prompt": item}
    elif isinstance(item, dict):
        unknown = [k for k in item if k not in COLUMNS]
        if unknown:
            raise InvalidRequest(f"{where}: unknown key(s) {_names(unknown)}; allowed: {', '.join(COLUMNS)}.")
        if columns is not None:
            missing = [k for k in item if k not in columns]
            if missing:
                raise InvalidRequest(f"{where}: key(s) {missing} are not listed in input_data.columns {columns}.")
        fields = dict(item)
    else:  # a list, matched against columns
        if columns is None:
            raise InvalidRequest(f"{where}: a list row needs input_data.columns to name its values.")
        if len(item) != len(columns):
            raise InvalidRequest(
                f"{where}: has {len(item)} values but input_data.columns has {len(columns)} ({columns})."
            )
        fields = dict(zip(columns, item, strict=True))
    if "prompt" not in fields:
        raise InvalidRequest(f"{where}: missing 'prompt'.")
    try:
        return Row.model_validate(fields, context={"limits": limits})
    except ValidationError as exc:
        raise InvalidRequest(_describe(exc, prefix=where)) from None


_ALLOWED_BY_PARENT = {
    "": sorted(ScoreRequest.model_fields),
    "input_data": sorted(InputData.model_fields),
    "parameters": sorted(Parameters.model_fields),
}


def _describe(exc: ValidationError, prefix: str = "") -> str:
    """Turn pydantic errors into one message that names each field and what it accepts.

    Built from the errors' structured data: ``loc`` (field names and list positions) and ``type``.
    """
    parts: list[str] = []
    for err in exc.errors():
        loc = err["loc"]
        path = prefix
        for part in loc:
            path = f"{path}[{part}]" if isinstance(part, int) else (f"{path}.{part}" if path else str(part))
        if err["type"] == "extra_forbidden":
            parent = str(loc[-2]) if len(loc) >= 2 else ""
            allowed = _ALLOWED_BY_PARENT.get(parent, list(COLUMNS))
            msg = f"unknown field {_clipped(str(loc[-1]))!r}; allowed: {', '.join(allowed)}"
            path = path.rsplit(".", 1)[0] if "." in path else "body"
        elif err["type"] == "missing":
            msg = "is required"
        else:
            msg = str(err["msg"]).removeprefix("Value error, ")
            if "(got " not in msg:
                msg += _shown(err.get("input"))
        line = f"{path}: {msg}"
        if line not in parts:
            parts.append(line)
    return "Invalid request: " + "; ".join(parts[:10]) + "."


def _clipped(name: str, limit: int = 64) -> str:
    """A client-chosen name, cut short enough to echo in a message and a log line."""
    return name if len(name) <= limit else f"{name[:limit]}... ({len(name)} characters)"


def _names(names: list[str]) -> str:
    return ", ".join(repr(_clipped(n)) for n in names[:5]) + (", ..." if len(names) > 5 else "")


def _shown(got: Any) -> str:
    if isinstance(got, bool) or got is None:
        return f" (got {json.dumps(got)})"
    if isinstance(got, (int, float)):
        return f" (got {got!r})"
    if isinstance(got, str):
        return " (got a JSON string)"
    return f" (got a JSON {_json_type(got)})"


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(value), "null"
    )
