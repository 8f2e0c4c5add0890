"""Build one engine per component from the exported ONNX graphs; one code path for both flavours.

Networks are strongly typed (precision comes from the graph: BF16 tensors, Q/DQ nodes). TensorRT-RTX engines
are compiled ahead of time for the target's compute capability; TensorRT builds for the GPU it runs on and
so refuses a machine whose GPU is not the target's. Plans are written under a temp name and renamed.

TensorRT (datacenter): 10.13 or newer (the streamed serialization and the parser's initializer API this builder
uses arrive there), checked before any work; `--refittable` is refused on 11.3 (NVIDIA documents that REFIT may drop
a GEMM bias there, and the DiT's Linears have biases); the timing cache is persisted per version and GPU model, and
the GPU model is recorded in the manifest. TensorRT-RTX: no timing cache (it has no effect there); static builds
set REQUIRE_USER_ALLOCATION, which TensorRT-RTX needs for the CUDA-graph capture the runtime does with them.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path

from ..errors import UserError
from ..fsutil import atomic_file
from ..hashing import file_sha256
from ..manifest import Engine
from ..paths import cache_dir
from .flavour import check_version, import_trt, version
from .profiles import EngineOptions

RECIPE = 2  # how engines are built from their inputs (2: static builds fix the caption length, RTX capture flag)


def engine_key(onnx_sha: str, flavour: str, trt_version: str, sm: str, profile: dict, opts: EngineOptions,
               gpu: str | None = None) -> str:
    payload = json.dumps([onnx_sha, flavour, trt_version, sm, profile, opts.as_dict(), gpu, RECIPE], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _has_cuda() -> bool:
    return device_capability() is not None


def device_capability() -> tuple[int, int] | None:
    try:
        import torch

        return tuple(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None
    except Exception:
        return None


def device_name() -> str | None:
    """The visible GPU's model name (`NVIDIA H100 80GB HBM3`), or None."""
    if device_capability() is None:
        return None
    try:
        import torch

        return torch.cuda.get_device_name()
    except Exception:
        return None


def release_torch_memory() -> None:
    """Give back what torch's caching allocator holds (calibration, the quality gate) before TensorRT builds."""
    import gc

    gc.collect()
    if _has_cuda():
        import torch

        torch.cuda.empty_cache()


def check_build_machine(target, trt) -> None:
    """TensorRT (not -RTX) builds for the GPU present: it must be the target's architecture."""
    if target.flavour != "tensorrt":
        return
    cc = device_capability()
    if cc != tuple(target.compute_capability):
        raise UserError(f"TensorRT builds engines for the GPU it runs on: target {target.name} needs a "
                        f"{target.sm} GPU, this machine has {'none' if cc is None else 'SM%d%d' % cc}")


