"""The OpenAPI 3.1 document, generated from the route table and the msgspec types."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from issuer.errors import ERRORS, ErrorEnvelope

if TYPE_CHECKING:
    from issuer.http import Route

SIGNATURE_HEADERS = ("X-Api-Key", "X-Timestamp", "X-Nonce", "X-Signature")
REF = "#/components/schemas/{name}"

DOCS_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>issuer API</title>
<style>body{font:14px sans-serif;margin:2em;max-width:60em}code{background:#eee}
h2{margin-top:1.5em}pre{background:#f6f6f6;padding:1em;overflow:auto}</style></head>
<body><h1>issuer API</h1><p>Spec: <a href="/openapi.json">/openapi.json</a></p>
<div id="ops">loading…</div>
<script>
fetch('/openapi.json').then(r => r.json()).then(spec => {
  const out = [];
  for (const [path, ops] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(ops)) {
      out.push(`<h2><code>${method.toUpperCase()} ${path}</code></h2><p>${op.summary}</p>` +
        `<p>roles: ${op['x-roles'].join(', ')}; ${op['x-tenant']}</p>`);
    }
  }
  document.getElementById('ops').innerHTML = out.join('');
});
</script></body></html>
"""


def document(routes: Sequence[Route]) -> dict[str, Any]:
    types = [t for r in routes for t in (r.body, r.response) if t not in (None, bytes)]
    types += [t for r in routes for _, t in r.also if t not in types]
    schemas, components = msgspec.json.schema_components([*types, ErrorEnvelope], ref_template=REF)
    by_type = dict(zip([*types, ErrorEnvelope], schemas, strict=True))
    error = {"content": {"application/json": {"schema": by_type[ErrorEnvelope]}}}
    # a lottery seed that misses its commitment is refused 422 (API.md v1.1)
    statuses = sorted({status for status, _, _ in ERRORS.values()} | {422})
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        params = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in re.findall(r"{(\w+)}", route.path)
        ] + [
            {"name": h, "in": "header", "required": True, "schema": {"type": "string"}}
            for h in SIGNATURE_HEADERS
        ]
        if route.query is not None:
            params += [
                {"name": f.encode_name, "in": "query", "required": f.required, "schema": {}}
                for f in msgspec.structs.fields(route.query)
            ]
        content = {m: {"schema": {"type": "string", "format": "binary"}} for m in route.files}
        if route.response is not bytes:
            content["application/json"] = {"schema": by_type[route.response]}
        op: dict[str, Any] = {
            "summary": route.summary,
            "operationId": route.handler.__name__,
            "x-roles": list(route.roles),
            "x-tenant": route.tenant.describe(),  # how a scoped key's tenants are checked
            "parameters": params,
            "responses": {
                str(route.status): {"description": "success", "content": content},
                **{
                    str(status): {
                        "description": "success",
                        "content": {"application/json": {"schema": by_type[t]}},
                    }
                    for status, t in route.also
                },
                **{str(s): {"description": "error", **error} for s in statuses},
            },
        }
        if route.body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": by_type[route.body]}},
            }
        paths.setdefault(route.path, {})[route.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "issuer", "version": "1"},
        "paths": paths,
        "components": {"schemas": components},
    }
