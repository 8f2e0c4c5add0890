"""The build folder's layout, written once: where each stage puts its files and where the runtime finds them.

    DIR/manifest.json                      what the build produced (manifest.py)
    DIR/onnx/<component>/model.onnx        graphs, as exported (+ external weights beside them); none in a
                                           graphless build (its components' `source` is CHECKPOINT: the compiled
                                           Torch runtime loads the checkpoint the manifest records)
    DIR/onnx/<component>.<scheme>/         quantized graphs
    DIR/onnx/<component>[.<scheme>].lora/  the graph with the LoRA branch an engine was built from (its external
                                           data: hard links to the graph's)
    DIR/quant/<component>.<scheme>.safetensors   calibrated scales
    DIR/engines/<component>.plan           TensorRT / TensorRT-RTX plans (GPU targets)
    DIR/loras/<sha256[:16]>.safetensors    LoRAs fused at build time (copies, for refits)
    DIR/tokenizer/, DIR/scheduler/, DIR/siglip_processor/   copied from the checkpoint

The manifest records paths relative to DIR (portable folders); `BuildFolder.file` resolves one and refuses a path
that leaves the folder (a manifest is input, and may be hostile). A leaf apart from fsutil and errors.
"""

from __future__ import annotations

import shutil
from pathlib import Path, PurePosixPath

from .errors import UserError
from .fsutil import atomic_dir

GRAPHS, SCALES, PLANS, LORAS = "onnx", "quant", "engines", "loras"
TOKENIZER, SCHEDULER, SIGLIP_PROCESSOR = "tokenizer", "scheduler", "siglip_processor"
CHECKPOINT = "checkpoint"  # a graphless build's components' `source`


def support_folders(omni: bool) -> tuple[str, ...]:
    """The checkpoint folders a build copies and its pipelines read (the omni layout's SigLIP processor too)."""
    return (TOKENIZER, SCHEDULER) + ((SIGLIP_PROCESSOR,) if omni else ())


class BuildFolder:
    def __init__(self, root):
        self.root = Path(root)

    # -- relative paths, as the manifest records them ---------------------------------------------------------
    @staticmethod
    def graph_rel(component: str, scheme: str | None = None) -> str:
        return f"{GRAPHS}/{component}{'' if scheme is None else '.' + scheme}/model.onnx"

    @staticmethod
    def branch_graph_rel(graph_rel: str) -> str:
        """The graph with the LoRA side branch (lora/tensorrt.py) made from the graph `graph_rel`: in a folder of its
        own (a graph's folder holds its files only: verify.py sizes and hashes it)."""
        p = PurePosixPath(graph_rel)
        return str(p.parent.with_name(p.parent.name + ".lora") / p.name)

    @staticmethod
    def scales_rel(component: str, scheme: str) -> str:
        return f"{SCALES}/{component}.{scheme}.safetensors"

    @staticmethod
    def plan_rel(component: str) -> str:
        return f"{PLANS}/{component}.plan"

    @staticmethod
    def lora_rel(sha256: str) -> str:
        return f"{LORAS}/{sha256[:16]}.safetensors"

    # -- absolute paths -----------------------------------------------------------------------------------------
    def file(self, rel) -> Path:
        """A path the manifest records, inside this folder; anything else (absolute on any system, `..`, a drive or
        stream `:`, control characters, a name too long for a file system, not a string) is an error that names
        the manifest. Judged on the path as it will be joined (backslashes as separators)."""
        if not isinstance(rel, str) or not rel:
            raise UserError(f"{self.root}/manifest.json records a path that is not a non-empty string "
                            f"({str(rel)[:80]!r}): rebuild")
        shown = rel if len(rel) <= 200 else rel[:200] + "..."
        norm = PurePosixPath(rel.replace("\\", "/"))
        parts = norm.parts
        if (not parts or norm.is_absolute() or Path(rel).is_absolute() or any(p in (".", "..") for p in parts)
                or any(":" in p or len(p.encode()) > 255 or any(ord(c) < 32 for c in p) for p in parts)):
            raise UserError(f"{self.root}/manifest.json records the path {shown!r}, which leaves the build folder "
                            "or is no file name: refused; rebuild")
        return self.root.joinpath(*parts)

    def graph(self, component: str, scheme: str | None = None) -> Path:
        return self.file(self.graph_rel(component, scheme))

    def graph_dir(self, component: str, scheme: str | None = None) -> Path:
        return self.graph(component, scheme).parent

    @property
    def graphs(self) -> Path:
        return self.root / GRAPHS

    def scales(self, component: str, scheme: str) -> Path:
        return self.file(self.scales_rel(component, scheme))

    def plan(self, component: str) -> Path:
        return self.file(self.plan_rel(component))

    def lora(self, sha256: str) -> Path:
        return self.file(self.lora_rel(sha256))

    @property
    def tokenizer(self) -> Path:
        return self.root / TOKENIZER

    @property
    def scheduler(self) -> Path:
        return self.root / SCHEDULER

    @property
    def siglip_processor(self) -> Path:
        return self.root / SIGLIP_PROCESSOR

    # -- what more than one stage does ------------------------------------------------------------------------
    def copy_support(self, checkpoint: Path, folder: str) -> None:
        """Copy a checkpoint folder (tokenizer, scheduler, SigLIP processor) into the build, atomically."""
        with atomic_dir(self.root / folder) as tmp:
            shutil.copytree(Path(checkpoint) / folder, tmp, dirs_exist_ok=True)

    def drop_graph(self, entry: dict, log, what: str) -> None:
        """Delete a graph the runtime does not need (--drop-intermediate); the manifest keeps its hash and says
        so."""
        folder = self.file(entry["onnx"]).parent
        if folder.is_dir():
            size = sum(p.stat().st_size for p in folder.iterdir())
            shutil.rmtree(folder)
            log(f"[drop] {what}: {folder.relative_to(self.root)} ({size / 2**30:.2f} GiB)")
        entry["dropped"] = True