class EngineBuilder:
    def __init__(self, target, opts: EngineOptions):
        self.target, self.opts = target, opts
        self.trt = import_trt(target.flavour)
        self.version = version(self.trt)
        check_version(target.flavour, self.trt)
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        check_build_machine(target, self.trt)
        if target.flavour == "tensorrt" and opts.refittable and self.version.startswith("11.3."):
            raise UserError(f"--refittable is refused with TensorRT {self.version}: NVIDIA documents that REFIT "
                            "engines of TensorRT 11.3 may drop a GEMM bias (treated as zero), and the DiT's Linears "
                            "have biases; build without --refittable or with another TensorRT version")
        self.gpu = device_name() if target.flavour == "tensorrt" else None  # the GPU the plans are tuned on
        gpu_key = "".join(c if c.isalnum() else "-" for c in self.gpu or "")
        self.cache_path = cache_dir() / "timing" / f"{target.flavour}-{self.version}-{target.sm}-{gpu_key}.cache"
        # tactic timing needs a GPU, and TensorRT-RTX ignores the timing cache (deprecated there)
        self.use_timing_cache = _has_cuda() and target.flavour == "tensorrt"
        # TensorRT-RTX 1.7 fails to build refittable or weightless plans ahead of time without a GPU (Myelin's
        # JIT asks CUDA); say so before anything is written
        if not _has_cuda() and (opts.refittable or opts.strip_weights == "on"):
            raise UserError("refittable (--refittable) and weightless (--strip-weights on) engines need a GPU "
                            f"at build time: {target.flavour} {self.version} cannot build them ahead of time on a "
                            "machine without one")

    def strips(self, external_data: bool) -> bool:
        """Weightless plan for this graph? `auto` strips large graphs where a TensorRT-RTX builder can (a GPU is
        present); datacenter builds keep the weights in the plans (no refit at every start)."""
        if self.opts.strip_weights == "auto" and (not _has_cuda() or self.target.flavour == "tensorrt"):
            return False
        return self.opts.strips(external_data)

    def key(self, onnx_sha: str, profile: dict, branch: bool = False) -> str:
        """`branch`: the engine carries the LoRA branch (the LoRA bounds are part of its key, not of the others')."""
        opts = self.opts if branch else replace(self.opts, lora_bounds=None)
        return engine_key(onnx_sha, self.target.flavour, self.version, self.target.sm, profile, opts, self.gpu)

    def build(self, onnx_path: Path, profile: dict, plan_path: Path, strip: bool = False) -> Engine:
        """Build `onnx_path` into `plan_path`; return the engine's manifest entry (without the key). `strip`: a
        weightless plan (STRIP_PLAN), refitted from `onnx_path` when it loads."""
        trt = self.trt
        t0 = time.perf_counter()
        builder = trt.Builder(self.logger)
        flags = 0
        if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self.logger)
        weights = MappedWeights(onnx_path)  # external weights read in place from the page cache, not copied
        try:
            parsed = weights.parse(parser) if weights.external else parser.parse_from_file(str(onnx_path))
        except Exception:
            weights.close()
            raise
        if not parsed:
            weights.close()
            errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
            raise UserError(f"{self.target.flavour} cannot parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        if self.target.flavour == "tensorrt-rtx":
            config.num_compute_capabilities = 1
            config.set_compute_capability(getattr(trt.ComputeCapability, self.target.sm), 0)
        config.builder_optimization_level = self.opts.opt_level
        if self.opts.refittable:
            config.set_flag(trt.BuilderFlag.REFIT)
        if strip:  # identical weights at refit (the graph's own) keep every build-time optimisation
            config.set_flag(trt.BuilderFlag.STRIP_PLAN)
            if not self.opts.refittable:
                config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)
        if self.opts.weight_streaming:
            config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
        cuda_graphs = self.opts.static is not None  # the runtime captures static engines in CUDA graphs
        if cuda_graphs and self.target.flavour == "tensorrt-rtx":
            config.set_flag(trt.BuilderFlag.REQUIRE_USER_ALLOCATION)  # TensorRT-RTX: needed for stream capture
        cache = None
        if self.use_timing_cache:
            cache = config.create_timing_cache(self.cache_path.read_bytes() if self.cache_path.is_file() else b"")
            if not config.set_timing_cache(cache, ignore_mismatch=False):
                cache = config.create_timing_cache(b"")  # another GPU's or version's: start afresh
                if not config.set_timing_cache(cache, ignore_mismatch=False):
                    cache = None
        prof = builder.create_optimization_profile()
        inputs = {network.get_input(i).name for i in range(network.num_inputs)}
        if inputs != set(profile):
            raise UserError(f"{onnx_path} inputs {sorted(inputs)} do not match the profile {sorted(profile)}")
        for name, (lo, opt, hi) in profile.items():
            prof.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(prof)
        with atomic_file(plan_path) as tmp, open(tmp, "wb") as f:
            # streamed to the file as it is serialized: the plan (as large as the weights) is never whole in memory
            writer = _FileWriter(trt, f)
            if not builder.build_serialized_network_to_stream(network, config, writer) or writer.failed \
                    or not writer.written:
                raise RuntimeError(f"{self.target.flavour} failed to build an engine from {onnx_path} "
                                   f"({writer.failed or 'see log above'})")
        del network, parser, builder
        weights.close()
        if cache is not None:
            _write_atomic(self.cache_path, memoryview(cache.serialize()))
        return Engine(plan_sha256=file_sha256(plan_path), bytes=plan_path.stat().st_size,
                      flavour=self.target.flavour, version=self.version,
                      compute_capability=tuple(self.target.compute_capability), gpu=self.gpu,
                      cuda_graphs=cuda_graphs, profile=profile, options=self.opts.as_dict(), stripped=strip,
                      timing_cache=str(self.cache_path) if cache is not None else None,
                      build_seconds=round(time.perf_counter() - t0, 2))


class MappedWeights:
    """A graph's external weights handed to TensorRT's parser as pointers into a read-only memory map of the data
    file (`OnnxParser.load_initializer`), instead of `parse_from_file` reading them into a private copy: the builder
    then holds one private copy of the weights, not two, and the mapped pages are page cache that the kernel can
    drop under memory pressure (a real-size BF16 DiT engine builds within a 16 GiB memory limit this way). The same
    for a weightless engine's refit (`OnnxParserRefitter.load_initializer`, runtime/tensorrt_backend.py)."""

    def __init__(self, onnx_path: Path):
        import onnx

        self.path = Path(onnx_path)
        self.model = onnx.load(str(self.path), load_external_data=False)
        self.inits = [i for i in self.model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
        self.external = bool(self.inits)
        self.maps: dict[str, tuple] = {}

    def parse(self, parser) -> bool:
        return self.load(parser) and parser.parse_model_proto()

    def load(self, parser) -> bool:
        """The graph (without its weights) and a pointer to each external weight, given to an OnnxParser or an
        OnnxParserRefitter (the mappings stay open until `close`)."""
        import mmap

        import numpy as np

        if not parser.load_model_proto(self.model.SerializeToString(), str(self.path)):
            return False
        for init in self.inits:
            info = {e.key: e.value for e in init.external_data}
            location = info["location"]
            if location not in self.maps:
                f = open(self.path.parent / location, "rb")
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                self.maps[location] = (f, m, np.frombuffer(m, dtype=np.uint8))
            base, size = self.maps[location][2].ctypes.data, self.maps[location][2].size  # no array in this frame
            offset, length = int(info.get("offset", 0)), int(info["length"])
            if offset + length > size:
                raise UserError(f"{self.path}: external data of {init.name} lies beyond {location} (truncated?)")
            if not parser.load_initializer(init.name, base + offset, length):
                return False
        self.model = None  # the proto (without weights) is no longer needed
        return True

    def close(self) -> None:
        while self.maps:
            _, (f, m, view) = self.maps.popitem()
            del view  # the last reference to the mapping's buffer, or it cannot close
            m.close()
            f.close()


def _FileWriter(trt, file):
    """A TensorRT stream writer appending each serialized chunk to an open file; `failed` holds the first error
    (TensorRT only logs exceptions raised in the callback and reports success)."""

    class Writer(trt.IStreamWriter):
        def __init__(self):
            trt.IStreamWriter.__init__(self)
            self.written, self.failed = 0, None

        def write(self, data):
            try:
                n = file.write(data)
            except Exception as e:  # noqa: BLE001 - reported after the build
                self.failed = self.failed or e
                return 0
            self.written += n
            return n

    return Writer()


def _write_atomic(path: Path, data) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
