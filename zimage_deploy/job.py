"""One build's checked inputs, handed to every stage (export, parity, quantize, engines)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .buildfolder import BuildFolder
from .components import DIT, loader_of
from .controlnet import BuildControlNet
from .engines.builder import EngineBuilder
from .engines.profiles import EngineOptions
from .export.modules import Modules
from .lora.fuse import BuildLoras
from .manifest import Manifest
from .quantize.options import QuantOptions
from .targets import Target
from .variants import Variant


@dataclass
class BuildJob:
    ckpt: Path
    model: str  # as given (--model)
    v: Variant  # with `controlnet` among its components when the build has one
    t: Target
    precision: str
    plan: dict  # component -> precision (targets.precision_plan)
    out: Path  # the build folder
    parity: bool
    engine_opts: EngineOptions
    engine_builder: EngineBuilder | None  # None: no engines (cpu target, --skip-engines)
    engine_shapes: dict | None  # component -> profile
    facts: dict  # facts.model_facts
    log: object
    lean: str  # "auto" / "on" / "off" as asked; the export stage decides
    quant: QuantOptions
    prompts: list  # calibration prompts (empty when no scheme needs data)
    loras: BuildLoras
    drop_intermediate: bool = False
    controlnet: BuildControlNet | None = None
    previous: Manifest | dict = field(default_factory=dict)  # the folder's manifest before this build ({}: none)
    torch_runtime: bool = False  # a datacenter target without TensorRT here: no engines, the compiled Torch runtime
    graphs: bool = True  # False: no ONNX graphs (the compiled Torch runtime loads the checkpoint; build._graphless)
    modules: Modules = field(init=False)

    def __post_init__(self):
        self.modules = Modules(self.ckpt, self.loras, self.controlnet)

    def lora_branch(self, name: str, comp: dict):
        """The engines stage's graph with the LoRA side branch for component `name` (lora/tensorrt.py
        `BranchGraph`), or None: no run-time LoRA capacity asked (`EngineOptions.lora_bounds`), or not a DiT
        component."""
        bounds = self.engine_opts.lora_bounds
        if not bounds or loader_of(name) != DIT:
            return None
        from .lora.tensorrt import BranchGraph
        from .lora.targets import graph_path

        folder = BuildFolder(self.out)
        return BranchGraph(folder.file(comp["onnx"]), graph_path(self.out, comp), self.facts.get("patch_size", 2),
                           *bounds)
