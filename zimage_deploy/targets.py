"""Deployment targets, declared once: GPU architecture, memory, TensorRT flavour, precisions."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError

PRECISIONS = ("fp32", "bf16", "fp8", "int4", "nvfp4")

# Per-component precision for each requested precision. Quantized schemes touch the DiT (and, for
# INT4, the text encoder); the VAE stays BF16, and everything is float32 for the CPU reference.
ALL_COMPONENTS = ("text_encoder", "context_refiner", "siglip_refiner", "transformer", "vae_decoder", "vae_encoder",
                  "vision_encoder")


def _plan(default: str, **overrides: str) -> dict[str, str]:
    return {c: overrides.get(c, default) for c in ALL_COMPONENTS}


PRECISION_PLANS: dict[str, dict[str, str]] = {
    "fp32": _plan("fp32"),
    "bf16": _plan("bf16"),
    "fp8": _plan("bf16", transformer="fp8"),
    "int4": _plan("bf16", transformer="int4", text_encoder="int4"),
    "nvfp4": _plan("bf16", transformer="nvfp4", text_encoder="int4"),
}

# Precisions whose graphs need the quantize stage (not part of this build yet).
QUANTIZED = ("fp8", "int4", "nvfp4")


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
        Target("cpu", "CPU reference (ONNX Runtime / Torch)", None, None, "none", ("fp32", "bf16"), "fp32"),
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
