"""The quantization schemes, one object each (FP8, INT4, NVFP4): what differs between them is here, and the
callers look a scheme up (`get_scheme(name)`) instead of branching on its name.

A scheme owns its block, its element kinds, the round-to-nearest weight range, the modelopt config it calibrates
with, the weight (and activation) quantize-dequantize the emulation applies, the initializers and nodes its Q/DQ
graph gets for one linear layer, and its description. The arithmetic itself is numerics.py's; the walk over a
graph's weights is quantize/qdq.py's, over a module's layers models/emulate.py's, the calibration run
quantize/calibrate.py's.

Q/DQ writing goes through `out`, the per-graph sink qdq.py hands in: `out.add(name, onnx_type, dims, raw)` and
`out.add_tensor(name, tensor, onnx_type)` add initializers, `out.g` is qdq.py's graph (`first` nodes, `insert_before`,
`fp8_qdq`), `out.zero_point` the FP8 zero point's name, `out.torch_dtype(elem)` the Torch dtype of an ONNX type.
"""

from __future__ import annotations

import functools

import torch
from onnx import TensorProto, helper

from .errors import UserError
from .numerics import (E4M3_MAX, INT4_MAX, NVFP4_BLOCK, block_amax, e2m1_codes, fake_fp8, fake_nvfp4, fp8_scale,
                       int4_blocks, nvfp4_blocks, nvfp4_global_scale, tensor_amax, to_fp8)

TRT_DOMAIN = "trt"  # TensorRT's ONNX operators (TRT_FP4DynamicQuantize)


def _pack_nibbles(codes: torch.Tensor) -> bytes:
    """4-bit codes -> ONNX 4-bit tensor bytes (two per byte, the first in the low nibble)."""
    flat = codes.flatten().to(torch.uint8) & 0x0F
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] | (flat[1::2] << 4)).numpy().tobytes()


def pack_int4(q: torch.Tensor) -> bytes:
    """int values in [-8, 7] -> ONNX INT4 bytes."""
    return _pack_nibbles(q.to(torch.int16) & 0x0F)


def pack_e2m1(values: torch.Tensor) -> bytes:
    """E2M1 values -> ONNX FLOAT4E2M1 bytes."""
    return _pack_nibbles(e2m1_codes(values))


class Scheme:
    """The common part: a per-tensor FP8 activation Q/DQ where a scale file brings an activation range, opset 21."""

    name = ""
    weight_kind = ""  # the weight's element kind in the graph
    activation_kind = "FP8"  # what an activation is quantized to where its scale file holds its range
    calibrates_activations = False  # calibration collects activation ranges (and may quantize the attention BMMs)
    needs_scales = False  # a graph cannot be written without calibrated scales (round to nearest impossible)
    opset = 21  # 21: FLOAT8E4M3FN / INT4 blocked DequantizeLinear
    weight_bytes: float  # per weight in the plan's estimates, block scales included
    gemm = "bf16"  # the GEMM's math in the plan's time floors (a field of targets.Peaks)
    onnxruntime_runs = True  # ONNX Runtime has kernels for its graphs (the quality gate can run them on a CPU)
    fp8_matmuls = False  # the compiled Torch runtime runs its layers as FP8 GEMMs (models/fast.py FP8Linear)
    reuses_fp8_files = False  # an FP8 single file's own weight grid can serve as its weights (quantize/reuse.py)

    def __repr__(self) -> str:
        return f"<scheme {self.name}>"

    def block(self, int4_block: int) -> int | None:
        """Input channels per weight scale (None: one scale per tensor); `int4_block`: the build's INT4 block."""
        return None

    def layer_width(self, int4_block: int) -> int:
        """A quantized linear layer's input width must be a multiple of this."""
        return self.block(int4_block) or 1

    def needs_data(self, int4_method: str) -> bool:
        """Whether calibration data (the sampling loop over prompts) is needed."""
        return True

    def weight_amax(self, w: torch.Tensor, block: int) -> torch.Tensor:
        """Round-to-nearest range of a (out, in) weight, as its scale file holds it."""
        return tensor_amax(w)

    def describe(self, calibrated: bool) -> str:
        """The method line of the manifest and the scale file; `calibrated`: scales came from data."""
        raise NotImplementedError

    # -- calibration ------------------------------------------------------------------------------------------

    def modelopt_config(self, layers: list[str], block: int, int4_method: str, attention=()) -> dict:
        """A modelopt config quantizing exactly `layers` (and the BMMs of the `attention` modules, FP8)."""
        raise NotImplementedError

    def collected_weight_amax(self, amax: torch.Tensor, out_features: int, in_features: int, block: int):
        """modelopt's weight range, shaped as the scale file holds it."""
        return amax.reshape(())

    # -- emulation --------------------------------------------------------------------------------------------

    def fake_weight(self, wf: torch.Tensor, amax: torch.Tensor, dtype: torch.dtype, block: int) -> torch.Tensor:
        """Quantize-dequantize of the float32 weight `wf` (AWQ's division done) as the graph's DequantizeLinear
        computes it; `dtype`: the weight's dtype."""
        raise NotImplementedError

    def fake_activation(self, amax: torch.Tensor):
        """x -> the activation's quantize-dequantize, as the graph computes it before the MatMul."""
        return functools.partial(fake_fp8, scale=fp8_scale(amax))

    # -- Q/DQ graph -------------------------------------------------------------------------------------------

    def write_weight(self, out, weight: str, w: torch.Tensor, amax: torch.Tensor | None, block: int,
                     elem: int) -> torch.Tensor:
        """Initializers and DequantizeLinear nodes replacing initializer `weight` (the float32 weight `w`, AWQ's
        division done; `amax`: its calibrated range or None, round to nearest; `elem`: the graph's dtype).
        Returns the weight_amax the scale file records."""
        raise NotImplementedError

    def written_weight_amax(self, amax: torch.Tensor) -> torch.Tensor:
        """The weight_amax the scale file records for a calibrated `amax` (what `write_weight` returns for it): the
        range its stored scale stands for."""
        return amax

    def write_activation(self, out, layer: str, matmul, amax: torch.Tensor, elem: int) -> None:
        """Quantize the activation of `matmul` (its input 0) with the calibrated range `amax`."""
        out.add_tensor(f"{layer}.input_scale", fp8_scale(amax), elem)
        out.g.fp8_qdq(matmul, 0, f"{layer}.input_scale", out.zero_point)

    def finish_model(self, model) -> None:
        """The opsets (and IR version) the written graph needs."""
        for op in model.opset_import:
            if op.domain in ("", "ai.onnx") and op.version < self.opset:
                op.version = self.opset


