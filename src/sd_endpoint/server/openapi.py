"""The API description: OpenAPI 3.1 at ``/openapi.json`` (and ``/docs``), and ``/swagger.json`` as azmlinfsrv
serves it (Swagger 2.0 by default; ``?version=3`` or ``3.1`` for OpenAPI).

All versions come from the same pydantic models as the validator (``sd_endpoint.contract``), so the
documented request is the accepted one. ``/score`` reads its raw body (so that 400/413/415 are ours), hence
its request schema is attached here rather than inferred from a handler parameter.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from sd_endpoint.contract import ScoreRequest

SUPPORTED_VERSIONS = ("2", "3", "3.1")
_ALIASES = {"2": "2", "2.0": "2", "3": "3.0", "3.0": "3.0", "3.1": "3.1"}

DESCRIPTION = """\
Stable Diffusion 2.1 text-to-image with the Azure ML managed online endpoint scoring contract.

`POST /score` takes `{"input_data": {"columns": ["prompt"], "data": ["..."]}}` (pandas "split"
orientation, optionally with `parameters`) and returns one record per generated image, in input order,
with the image as standard base64. When keys are configured (`SD_ENDPOINT_KEYS`), send
`Authorization: Bearer <key>`. Every error body is `{"message": "..."}`.
"""


def openapi_31(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI 3.1 document (cached on the app)."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    request_schema = ScoreRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(request_schema.pop("$defs", {}))
    schemas["ScoreRequest"] = request_schema
    doc["components"]["securitySchemes"] = {
        "Bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "The endpoint key (SD_ENDPOINT_KEYS), as `Authorization: Bearer <key>`.",
        }
    }
    app.openapi_schema = doc
    return doc


def swagger(app: FastAPI, version: str) -> dict[str, Any] | None:
    """The document for ``/swagger.json?version=...``; None for a version that is not served."""
    target = _ALIASES.get(version.strip())
    if target is None:
        return None
    doc = openapi_31(app)
    if target == "3.1":
        return doc
    if target == "3.0":
        return _to_openapi_30(doc)
    return _to_swagger_2(doc)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sd-endpoint")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


# ------------------------------------------------------------------------------------------------
# Down-conversion. Our schemas use a small part of JSON Schema (objects, arrays, enums, bounds, and
# anyOf for unions and nullables), so a direct rewrite is enough.


def _schema(node: Any, target: str) -> Any:
    """Rewrite one JSON Schema (3.1 dialect) for OpenAPI 3.0 (``target="3.0"``) or Swagger 2.0 (``"2"``)."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties", "$defs"):
            out[key] = {k: _schema(v, target) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            out[key] = _schema(value, target)
        elif key in ("anyOf", "oneOf", "allOf"):
            out[key] = [_schema(v, target) for v in value]
        else:
            out[key] = value
    if "$ref" in out and target == "2":
        out["$ref"] = out["$ref"].replace("#/components/schemas/", "#/definitions/")
    if "const" in out:
        out["enum"] = [out.pop("const")]
    if "examples" in out:
        examples = out.pop("examples")
        if isinstance(examples, list) and examples:
            out["example"] = examples[0]
    for bound, inclusive in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(out.get(bound), (int, float)) and not isinstance(out[bound], bool):
            out[inclusive] = out[bound]
            out[bound] = True
    nullable_key = "nullable" if target == "3.0" else "x-nullable"
    if isinstance(out.get("type"), list):
        types = [t for t in out["type"] if t != "null"]
        if len(types) < len(out["type"]):
            out[nullable_key] = True
        out["type"] = types[0] if len(types) == 1 else out["type"]
    for union in ("anyOf", "oneOf"):
        members = out.get(union)
        if not isinstance(members, list):
            continue
        non_null = [m for m in members if m != {"type": "null"}]
        if len(non_null) < len(members):
            out[nullable_key] = True
        del out[union]
        if len(non_null) == 1:
            only = non_null[0]
            if "$ref" in only:
                out["allOf"] = [only]  # a $ref may not have siblings
            else:
                out = {**only, **out}
        elif target == "3.0":
            out[union] = non_null
        # Swagger 2.0 has no unions: the schema stays untyped (any JSON value); its description says more.
    if target == "2" and "allOf" in out and len(out["allOf"]) == 1 and set(out) <= {"allOf", "x-nullable"}:
        out = {**out["allOf"][0], **({"x-nullable": True} if out.get("x-nullable") else {})}
    return out


def _media_schema(content: dict[str, Any], target: str) -> dict[str, Any]:
    return {mt: {**m, "schema": _schema(m.get("schema", {}), target)} for mt, m in content.items()}


def _to_openapi_30(doc: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    out["openapi"] = "3.0.3"
    schemas = out.get("components", {}).get("schemas", {})
    out["components"]["schemas"] = {name: _schema(s, "3.0") for name, s in schemas.items()}
    for item in out.get("paths", {}).values():
        for op in item.values():
            if not isinstance(op, dict):
                continue
            for param in op.get("parameters", []):
                if "schema" in param:
                    param["schema"] = _schema(param["schema"], "3.0")
            body = op.get("requestBody")
            if body and "content" in body:
                body["content"] = _media_schema(body["content"], "3.0")
            for response in op.get("responses", {}).values():
                if "content" in response:
                    response["content"] = _media_schema(response["content"], "3.0")
    return out


def _form_parameters(schema: dict[str, Any]) -> list[dict[str, Any]]:
    required = set(schema.get("required", []))
    params = []
    for name, prop in schema.get("properties", {}).items():
        param: dict[str, Any] = {"name": name, "in": "formData", "required": name in required}
        if prop.get("description"):
            param["description"] = prop["description"]
        if prop.get("format") == "binary":
            param["type"] = "file"
        else:
            converted = _schema(prop, "2")
            param.update({k: v for k, v in converted.items() if k in ("type", "format", "enum", "default")})
            param.setdefault("type", "string")
        params.append(param)
    return params


def _to_swagger_2(doc: dict[str, Any]) -> dict[str, Any]:
    paths = {
        path: {method: _swagger_operation(op) for method, op in item.items() if isinstance(op, dict)}
        for path, item in doc.get("paths", {}).items()
    }
    schemas = doc.get("components", {}).get("schemas", {})
    return {
        "swagger": "2.0",
        "info": copy.deepcopy(doc.get("info", {})),
        "schemes": ["https", "http"],
        "consumes": ["application/json"],
        "produces": ["application/json"],
        "securityDefinitions": {
            "Bearer": {
                "type": "apiKey",
                "name": "Authorization",
                "in": "header",
                "description": "For example: Bearer abc123",
            }
        },
        "paths": paths,
        "definitions": {name: _schema(s, "2") for name, s in schemas.items()},
    }


def _swagger_operation(op: dict[str, Any]) -> dict[str, Any]:
    """One OpenAPI 3 operation in Swagger 2.0: the body becomes a parameter, media types consumes/produces."""
    new_op: dict[str, Any] = {
        k: copy.deepcopy(v) for k, v in op.items() if k in ("summary", "description", "operationId", "tags")
    }
    if "security" in op:
        new_op["security"] = copy.deepcopy(op["security"])
    params = []
    for param in op.get("parameters", []):
        p = {k: v for k, v in param.items() if k in ("name", "in", "required", "description")}
        p.update({k: v for k, v in _schema(param.get("schema", {}), "2").items() if k != "title"})
        params.append(p)
    body = op.get("requestBody")
    if body and list(body.get("content", {})) == ["multipart/form-data"]:
        # Swagger 2 has no multipart body schema: each part is a formData parameter (a file or a value).
        params += _form_parameters(body["content"]["multipart/form-data"].get("schema", {}))
        new_op["consumes"] = ["multipart/form-data"]
    elif body:
        params.append(_body_parameter(body))
        new_op["consumes"] = list(body.get("content", {}))
    if params:
        new_op["parameters"] = params
    responses: dict[str, Any] = {}
    produces: list[str] = []
    for status, response in op.get("responses", {}).items():
        responses[str(status)] = _swagger_response(response)
        produces += [mt for mt in response.get("content", {}) if mt not in produces]
    new_op["responses"] = responses
    if produces:
        new_op["produces"] = produces
    return new_op


def _body_parameter(body: dict[str, Any]) -> dict[str, Any]:
    content = body.get("content", {})
    media: dict[str, Any] = content.get("application/json") or next(iter(content.values()), {})
    return {
        "name": "serviceInputPayload",  # azmlinfsrv's name for the /score body
        "in": "body",
        "required": bool(body.get("required")),
        "description": body.get("description", "The request body."),
        "schema": _schema(media.get("schema", {}), "2"),
    }


def _swagger_response(response: dict[str, Any]) -> dict[str, Any]:
    r: dict[str, Any] = {"description": response.get("description", "")}
    content = response.get("content", {})
    if content:
        media_type, media = next(iter(content.items()))
        if "schema" in media:
            r["schema"] = _schema(media["schema"], "2")
        if "example" in media:
            r["examples"] = {media_type: media["example"]}
    if "headers" in response:
        r["headers"] = {
            name: {"description": h.get("description", ""), **_schema(h.get("schema", {}), "2")}
            for name, h in response["headers"].items()
        }
    return r
