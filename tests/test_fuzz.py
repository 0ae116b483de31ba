"""Schemathesis against the service's own /openapi.json: every operation, called with a
valid signature of a key whose role may call it, answers no 5xx and exactly what the spec
says (status codes, content types, response schemas). A bounded run in `make test`;
`make fuzz` runs many more examples (ISSUER_FUZZ_EXAMPLES)."""

from __future__ import annotations

import os
import urllib.request
from typing import Any

import msgspec
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from issuer.client import signed_headers
from tests.conftest import Service

pytestmark = pytest.mark.long  # schemathesis over every operation

EXAMPLES = int(os.environ.get("ISSUER_FUZZ_EXAMPLES", "15"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def api_schema(service: Service) -> Any:
    with urllib.request.urlopen(service.url + "/openapi.json") as resp:
        spec = msgspec.json.decode(resp.read())
    return schemathesis.openapi.from_dict(spec)


def call_signed(case: Any, service: Service, http: requests.Session) -> requests.Response:
    """Send the generated case with a valid signature of a key its operation admits."""
    key = service.key(case.operation.definition.raw["x-roles"][0])
    kwargs = case.as_transport_kwargs(base_url=service.url)
    headers = {k: v for k, v in (kwargs.get("headers") or {}).items() if not k.startswith("X-")}
    prepared = requests.Request(
        kwargs["method"],
        kwargs["url"],
        params=kwargs.get("params"),
        json=kwargs.get("json"),
        data=kwargs.get("data"),
        headers=headers,
    ).prepare()
    body = prepared.body or b""
    raw = body.encode() if isinstance(body, str) else body
    prepared.headers.update(signed_headers(key, prepared.method or "GET", prepared.path_url, raw))
    if not raw:
        del prepared.headers["Content-Type"]
    return http.send(prepared, timeout=30)


def test_every_operation_answers_as_specified(service: Service) -> None:
    failures: dict[str, str] = {}
    operations = [result.ok() for result in api_schema(service).get_all_operations()]
    assert len(operations) >= 20
    with requests.Session() as http:
        for operation in operations:

            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
                database=None,
            )
            @given(case=operation.as_strategy())
            def run(case: Any) -> None:
                case.validate_response(call_signed(case, service, http), checks=CHECKS)

            try:
                run()
            except Exception as exc:  # collect every operation's first failure
                failures[operation.label] = str(exc)[:2000]
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
