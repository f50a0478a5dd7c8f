"""Property-based requests against the OpenAPI schema: no input makes the API fail (both DBs).

Schemathesis generates valid and invalid requests for every ``/api/v1`` operation and
checks each answer with its default checks: never a server error, and always a status
and body that the schema declares.  ``max_examples`` keeps the run under a minute.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from node.web import create_app
from tests.fixtures.admin import AdminNode

schemathesis = pytest.importorskip("schemathesis", reason="pip install schemathesis")

LOCAL_HOST = {"Host": "127.0.0.1"}  # the local dashboard refuses other Host names
EXAMPLES = 25


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_api_answers_every_request_as_its_schema_says(admin_node: AdminNode, mode: str) -> None:
    app = create_app(admin_node.ctx)
    schema = schemathesis.openapi.from_asgi("/api/v1/openapi.json", app, headers=LOCAL_HOST)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {
        "GET /api/v1/jobs",
        "GET /api/v1/jobs/{job_id}",
        "POST /api/v1/jobs/{job_id}/retry",
        "POST /api/v1/jobs/{job_id}/cancel",
        "POST /api/v1/jobs/{job_id}/resend",
        "GET /api/v1/status",
    }
    for operation in operations:
        inputs = (operation.path_parameters, operation.query, operation.body)
        if mode == "negative" and not any(len(items) for items in inputs):
            continue  # nothing to make invalid (GET /status)

        @given(case=operation.as_strategy(schemathesis.GenerationMode(mode)))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def answers(case: schemathesis.Case) -> None:
            case.call_and_validate(headers=LOCAL_HOST)

        answers()
