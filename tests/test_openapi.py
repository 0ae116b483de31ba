"""Operations endpoints (API.md "Operations"): the OpenAPI document, its page, health,
readiness and Prometheus metrics. None of them needs a signature."""

from __future__ import annotations

import re
from typing import Any

from issuer.routes import ROUTES
from tests.conftest import Service, unique_id
from tests.people import campaign, claim


async def get(service: Service, path: str) -> tuple[int, str, str]:
    async with service.session.get(service.url + path) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


async def get_json(service: Service, path: str) -> tuple[int, Any]:
    async with service.session.get(service.url + path) as resp:
        return resp.status, await resp.json()


def resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    assert ref.startswith("#/components/schemas/"), ref
    return spec["components"]["schemas"][ref.rsplit("/", 1)[1]]  # type: ignore[no-any-return]


async def test_openapi_document_lists_every_route(service: Service) -> None:
    status, spec = await get_json(service, "/openapi.json")
    assert status == 200
    assert spec["openapi"].startswith("3.1")
    assert spec["info"]["title"] and spec["info"]["version"]
    schemas = spec["components"]["schemas"]
    for route in ROUTES:
        op = spec["paths"][route.path][route.method.lower()]
        assert op["summary"] and op["operationId"]
        declared = {p["name"] for p in op["parameters"] if p["in"] == "path"}
        assert declared == set(re.findall(r"{(\w+)}", route.path)), route.path
        assert {"X-Api-Key", "X-Timestamp", "X-Nonce", "X-Signature"} <= {
            p["name"] for p in op["parameters"] if p["in"] == "header"
        }
        assert str(route.status) in op["responses"]
        assert {"400", "401", "403", "404"} <= set(op["responses"])
        if route.body is None:
            assert "requestBody" not in op, route.path
            continue
        body = op["requestBody"]["content"]["application/json"]["schema"]
        assert body["$ref"] == f"#/components/schemas/{route.body.__name__}"
        fields = resolve(spec, body)
        assert fields["type"] == "object" and fields["properties"], route.body.__name__
        assert route.body.__name__ in schemas
    claim_schema = schemas["ClaimIn"]
    assert {"request_id", "user_id", "location"} <= set(claim_schema["required"])
    documented = {(path, method.upper()) for path, ops in spec["paths"].items() for method in ops}
    assert documented == {(r.path, r.method) for r in ROUTES}


async def test_docs_page_renders_the_spec(service: Service) -> None:
    status, content_type, text = await get(service, "/docs")
    assert status == 200 and content_type.startswith("text/html")
    assert "<html" in text.lower() and "/openapi.json" in text


async def test_health_and_readiness(service: Service) -> None:
    status, body = await get_json(service, "/healthz")
    assert status == 200 and body == {"status": "ok"}
    status, checks = await get_json(service, "/readyz")
    assert status == 200, checks
    assert checks["redis_ok"] is True
    assert checks["postgres_ok"] is True
    assert checks["flusher_ok"] is True


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of the Prometheus text, or None if absent."""
    for line in text.splitlines():
        m = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if m is None or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return None


async def test_metrics_count_claims_and_requests(service: Service) -> None:
    campaign_id = unique_id()
    assert (await service.call("PUT", f"/v1/campaigns/{campaign_id}", campaign())).status == 201
    won = await service.call(
        "POST", f"/v1/campaigns/{campaign_id}/claims", claim(90_000), role="app"
    )
    assert won.status == 201
    status, content_type, text = await get(service, "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    assert sample(text, "issuer_claims_total", campaign=campaign_id, code="OK") == 1
    served = sample(
        text, "issuer_requests_total", route="/v1/campaigns/{campaign_id}/claims", status="201"
    )
    assert served is not None and served >= 1
    assert "# TYPE issuer_requests_total counter" in text
