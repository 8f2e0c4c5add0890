"""Deployment targets, declared once: GPU architecture, memory, TensorRT flavour, precisions, datasheet peaks."""

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

# What the tensor cores of each architecture run (INT4 is weight-only, W4A16: BF16 math, so every GPU runs it):
# FP8 needs Ada (SM89) or later, FP4 Blackwell (SM100 / SM120).
AMPERE = ("fp32", "bf16", "int4")
ADA_HOPPER = ("fp32", "bf16", "fp8", "int4")
BLACKWELL = ("fp32", "bf16", "fp8", "int4", "nvfp4")
MISSING = {"fp8": "has no FP8 tensor cores (Ada, SM89, and later have them)",
           "nvfp4": "has no FP4 tensor cores (Blackwell only: SM100 / SM120)"}


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


PCIE4_X16, PCIE5_X16 = 31.5, 63.0


@dataclass(frozen=True)
class Peaks:
    """Datasheet dense tensor-core peaks (TFLOP/s, no sparsity) and memory bandwidth (GB/s), for the planner's
    floor latency. `bf16`: BF16 with FP32 accumulation (GeForce cards run it at half their FP16-accumulate rate,
    workstation and datacenter cards at full rate); `fp8` and `nvfp4` as marketed (GeForce: FP16-accumulate
    rates); None where the hardware has no such tensor cores. GeForce figures follow from tensor cores x boost
    clock x 256 FLOP/clock (FP16-accumulate), which reproduces NVIDIA's published numbers. Approximate vendor
    figures: a floor, not a prediction."""
    bf16: float
    bandwidth: float
    fp8: float | None = None
    nvfp4: float | None = None
    pcie: float = PCIE4_X16  # host link, GB/s one way (what low-VRAM reloads and weight streaming cross)

    def tflops(self, math: str) -> float:
        """The peak for a GEMM's math ("bf16", "fp8", "nvfp4"); BF16 where the hardware lacks it."""
        return getattr(self, math, None) or self.bf16


def _geforce(tensor_cores: int, boost_ghz: float, bandwidth: float, fp8: bool = True, fp4: bool = False,
             pcie: float = PCIE4_X16) -> Peaks:
    fp16_acc = tensor_cores * boost_ghz * 256 / 1000  # TFLOP/s, dense
    return Peaks(bf16=round(fp16_acc / 2, 1), bandwidth=bandwidth, fp8=round(2 * fp16_acc, 1) if fp8 else None,
                 nvfp4=round(4 * fp16_acc, 1) if fp4 else None, pcie=pcie)


def _blackwell(tensor_cores: int, boost_ghz: float, bandwidth: float, pcie: float = PCIE5_X16) -> Peaks:
    return _geforce(tensor_cores, boost_ghz, bandwidth, fp4=True, pcie=pcie)


def _ampere(tensor_cores: int, boost_ghz: float, bandwidth: float) -> Peaks:
    return _geforce(tensor_cores, boost_ghz, bandwidth, fp8=False)


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    compute_capability: tuple[int, int] | None  # None: CPU
    memory_gib: int | None
    flavour: str  # "tensorrt-rtx", "tensorrt" or "none" (CPU: ONNX Runtime)
    precisions: tuple[str, ...]
    default_precision: str
    peaks: Peaks | None = None  # None: CPU
    default_text_encoder: str | None = None  # with the default precision: the text encoder's (None: the precision's)

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

    def text_encoder_for(self, precision: str | None, asked: str | None) -> str | None:
        """The text encoder's precision: as asked, else (no precision asked either: the target's default one) the
        target's default text encoder; None: the precision's own."""
        return asked if asked is not None or precision is not None else self.default_text_encoder

    def check_precision(self, precision: str) -> None:
        if precision not in PRECISIONS:
            raise UserError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
        if precision not in self.precisions:
            why = f": {self.sm} {MISSING[precision]}" if self.sm and precision in MISSING else ""
            raise UserError(
                f"precision {precision!r} is not supported on target {self.name!r} ({self.description}){why}; "
                f"it supports: {', '.join(self.precisions)}"
            )


# FP8 on a 12-16 GB card: with an INT4 text encoder everything stays resident at 1024² (BF16's does not)
FP8_INT4_TEXT = ("fp8", "int4")


def _rtx(name, description, cc, memory, precisions, default, peaks) -> Target:
    """`default`: the precision, or (precision, text encoder precision)."""
    default, text_encoder = (default, None) if isinstance(default, str) else default
    return Target(name, description, cc, memory, "tensorrt-rtx", precisions, default, peaks, text_encoder)


ADA, HOPPER, SM120, AMPERE_SM = (8, 9), (9, 0), (12, 0), (8, 6)

