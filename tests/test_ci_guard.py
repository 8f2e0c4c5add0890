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


TESTS = Path(__file__).resolve().parent


def test_no_test_skips_by_hand_for_a_missing_module():
    """Optional dependencies go through conftest's need() (a failure in CI), never pytest.importorskip or a
    hand-made skip, whose skip CI would not notice."""
    offenders = [f"{p.name}:{i}" for p in sorted(TESTS.glob("*.py")) if p.name not in ("conftest.py", Path(__file__).name)
                 for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
                 if "importorskip" in line or ("pytest.skip(" in line and "not installed" in line)]
    assert not offenders, f"use conftest.need(module) instead: {offenders}"


MODULE = '''
import pytest

pytest.importorskip("no_such_module_zimage")


def test_a():
    pass
'''
IN_TEST = '''
import pytest


def test_b():
    pytest.importorskip("no_such_module_zimage", reason="no_such_module_zimage not installed")


def test_gpu():
    pytest.skip("needs a GPU; none is visible here")
'''


@pytest.mark.parametrize("ci", [True, False])
def test_skips_for_missing_modules_fail_the_ci_session(tmp_path, ci):
    """conftest's hooks: under CI a test or module skipped because a module is missing fails the run (however the
    skip was made); other skips (no GPU) stay skips; outside CI both are skips."""
    import os
    import shutil
    import subprocess
    import sys

    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_module_skip.py").write_text(MODULE)
    (tmp_path / "test_in_test_skip.py").write_text(IN_TEST)
    env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": "true"} if ci else {})
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                        "--continue-on-collection-errors", str(tmp_path)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    if ci:
        assert r.returncode == 1, out
        assert "1 failed, 1 skipped, 1 error" in out, out  # test_b fails, test_gpu skips, the module errors
        assert out.count("skipped for a missing dependency") >= 2, out
    else:
        assert r.returncode == 0 and "3 skipped" in out, out
