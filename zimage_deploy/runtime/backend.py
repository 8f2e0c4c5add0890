"""The interface every backend implements (runtime/backends.py: ONNX Runtime, the registry and the factory;
runtime/torch_fast.py: Torch; runtime/tensorrt_backend.py: TensorRT): run a component by name on named torch tensors,
get named torch tensors; and what it can do beyond that, declared once in its `abilities`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..export.specs import DTYPES
from ..manifest import Manifest, parse
from .offload import MODES as MEMORY_MODES


LORA_WAYS = ("branch", "feed", "refit")
BUILD_FILES = ("graphs", "scales", "plans")


@dataclass(frozen=True)
class Abilities:
    """What a backend can do, read by everything that used to keep its own list of backends.

    - `lora`: how it applies run-time LoRA sets (lora/runtime.py): "branch" (side branches in its modules, one set
      at a time: a switch waits for the generations of the active set), "feed" (the set's factors fed with each
      call: sets side by side), "refit" (its weights refitted from the base, one set at a time); None: it cannot.
    - `memory_modes`: "none" and the other memory modes (`--offload`, runtime/offload.py: "model",
      "text-encoder-cpu", "sequential") it runs.
    - `exact_batch`: the largest number of images one call may group whose images are bit for bit those of
      one-image calls (batch/job.py's default --batch-size).
    - `dtypes`: the compute dtypes of the builds it runs; `devices`: where it runs; `compile_modes`: its
      `torch_mode` values (() where it has no such choice).
    - `build_files`: what it loads from the build folder besides the tokenizer and scheduler, checked before the
      first generation (runtime/verify.py): "graphs" (ONNX graph folders), "scales" (quantization scales), "plans"
      (engine plans: checked by the backend itself as it loads them).
    - `profile_batch`: its batch limit is an engine profile's, which CFG's doubled batch counts against
      (runtime/validate.py `Limits.for_build`).
    - `options`: the keywords it takes beyond the common ones (make_backend refuses the others')."""

    lora: str | None = None
    memory_modes: tuple[str, ...] = ("none",)
    exact_batch: int = 1
    dtypes: tuple[str, ...] = ("float32",)
    devices: tuple[str, ...] = ("cpu",)
    compile_modes: tuple[str, ...] = ()
    build_files: tuple[str, ...] = ()
    profile_batch: bool = False
    options: tuple[str, ...] = ()

    def __post_init__(self):
        unknown = [(field, v) for field, values, known in (
            ("lora", (self.lora,) if self.lora else (), LORA_WAYS), ("memory_modes", self.memory_modes, MEMORY_MODES),
            ("build_files", self.build_files, BUILD_FILES)) for v in values if v not in known]
        if unknown or "none" not in self.memory_modes or self.exact_batch < 1 or not self.dtypes or not self.devices:
            raise ValueError(f"inconsistent backend abilities {self}: unknown {unknown}")


class Backend:
    name = "base"
    device = torch.device("cpu")
    abilities = Abilities()

    def __init__(self, engine_dir: Path, manifest: Manifest | dict):
        self.engine_dir = Path(engine_dir)
        self.manifest = parse(manifest, Path(engine_dir) / "manifest.json")
        self.components = manifest["components"]

    def run(self, component: str, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _cast_inputs(self, component: str, inputs: dict) -> dict[str, torch.Tensor]:
        spec = self.components[component]
        names = [i["name"] for i in spec["inputs"]]
        if sorted(inputs) != sorted(names):
            raise ValueError(f"{component} takes {names}, got {sorted(inputs)}")
        return {i["name"]: inputs[i["name"]].to(DTYPES[i["dtype"]]) for i in spec["inputs"]}

    # -- run-time LoRA sets (lora/runtime.py asks; `abilities.lora` says which of these the backend provides) ----
    def lora_refusal(self) -> str | None:
        """Why this backend, as opened, cannot apply run-time LoRAs now (None: it can)."""
        return None if self.abilities.lora else f"run-time LoRAs are not supported by the {self.name} backend"

    def lora_applier(self, targets, max_rank: int, max_loras: int):
        """The object applying LoRA sets to this backend: `prepare(table)` -> a prepared set; then, for the
        one-set-at-a-time ways ("branch", "refit"), `load(prepared)` (called with no generation running; {} / an
        empty table: the base weights); for "feed", `feeding(prepared)`: a context in which this thread's calls
        run with that set."""
        raise NotImplementedError(f"the {self.name} backend applies no run-time LoRAs")
