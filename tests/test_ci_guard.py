"""The CI guard of the tests' optional dependencies: in CI (.ci/run exports CI=true) a missing one fails the test
that needs it; elsewhere that test is skipped with the reason."""

from pathlib import Path

import pytest

from conftest import in_ci, need


def test_missing_dependency_skips_outside_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    assert not in_ci()
    with pytest.raises(pytest.skip.Exception, match="no_such_module_zimage"):
        need("no_such_module_zimage")


@pytest.mark.parametrize("value", ["true", "1", "True"])
def test_missing_dependency_fails_in_ci(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    assert in_ci()
    with pytest.raises(pytest.fail.Exception, match="must be installed in CI"):
        need("no_such_module_zimage")
    assert need("json").dumps([1]) == "[1]"  # an installed module is returned


def test_ci_script_sets_ci():
    script = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text().splitlines()
    exported = next(i for i, line in enumerate(script) if line.strip() == "export CI=true")
    assert exported < next(i for i, line in enumerate(script) if "pytest" in line)
