"""Schemathesis against /openapi.json of a real server: every operation, schema-valid and schema-violating
requests, at least 1000 generated cases in all. No server errors, and every response conforms to the schema
(status code documented, content type documented, body valid against its schema, headers as documented).

"No server error" is stricter than schemathesis' default (any status below 500): the only 5xx allowed are a
documented 503 refusal (queue full, not ready) carrying Retry-After, and 504 ``deadline_exceeded`` for a request
that asked for a deadline of its own (a generated X-Request-Timeout of a few milliseconds does expire).

``positive_data_acceptance`` is left out: the schema says "binary" for an image part, and random bytes are a
valid binary string but not an image, so a 422 for them is right. Where the generator can build a wholly valid
body (latents, sample parameters), the document states every limit of the running server (service.api.openapi),
and nearly every generated request is served.
"""

from collections import Counter, defaultdict
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance, negative_data_rejection, response_headers_conformance, response_schema_conformance,
    status_code_conformance,
)

from tests.reliability.live_server import live_server
from service.app import create_app
from service.config import Settings

EXAMPLES = 110  # per operation and generation mode: 5 POST operations x 2 modes x 110 = 1100, plus the GETs
MIN_CASES = 1000
REFUSALS = {"queue_full", "not_ready"}
ACCEPTED = {"POST /decode", "POST /sample"}  # bodies the generator can make wholly valid: at least 90% served
# Statuses that mean "refused" for a schema-violating request (schemathesis' list, plus 413: a value over a
# server limit, which the schema cannot say, is refused before the rest of the request is looked at).
REJECTION_STATUSES = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]


@pytest.fixture(scope="module")
def server(digits_artifact: Path, tmp_path_factory: pytest.TempPathFactory):
    # Small limits keep generated cases cheap (n, K and steps up to the limit are generated too).
    with live_server(digits_artifact, tmp_path_factory.mktemp("schemathesis"), max_rows=16, max_n=64, max_k=128,
                     max_steps=64, torch_threads=1, log_level="warning") as running:
        yield running


def no_server_error(response, case) -> None:
    status = response.status_code
    if status < 500:
        return
    headers = response.headers  # lower-case names, list values
    error = response.json().get("error") if "json" in str(headers.get("content-type")) else None
    code = error.get("code") if isinstance(error, dict) else None  # /v2 (Open Inference Protocol): a string
    own_deadline = any(name.lower() == "x-request-timeout" for name in case.headers or {})
    expired = status == 504 and code == "deadline_exceeded" and own_deadline and not headers.get("retry-after")
    refused = status == 503 and code in REFUSALS and headers.get("retry-after")
    assert expired or refused, f"server error {status} for {case.method} {case.path}: {response.text[:300]}"


def _refs(node):
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_the_openapi_document_describes_every_body_and_error(digits_artifact):
    """Fast and in the default suite: what the fuzzing below needs from the document to reach every endpoint.
    Every $ref resolves; every model endpoint documents its request body; and every error status this server
    answers (400 malformed multipart, 413, 415, 422, 500 model_error with its error_id, 503 refusals) is
    documented with the error schema."""
    spec = create_app(Settings(model_path=digits_artifact)).openapi()
    components = spec.get("components", {}).get("schemas", {})
    dangling = sorted({ref for ref in _refs(spec) if ref.split("/")[-1] not in components})
    assert not dangling, f"$refs to schemas that are not in components: {dangling}"
    for path in ("/encode", "/decode", "/sample", "/interpolate", "/anomaly-score"):
        operation = spec["paths"][path]["post"]
        content = operation.get("requestBody", {}).get("content", {})
        assert "application/json" in content, f"{path} documents no JSON request body"
        missing = {"400", "401", "413", "415", "422", "500", "503"} - set(operation["responses"])
        assert not missing, f"{path} does not document {sorted(missing)}"


@pytest.mark.slow
def test_openapi_cases_get_no_server_error_and_conform(server):
    config = schemathesis.Config.from_dict(
        {"checks": {"negative_data_rejection": {"expected-statuses": REJECTION_STATUSES}}})
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", config=config)
    conformance = [status_code_conformance, content_type_conformance, response_schema_conformance,
                   response_headers_conformance]
    counts = {}
    statuses = defaultdict(Counter)
    for result in schema.get_all_operations():
        operation = result.ok()
        has_inputs = bool(operation.body) or any(True for _ in operation.iter_parameters())
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if has_inputs else (GenerationMode.POSITIVE,):
            checks = conformance + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])
            key = f"{operation.label} {mode.value}"
            counts[key] = 0

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            def run(case) -> None:
                counts[key] += 1
                response = case.call(base_url=server.url, timeout=60)
                statuses[(key, case.media_type)][response.status_code] += 1
                no_server_error(response, case)
                case.validate_response(response, checks=checks)

            run()
    print("\nschemathesis cases:", sum(counts.values()), counts)
    for (key, media), seen in sorted(statuses.items(), key=str):
        print(f"  {key} {media}: {dict(sorted(seen.items()))}")
    for label in ACCEPTED:
        seen = statuses[(f"{label} positive", "application/json")]
        served = sum(n for status, n in seen.items() if status < 300 or status == 504)  # 504: its own deadline
        assert served >= 0.9 * sum(seen.values()), (label, dict(seen))
    assert sum(counts.values()) >= MIN_CASES, counts
    assert server.process.poll() is None, server.log_tail()