# Default precisions: the best quality that keeps every engine resident at 1024² (tests/test_targets.py checks it
# with the planner): BF16 from 24 GB; FP8 with an INT4 text encoder on 12 and 16 GB Ada / Blackwell; INT4 (W4A16)
# on Ampere below 24 GB.
TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("cpu", "CPU reference (ONNX Runtime / Torch)", None, None, "none", ("fp32", "bf16", "fp8", "int4"),
               "fp32"),
        # Ada (SM89), TensorRT-RTX
        _rtx("rtx4090", "GeForce RTX 4090 (Ada)", ADA, 24, ADA_HOPPER, "bf16", Peaks(165.2, 1008, fp8=660.6)),
        _rtx("rtx4080super", "GeForce RTX 4080 SUPER (Ada)", ADA, 16, ADA_HOPPER, FP8_INT4_TEXT,
             _geforce(320, 2.55, 736)),
        _rtx("rtx4080", "GeForce RTX 4080 (Ada)", ADA, 16, ADA_HOPPER, FP8_INT4_TEXT,
             _geforce(304, 2.505, 716.8)),
        _rtx("rtx4070tisuper", "GeForce RTX 4070 Ti SUPER (Ada)", ADA, 16, ADA_HOPPER, FP8_INT4_TEXT,
             _geforce(264, 2.61, 672)),
        _rtx("rtx4060ti16", "GeForce RTX 4060 Ti 16 GB (Ada)", ADA, 16, ADA_HOPPER, FP8_INT4_TEXT,
             _geforce(136, 2.535, 288, pcie=PCIE4_X16 / 2)),  # PCIe 4.0 x8
        _rtx("rtx4070super", "GeForce RTX 4070 SUPER (Ada)", ADA, 12, ADA_HOPPER, FP8_INT4_TEXT,
             _geforce(224, 2.475, 504.2)),
        _rtx("rtx4070", "GeForce RTX 4070 (Ada)", ADA, 12, ADA_HOPPER, FP8_INT4_TEXT,
             _geforce(184, 2.475, 504.2)),
        _rtx("rtx6000ada", "RTX 6000 Ada Generation (workstation)", ADA, 48, ADA_HOPPER, "bf16",
             Peaks(364.2, 960, fp8=728.5)),
        Target("l40s", "L40S (Ada, datacenter)", ADA, 48, "tensorrt", ADA_HOPPER, "bf16",
               Peaks(362.1, 864, fp8=733.0)),
        # Hopper (SM90), TensorRT
        Target("h800", "H800 (Hopper)", HOPPER, 80, "tensorrt", ADA_HOPPER, "bf16",
               Peaks(989.4, 3350, fp8=1978.9, pcie=PCIE5_X16)),
        Target("h100", "H100 (Hopper)", HOPPER, 80, "tensorrt", ADA_HOPPER, "bf16",
               Peaks(989.4, 3350, fp8=1978.9, pcie=PCIE5_X16)),
        Target("h200", "H200 (Hopper)", HOPPER, 141, "tensorrt", ADA_HOPPER, "bf16",
               Peaks(989.4, 4800, fp8=1978.9, pcie=PCIE5_X16)),
        # Blackwell (SM120 GeForce / workstation, TensorRT-RTX; SM100 datacenter, TensorRT)
        _rtx("rtx5090", "GeForce RTX 5090 (Blackwell)", SM120, 32, BLACKWELL, "bf16",
             Peaks(209.5, 1792, fp8=838.4, nvfp4=1676.0, pcie=PCIE5_X16)),
        _rtx("rtx5080", "GeForce RTX 5080 (Blackwell)", SM120, 16, BLACKWELL, FP8_INT4_TEXT,
             _blackwell(336, 2.617, 960)),
        _rtx("rtx5070ti", "GeForce RTX 5070 Ti (Blackwell)", SM120, 16, BLACKWELL, FP8_INT4_TEXT,
             _blackwell(280, 2.452, 896)),
        _rtx("rtx5060ti16", "GeForce RTX 5060 Ti 16 GB (Blackwell)", SM120, 16, BLACKWELL, FP8_INT4_TEXT,
             _blackwell(144, 2.572, 448, pcie=PCIE5_X16 / 2)),  # PCIe 5.0 x8
        _rtx("rtx5070", "GeForce RTX 5070 (Blackwell)", SM120, 12, BLACKWELL, FP8_INT4_TEXT,
             _blackwell(192, 2.512, 672)),
        _rtx("rtxpro6000", "RTX PRO 6000 Blackwell (workstation)", SM120, 96, BLACKWELL, "bf16",
             Peaks(503.8, 1792, fp8=1007.6, nvfp4=2015.2, pcie=PCIE5_X16)),
        Target("b200", "B200 (Blackwell, datacenter)", (10, 0), 180, "tensorrt", BLACKWELL, "bf16",
               Peaks(2250.0, 8000, fp8=4500.0, nvfp4=9000.0, pcie=PCIE5_X16)),
        # Ampere (SM86), TensorRT-RTX: no FP8 / FP4 tensor cores
        _rtx("rtx3090", "GeForce RTX 3090 (Ampere)", AMPERE_SM, 24, AMPERE, "bf16", _ampere(328, 1.695, 936)),
        _rtx("rtx3080", "GeForce RTX 3080 10 GB (Ampere)", AMPERE_SM, 10, AMPERE, "int4", _ampere(272, 1.71, 760)),
        _rtx("rtx3060", "GeForce RTX 3060 12 GB (Ampere)", AMPERE_SM, 12, AMPERE, "int4",
             _ampere(112, 1.777, 360)),
    )
}


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise UserError(f"unknown target {name!r}; choose one of: {', '.join(TARGETS)}") from None