class FP8(Scheme):
    name = "fp8"
    weight_kind = "FP8"
    calibrates_activations = True
    fp8_matmuls = True
    reuses_fp8_files = True
    weight_bytes = 1.0
    gemm = "fp8"

    def describe(self, calibrated: bool) -> str:
        return "max calibration, per-tensor weights and activations (W8A8)"

    def modelopt_config(self, layers, block, int4_method, attention=()) -> dict:
        return _max_config(layers, attention)

    def fake_weight(self, wf, amax, dtype, block):
        s = fp8_scale(amax)
        return to_fp8(wf, s).float() * s

    def write_weight(self, out, weight, w, amax, block, elem):
        scale = fp8_scale(self.weight_amax(w, block) if amax is None else amax)
        out.add(weight + "_q", TensorProto.FLOAT8E4M3FN, list(w.shape),
                to_fp8(w, scale).view(torch.uint8).numpy().tobytes())
        out.add_tensor(weight + "_scale", scale, elem)
        out.g.first.append(helper.make_node("DequantizeLinear", [weight + "_q", weight + "_scale"], [weight],
                                            name=f"/quant/{weight}/DequantizeLinear"))
        return scale.float() * E4M3_MAX

    def written_weight_amax(self, amax):
        return fp8_scale(amax).float() * E4M3_MAX


