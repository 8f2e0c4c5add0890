"""The backend registry (runtime/backends.py): every registered backend declares its abilities on its own class,
implements what they promise, has a conformance test class (tests/backend_conformance.py), and the places that
used to keep their own backend lists read the registry."""

import ast
from pathlib import Path

import pytest

from backend_conformance import BackendConformance
from zimage_deploy import bench
from zimage_deploy.errors import UserError
from zimage_deploy.runtime.backend import LORA_WAYS, Abilities, Backend
from zimage_deploy.runtime.backends import BACKENDS, REGISTRY, backend_entry, check_options, check_torch_mode

TESTS = Path(__file__).resolve().parent
DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "bfloat16")


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_backend_declares_its_abilities(name):
    entry = REGISTRY[name]
    cls = entry.backend
    assert issubclass(cls, Backend) and cls.name == name == entry.name and callable(entry.make)
    assert isinstance(cls.__dict__.get("abilities"), Abilities), f"{name} inherits its abilities: declare them"
    ab = cls.abilities
    assert ab.lora in (None, *LORA_WAYS) and ab.exact_batch >= 1 and "none" in ab.memory_modes
    assert set(ab.devices) <= set(DEVICES) and ab.devices and set(ab.dtypes) <= set(DTYPES) and ab.dtypes
    if ab.lora:  # the promise kept: it provides the applier (and refuses nothing by default)
        assert cls.lora_applier is not Backend.lora_applier, f"{name} declares LoRA way {ab.lora}, no applier"
    if ab.compile_modes:
        assert "torch_mode" in ab.options


def test_abilities_refuse_nonsense():
    for bad in (dict(lora="merge"), dict(memory_modes=("model",)), dict(exact_batch=0), dict(build_files=("x",)),
                dict(devices=())):
        with pytest.raises(ValueError):
            Abilities(**bad)


def test_every_backend_has_a_conformance_class():
    """Adding a backend means a registry entry and a subclass of BackendConformance in its test module."""
    covered = {}
    for path in TESTS.glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(getattr(b, "id", "") == BackendConformance.__name__
                                                      for b in node.bases):
                for stmt in node.body:
                    if isinstance(stmt, ast.Assign) and getattr(stmt.targets[0], "id", "") == "backend":
                        covered[stmt.value.value] = path.name
    assert set(covered) == set(REGISTRY), covered


def test_the_lists_read_the_registry():
    assert BACKENDS == ("auto", *REGISTRY)
    ours = [r for r in bench.BACKENDS if not r.startswith("diffusers")]
    assert ours == [r for n, e in REGISTRY.items() for r in (n, *(f"{n}-{m}" for m in e.abilities.compile_modes))]
    with pytest.raises(UserError, match="unknown backend 'nope'; choose one of: auto, "):
        backend_entry("nope")


def test_options_of_another_backend_refused():
    check_torch_mode("torch", "eager")
    with pytest.raises(UserError, match="--torch-mode eager is an option of the torch backend, not of onnxruntime"):
        check_torch_mode("onnxruntime", "eager")
    with pytest.raises(UserError, match="torch_mode must be one of eager, compiled"):
        check_torch_mode("torch", "jit")
    check_options("onnxruntime", ort_providers=["CPUExecutionProvider"], torch_mode=None)
    with pytest.raises(UserError, match="--ort-providers A,B is an option of the onnxruntime backend, not of tensorrt"):
        check_options("tensorrt", ort_providers=["A", "B"])
