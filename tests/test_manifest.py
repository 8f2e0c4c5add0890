"""The typed manifest (zimage_deploy/manifest.py): checked once at load with errors naming the key, old manifests
read or refused clearly, and written back unchanged."""

import copy
import json
import pickle
from dataclasses import replace

import pytest

from zimage_deploy import manifest as manifest_io
from zimage_deploy.errors import UserError
from zimage_deploy.manifest import Engine, Manifest, RuntimePlan


def _manifest() -> dict:
    """A manifest as a TensorRT build with a VRAM plan, a quantized DiT and a fused LoRA writes it (abridged)."""
    engine = {"plan_sha256": "ab" * 32, "bytes": 1234, "flavour": "tensorrt-rtx", "version": "1.7.1.116",
              "compute_capability": [8, 9], "gpu": None, "cuda_graphs": True, "profile": {"x": [[1], [2], [4]]},
              "options": {"refittable": True, "max_batch": 4}, "stripped": False, "timing_cache": None,
              "build_seconds": 1.5, "plan": "engines/transformer.plan", "key": "k1", "status": "complete"}
    return {
        "schema": 1, "zimage_deploy": "0.1.0", "created": "2026-12-02T05:02:13+00:00",
        "host": {"machine": "x86_64"}, "variant": "turbo", "target": "rtx4090", "precision": "fp8",
        "model": {"source": "tiny", "path": "/nowhere/tiny", "sha256": "cd" * 32, "facts": {"dim": 64}},
        "plan": {"text_encoder": "bf16", "transformer": "fp8"},
        "defaults": {"steps": 8, "guidance_scale": 0.0, "height": 256, "width": 256, "resolution_multiple": 16,
                     "max_sequence_length": 512},
        "tensorrt": {"flavour": "tensorrt-rtx", "version": "1.7.1.116", "compute_capability": [8, 9],
                     "options": {"max_batch": 4}},
        "components": {
            "text_encoder": {"onnx": "onnx/text_encoder/model.onnx", "bytes": 10, "onnx_sha256": "ef" * 32,
                             "precision": "bf16", "compute_dtype": "bfloat16", "status": "complete",
                             "engine": {**engine, "plan": "engines/text_encoder.plan"}, "parity": {"passed": True}},
            "transformer": {"onnx": "onnx/transformer.fp8/model.onnx", "bytes": 20, "weight_bytes": 15,
                            "onnx_sha256": "01" * 32, "precision": "fp8", "status": "complete", "engine": engine,
                            "unquantized": {"onnx": "onnx/transformer/model.onnx", "precision": "bf16"},
                            "quantization": {"key": "q", "scheme": "fp8", "method": "max", "block": None,
                                             "scales": "quant/transformer.fp8.safetensors",
                                             "scales_sha256": "23" * 32}}},
        "stages": {"export": {"status": "done"}, "total_seconds": 3.0},
        "loras": [{"sha256": "45" * 32, "scale": 1.0}],
        "runtime": {"mode": "low-vram", "planned_at": [256, 256], "needs_gib": {"all-resident": 30.0},
                    "memory_gib": 24.0, "stream_budget_bytes": {}, "advice": ["a smaller size"]},
    }


def _write(folder, data) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / manifest_io.NAME).write_text(json.dumps(data, indent=2) + "\n")


def test_load_types_every_part(tmp_path):
    _write(tmp_path, _manifest())
    m = manifest_io.load(tmp_path)
    assert isinstance(m, Manifest) and m.variant == "turbo" and m.defaults.steps == 8
    assert m.model.facts == {"dim": 64} and m.tensorrt.compute_capability == (8, 9)
    dit = m.components["transformer"]
    assert dit.complete and dit.has_engine and dit.engine.refittable and dit.engine.stripped is False
    assert dit.quantization.scheme == "fp8" and dit.weight_bytes == 15
    assert dit.extra["unquantized"]["precision"] == "bf16"
    assert m.runtime.mode == "low-vram" and m.runtime.low_vram and m.has_engines
    assert manifest_io.planned_low_vram(m, None) and not manifest_io.planned_low_vram(m, False)
    assert m["components"]["transformer"]["engine"]["key"] == "k1"  # the mapping over the JSON, for old readers
    assert m.get("stages")["total_seconds"] == 3.0 and "loras" in m and m.loras[0]["scale"] == 1.0