class INT4(Scheme):
    name = "int4"
    weight_kind = "INT4"
    weight_bytes = 0.5 + 2 / 128  # a 16-bit scale per block of 128 (W4A16: the GEMM in the graph's dtype)

    def block(self, int4_block):
        return int4_block

    def needs_data(self, int4_method):
        return int4_method == "awq"

    def weight_amax(self, w, block):
        return block_amax(w, block)

    def describe(self, calibrated):
        return "AWQ (modelopt awq_lite), W4A16" if calibrated else "round to nearest, W4A16"

    def modelopt_config(self, layers, block, int4_method, attention=()) -> dict:
        fmt = {"num_bits": 4, "block_sizes": {-1: block, "type": "static"}}
        per_layer = [{"quantizer_name": f"{n}.weight_quantizer", "cfg": fmt} for n in layers]
        return {"quant_cfg": [{"quantizer_name": "*", "enable": False}, *per_layer],
                "algorithm": "awq_lite" if int4_method == "awq" else "max"}

    def collected_weight_amax(self, amax, out_features, in_features, block):
        return amax.reshape(out_features, in_features // block)

    def fake_weight(self, wf, amax, dtype, block):
        q, s = int4_blocks(wf, block, amax)
        return (q.reshape(*s.shape, block) * s[..., None]).reshape(wf.shape)

    def write_weight(self, out, weight, w, amax, block, elem):
        q, scale = int4_blocks(w, block, amax)
        out.add(weight + "_q", TensorProto.INT4, list(w.shape), pack_int4(q))
        out.add_tensor(weight + "_scale", scale, elem)
        out.g.first.append(helper.make_node("DequantizeLinear", [weight + "_q", weight + "_scale"], [weight],
                                            name=f"/quant/{weight}/DequantizeLinear", axis=1, block_size=block))
        return scale.float() * INT4_MAX


class NVFP4(Scheme):
    """W4A4 (Blackwell): FP4 values in blocks of 16 with FP8 block scales under one float32 global scale per tensor;
    activations quantized per block at run time (TensorRT's dynamic FP4 quantization, calibrated global scale)."""

    name = "nvfp4"
    weight_kind = "FP4"
    activation_kind = "FP4"
    weight_bytes = 0.5 + 1 / 16  # an FP8 scale per block of 16
    gemm = "nvfp4"
    calibrates_activations = True
    needs_scales = True
    opset = 23  # FLOAT4E2M1
    onnxruntime_runs = False  # no FP4 kernels: its graphs are checked through the emulation and TensorRT's parser

    def block(self, int4_block):
        return NVFP4_BLOCK

    def describe(self, calibrated):
        return ("NVFP4 W4A4: weights in FP4 blocks of 16 with FP8 block scales and a per-tensor global scale; "
                "activations quantized per block at run time, global scale from max calibration")

    def modelopt_config(self, layers, block, int4_method, attention=()) -> dict:
        """Calibrated as FP8 is: max calibration, per tensor. The block scales are computed from the data (weights
        when the graph is written, activations by TensorRT at run time), so what calibration must find are the
        per-tensor ranges behind the global scales, and modelopt's max calibration collects them without
        quantizing. (modelopt's own NVFP4 mode fake-quantizes through CUDA/Triton kernels; this runs anywhere.)"""
        return _max_config(layers, attention)

    def fake_weight(self, wf, amax, dtype, block):
        return nvfp4_blocks(wf, nvfp4_global_scale(amax), dtype)[2]

    def fake_activation(self, amax):
        return functools.partial(fake_nvfp4, global_scale=nvfp4_global_scale(amax))

    def write_weight(self, out, weight, w, amax, block, elem):
        amax = tensor_amax(w)  # the global scale is per tensor: the weight's own range
        gscale = nvfp4_global_scale(amax)
        q, s8, _ = nvfp4_blocks(w, gscale, out.torch_dtype(elem))
        out.add(weight + "_q", TensorProto.FLOAT4E2M1, list(w.shape), pack_e2m1(q))
        out.add(weight + "_scale", TensorProto.FLOAT8E4M3FN, list(s8.shape), s8.view(torch.uint8).numpy().tobytes())
        out.add_tensor(weight + "_global", gscale, TensorProto.FLOAT)
        out.g.first.extend(two_level_dq(weight + "_q", weight + "_scale", weight + "_global", weight, elem, 1,
                                        f"/quant/{weight}"))
        return amax

    def write_activation(self, out, layer, matmul, amax, elem):
        out.add_tensor(f"{layer}.input_global", nvfp4_global_scale(amax), TensorProto.FLOAT)
        global_name = f"{layer}.input_global"
        value, tag, prefix = matmul.input[0], f"{global_name}.{matmul.name}", f"/quant{matmul.name}/0"
        out.g.insert_before(matmul, helper.make_node(
            "TRT_FP4DynamicQuantize", [value, global_name], [tag + "_f4", tag + "_s8"], domain=TRT_DOMAIN,
            name=prefix + "/TRT_FP4DynamicQuantize", axis=-1, block_size=NVFP4_BLOCK,
            scale_type=TensorProto.FLOAT8E4M3FN))
        for n in two_level_dq(tag + "_f4", tag + "_s8", global_name, tag + "_dq", elem, -1, prefix):
            out.g.insert_before(matmul, n)
        matmul.input[0] = tag + "_dq"

    def finish_model(self, model):
        super().finish_model(model)
        model.opset_import.append(helper.make_opsetid(TRT_DOMAIN, 1))
        model.ir_version = max(model.ir_version, 11)  # FLOAT4E2M1


def _max_config(layers, attention) -> dict:
    """modelopt max calibration, per tensor, of the weights and activations of `layers` and the BMMs' inputs."""
    fmt = {"num_bits": (4, 3), "axis": None}
    per_layer = [{"quantizer_name": f"{n}.weight_quantizer", "cfg": fmt} for n in layers]
    per_layer += [{"quantizer_name": f"{n}.input_quantizer", "cfg": fmt} for n in layers]
    per_layer += [{"quantizer_name": f"{n}.{x}_bmm_quantizer", "cfg": fmt} for n in attention for x in "qkv"]
    return {"quant_cfg": [{"quantizer_name": "*", "enable": False}, *per_layer], "algorithm": "max"}


def two_level_dq(values: str, block_scales: str, global_scale: str, out: str, elem: int, axis: int, prefix: str):
    """NVFP4 dequantization: FP8 block scales x global scale (float32), cast to the graph's dtype, then the blocked
    DequantizeLinear of the FP4 values."""
    nodes = [helper.make_node("DequantizeLinear", [block_scales, global_scale], [block_scales + "_f"],
                              name=prefix + "/ScaleDequantizeLinear")]
    scale = block_scales + "_f"
    if elem != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [scale], [block_scales + "_c"], to=elem, name=prefix + "/ScaleCast"))
        scale = block_scales + "_c"
    nodes.append(helper.make_node("DequantizeLinear", [values, scale], [out], axis=axis, block_size=NVFP4_BLOCK,
                                  name=prefix + "/DequantizeLinear"))
    return nodes


SCHEMES: dict[str, Scheme] = {s.name: s for s in (INT4(), FP8(), NVFP4())}  # qdq's CLI order: int4 first


def get_scheme(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise UserError(f"unknown quantization scheme {name!r}; choose one of {tuple(SCHEMES)}") from None
