import os
import re
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    """Every test session gets its own checkpoint cache (the embedded tiny model is written there)."""
    os.environ["ZIMAGE_DEPLOY_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_ckpt(_cache):
    from zimage_deploy.tiny import ensure_tiny

    return ensure_tiny()


# A second checkpoint with another config: more heads, deeper, other RoPE split, other scheduler shift.
ALT_CONFIG = dict(
    dit=dict(dim=96, n_heads=3, n_kv_heads=3, n_layers=3, n_refiner_layers=2, axes_dims=[8, 12, 12], rope_theta=100.0),
    text=dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=3, head_dim=8),
    vae=dict(block_out_channels=(8, 8, 16, 16), layers_per_block=2),
    scheduler=dict(shift=2.0),
    seed=7,
)


@pytest.fixture(scope="session")
def alt_ckpt(tmp_path_factory):
    from zimage_deploy.tiny import write_checkpoint

    return write_checkpoint(Path(tmp_path_factory.mktemp("alt")) / "ckpt", **ALT_CONFIG)


def _build(tmp_path_factory, ckpt, precision, variant="turbo"):
    from zimage_deploy import build

    out = Path(tmp_path_factory.mktemp(f"build-{precision}"))
    assert build.main(["--model", str(ckpt), "--variant", variant, "--target", "cpu", "--precision", precision,
                       "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_fp32(tmp_path_factory, tiny_ckpt):
    return _build(tmp_path_factory, tiny_ckpt, "fp32")


@pytest.fixture(scope="session")
def tiny_bf16(tmp_path_factory, tiny_ckpt):
    return _build(tmp_path_factory, tiny_ckpt, "bf16")


@pytest.fixture(scope="session")
def base_ckpt(_cache):
    from zimage_deploy.tiny import ensure_tiny

    return ensure_tiny("tiny-base")


@pytest.fixture(scope="session")
def base_fp32(tmp_path_factory, base_ckpt):
    return _build(tmp_path_factory, base_ckpt, "fp32", "base")


def synthetic_image(width, height, seed=0):
    """A deterministic test picture: gradients plus texture (not flat, not pure noise)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([255 * x / width, 255 * y / height, 128 + 60 * np.sin(x / 5.0) * np.cos(y / 7.0)], axis=-1)
    arr = np.clip(arr + rng.normal(0, 12, arr.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


@pytest.fixture(scope="session")
def edit_ckpt(_cache):
    from zimage_deploy.tiny import ensure_tiny

    return ensure_tiny("tiny-edit")


@pytest.fixture(scope="session")
def edit_fp32(tmp_path_factory, edit_ckpt):
    return _build(tmp_path_factory, edit_ckpt, "fp32", "edit")


@pytest.fixture(scope="session")
def edit_bf16(tmp_path_factory, edit_ckpt):
    return _build(tmp_path_factory, edit_ckpt, "bf16", "edit")


def in_ci() -> bool:
    """True in CI (.ci/run exports CI=true): there a missing test dependency is a failure, not a skip."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def need(module: str):
    """Import and return `module` (an optional dependency such as tensorrt_rtx or modelopt), or skip the calling
    test where it is not installed; in CI, where every extra is installed, fail instead."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        if in_ci():
            pytest.fail(f"{module} must be installed in CI (scripts/setup.sh installs every extra): {e}",
                        pytrace=False)
        pytest.skip(f"{module} is not installed here ({e})", allow_module_level=True)


# In CI a test skipped because something is not installed is a failure, however the skip was made (need() above
# fails already; this catches pytest.importorskip and hand-written skips): CI installs every extra.
MISSING = re.compile(r"No module named|could not import|not installed|cannot import name", re.IGNORECASE)


def missing_dependency(report) -> str | None:
    """The reason of a skipped report when it says that something is not installed."""
    if not report.skipped or not isinstance(report.longrepr, tuple):
        return None
    reason = str(report.longrepr[2])
    return reason if MISSING.search(reason) else None


def _fail_in_ci(report) -> None:
    reason = missing_dependency(report) if in_ci() else None
    if reason:
        report.outcome = "failed"
        report.longrepr = f"skipped for a missing dependency, which CI must have installed: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_in_ci(outcome.get_result())