@pytest.mark.parametrize("damage,message", [
    (lambda d: d["defaults"].pop("steps"), "'defaults.steps' missing"),
    (lambda d: d["defaults"].update(height="256"), "'defaults.height' is a string, expected an integer"),
    (lambda d: d["defaults"].update(steps=True), "'defaults.steps' is a boolean, expected an integer"),
    (lambda d: d.update(variant=3), "'variant' is an integer, expected a string"),
    (lambda d: d["model"].pop("facts"), "'model.facts' missing"),
    (lambda d: d.update(components=[]), "'components' is a list, expected an object"),
    (lambda d: d["components"].update(vae_decoder="x"), "'components.vae_decoder' is a string, expected an object"),
    (lambda d: d["components"]["transformer"].update(engine="x"),
     "'components.transformer.engine' is a string, expected an object"),
    (lambda d: d["components"]["transformer"]["engine"].update(bytes="1234"),
     "'components.transformer.engine.bytes' is a string, expected an integer"),
    (lambda d: d["components"]["transformer"]["quantization"].update(scales=7),
     "'components.transformer.quantization.scales' is an integer, expected a string"),
    (lambda d: d["runtime"].update(mode=["low-vram"]), "'runtime.mode' is a list, expected a string"),
    (lambda d: d["tensorrt"].update(options=[]), "'tensorrt.options' is a list, expected an object"),
])
def test_a_broken_manifest_is_refused_at_load_naming_the_key(tmp_path, damage, message):
    """Before the typed manifest, load checked four keys: a wrong-typed engine, quantization or runtime record
    loaded and failed later (AttributeError / TypeError inside a backend)."""
    data = _manifest()
    damage(data)
    _write(tmp_path, data)
    with pytest.raises(UserError) as e:
        manifest_io.load(tmp_path)
    assert message in str(e.value) and "is not a complete build manifest" in str(e.value)
    assert str(e.value).endswith("rebuild") and str(tmp_path) in str(e.value)


def test_an_older_manifest_loads_and_another_format_is_refused(tmp_path):
    """A manifest from before the engine, quantization, VRAM-plan and host records (what the first builds wrote:
    the schema, variant, model, defaults and graphs) loads; another schema number, or none, is refused with what to
    do."""
    data = _manifest()
    for key in ("zimage_deploy", "created", "host", "target", "precision", "plan", "tensorrt", "stages", "loras",
                "runtime"):
        del data[key]
    for comp in data["components"].values():
        for key in ("engine", "quantization", "unquantized", "weight_bytes", "compute_dtype"):
            comp.pop(key, None)
    _write(tmp_path / "old", data)
    m = manifest_io.load(tmp_path / "old")
    assert m.tensorrt is None and m.runtime is None and not m.has_engines and m.target is None
    assert not manifest_io.planned_low_vram(m, None) and m.components["transformer"].engine is None
    for schema in (0, 2, "1", None):
        _write(tmp_path / str(schema), {**data, "schema": schema})
        with pytest.raises(UserError, match=rf"has manifest schema {schema!r}, this version reads 1: rebuild"):
            manifest_io.load(tmp_path / str(schema))
    del data["schema"]
    _write(tmp_path / "none", data)
    with pytest.raises(UserError, match="has manifest schema None"):
        manifest_io.load(tmp_path / "none")


def test_write_load_write_is_unchanged(tmp_path):
    """Every key survives: the typed fields, the ones only carried (`extra`), nulls, and the order of the keys."""
    data = _manifest()
    _write(tmp_path / "a", data)
    first = manifest_io.load(tmp_path / "a")
    manifest_io.save(tmp_path / "b", first)
    assert (tmp_path / "b" / manifest_io.NAME).read_bytes() == (tmp_path / "a" / manifest_io.NAME).read_bytes()
    second = manifest_io.load(tmp_path / "b")
    assert second == first and second.to_dict() == data
    manifest_io.save(tmp_path / "c", second)
    assert (tmp_path / "c" / manifest_io.NAME).read_bytes() == (tmp_path / "b" / manifest_io.NAME).read_bytes()
    assert copy.deepcopy(first) == first and pickle.loads(pickle.dumps(first)) == first  # Ray actors get it pickled


def test_records_a_stage_builds_write_every_field():
    """A writer's record (engines stage, VRAM plan) writes all its keys, nulls too; parsed back it is equal."""
    eng = Engine(plan_sha256="ab", bytes=3, flavour="tensorrt", version="10.13", compute_capability=(9, 0),
                 options={"refittable": False}, stripped=False, build_seconds=0.5, plan="engines/t.plan", key="k",
                 status="complete")
    d = eng.to_dict()
    assert list(d) == ["plan_sha256", "bytes", "flavour", "version", "compute_capability", "gpu", "cuda_graphs",
                       "profile", "options", "stripped", "timing_cache", "build_seconds", "plan", "key", "status"]
    assert d["gpu"] is None and d["compute_capability"] == [9, 0]
    assert Engine.parse(json.loads(json.dumps(d)), "engine") == eng
    rt = RuntimePlan.parse({})  # no VRAM plan: adding the backend writes the backend alone
    assert replace(rt, backend="torch-compiled").to_dict() == {"backend": "torch-compiled"}


def test_the_plain_dict_helpers_read_the_same_records():
    """has_engines / planned_low_vram take a Manifest or the plain dict a build grows (or a fragment of it)."""
    data = _manifest()
    assert manifest_io.has_engines(data) and manifest_io.has_engines(manifest_io.parse(data))
    data["components"]["text_encoder"]["engine"] = None
    assert not manifest_io.has_engines(data) and not manifest_io.parse(data).has_engines
    assert manifest_io.planned_low_vram({"runtime": {"mode": "weight-streaming"}}, None)
    with pytest.raises(UserError, match="'runtime.mode' is an integer"):
        manifest_io.planned_low_vram({"runtime": {"mode": 1}}, None)
