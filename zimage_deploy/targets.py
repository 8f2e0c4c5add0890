"""Deployment targets, declared once: GPU architecture, memory, TensorRT flavour, precisions."""

from __future__ import annotations

from dataclasses import dataclass

from .components import ALL_COMPONENTS
from .errors import UserError

PRECISIONS = ("fp32", "bf16", "fp8", "int4", "nvfp4")
QUANTIZED = ("fp8", "int4", "nvfp4")  # precisions made by the quantize stage
TEXT_ENCODER_PRECISIONS = ("bf16", "fp8", "int4")

# What each requested precision quantizes. The rest of the model stays in the target's base dtype (BF16 on GPUs,
# float32 on the CPU, whose ONNX Runtime has no BF16 kernels); the VAE is never quantized.
QUANTIZED_COMPONENTS = {
    "fp8": {"transformer": "fp8"},
    "int4": {"transformer": "int4", "text_encoder": "int4"},
    "nvfp4": {"transformer": "nvfp4", "text_encoder": "int4"},
}


def precision_plan(precision: str, base: str, text_encoder: str | None = None) -> dict[str, str]:
    """Per-component precision. `base` is the unquantized dtype ("fp32" or "bf16"); `text_encoder` overrides the
    text encoder's ("bf16" = not quantized)."""
    plan = {c: base for c in ALL_COMPONENTS}
    if precision in ("fp32", "bf16"):
        plan = {c: precision for c in ALL_COMPONENTS}
    plan.update(QUANTIZED_COMPONENTS.get(precision, {}))
    if text_encoder is not None:
        plan["text_encoder"] = base if text_encoder == "bf16" else text_encoder
    return plan


def base_precision(plan_value: str, base: str) -> str:
    """The dtype a component is exported in before the quantize stage."""
    return base if plan_value in QUANTIZED else plan_value


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    compute_capability: tuple[int, int] | None  # None: CPU
    memory_gib: int | None
    flavour: str  # "tensorrt-rtx", "tensorrt" or "none" (CPU: ONNX Runtime)
    precisions: tuple[str, ...]
    default_precision: str

    @property
    def base(self) -> str:
        """Unquantized dtype of this target's graphs when a quantized precision is asked for."""
        return "fp32" if self.compute_capability is None else "bf16"

    @property
    def sm(self) -> str | None:
        if self.compute_capability is None:
            return None
        major, minor = self.compute_capability
        return f"SM{major}{minor}"

    def check_precision(self, precision: str) -> None:
        if precision not in PRECISIONS:
            raise UserError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
        if precision not in self.precisions:
            raise UserError(
                f"precision {precision!r} is not supported on target {self.name!r} ({self.description}); "
                f"it supports: {', '.join(self.precisions)}"
            )


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("cpu", "CPU reference (ONNX Runtime / Torch)", None, None, "none", ("fp32", "bf16", "fp8", "int4"),
               "fp32"),
        Target("rtx4090", "GeForce RTX 4090 (Ada)", (8, 9), 24, "tensorrt-rtx",
               ("fp32", "bf16", "fp8", "int4"), "bf16"),
        Target("l40s", "L40S (Ada, datacenter)", (8, 9), 48, "tensorrt", ("fp32", "bf16", "fp8", "int4"), "bf16"),
        Target("h800", "H800 (Hopper)", (9, 0), 80, "tensorrt", ("fp32", "bf16", "fp8", "int4"), "bf16"),
        Target("h100", "H100 (Hopper)", (9, 0), 80, "tensorrt", ("fp32", "bf16", "fp8", "int4"), "bf16"),
        Target("h200", "H200 (Hopper)", (9, 0), 141, "tensorrt", ("fp32", "bf16", "fp8", "int4"), "bf16"),
        Target("rtx5090", "GeForce RTX 5090 (Blackwell)", (12, 0), 32, "tensorrt-rtx",
               ("fp32", "bf16", "fp8", "int4", "nvfp4"), "bf16"),
        Target("b200", "B200 (Blackwell, datacenter)", (10, 0), 180, "tensorrt",
               ("fp32", "bf16", "fp8", "int4", "nvfp4"), "bf16"),
    )
}


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise UserError(f"unknown target {name!r}; choose one of: {', '.join(TARGETS)}") from None
