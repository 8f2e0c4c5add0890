"""The HTTP API fuzzed from its own OpenAPI description (schemathesis, valid and invalid inputs): no 5xx and no
hang on any route, jobs included. Bounded: a few hundred cases over a server whose sizes and steps are capped so
that a generated valid request costs little."""

import pytest

from conftest import need

schemathesis = need("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from serve_util import ServerThread  # noqa: E402

CASES = 8  # per operation and mode (valid, invalid): 11 operations, < 200 cases


@pytest.fixture(scope="module")
def fuzzed_server(tiny_fp32, tmp_path_factory):
    from zimage_deploy import ZImageRuntime
    from zimage_deploy.serve.app import create_app
    from zimage_deploy.serve.jobs import Jobs, JobStore
    from zimage_deploy.serve.schema import ServeLimits

    runtime = ZImageRuntime(tiny_fp32)
    limits = ServeLimits.for_build(runtime.limits, max_side=64, max_steps=2)
    jobs = Jobs(JobStore(tmp_path_factory.mktemp("fuzz-jobs")), max_queued=8)
    with ServerThread(create_app(runtime, limits, timeout_s=30, batch_wait_ms=0, jobs=jobs)) as url:
        yield url


def test_no_5xx_and_no_hang(fuzzed_server):
    from hypothesis import given
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_url(f"{fuzzed_server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10  # every route is described (jobs included)
    for operation in operations:
        for mode in schemathesis.GenerationMode:
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=CASES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def check(case):
                response = case.call(base_url=fuzzed_server, timeout=60)  # a hang fails as a timeout
                assert response.status_code < 500, (case.method, case.path, response.status_code,
                                                    response.text[:300])
                if response.status_code >= 400:
                    assert response.json()["error"]["code"] == response.status_code  # the one error shape

            try:
                check()
            except Unsatisfiable:  # nothing to make invalid (a GET without parameters)
                assert mode == schemathesis.GenerationMode.NEGATIVE
