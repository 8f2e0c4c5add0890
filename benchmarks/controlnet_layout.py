"""Where the ControlNet branch lives, measured: its own per-step graph (`controlnet` -> hints -> a transformer graph
taking the hints: what the build exports) or inside the per-step transformer graph (one fused graph).

For each config, ONNX Runtime (CPU, float32) runs one denoising step at a fixed size, after a warm-up:
- plain: the plain transformer graph (no ControlNet), the floor;
- separate: the controlnet graph, then the hinted transformer graph (hints handed over as arrays, as the runtime does);
- fused: one graph computing the hints and the step (the same Torch code composed, exported once).
Both ControlNet kinds matter: with control-refiner hints (Union 2.1) the ControlNet's noise-refiner pass differs
from the transformer's (diffusers runs it twice), without (Union 1.0) the two are the same computation, which a
fused graph may share (ONNX Runtime's common-subexpression elimination sees identical nodes on identical weights).

    python benchmarks/controlnet_layout.py --config tiny --report benchmarks/reports/controlnet-layout-tiny.json
    python benchmarks/controlnet_layout.py --config real-width --repeats 3 ...
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from zimage_deploy.export.onnx_export import export_component
from zimage_deploy.models.controlnet import ControlNetConfig, attach, control_hints
from zimage_deploy.models.dit import DiTConfig, ZImageDiT

CONFIGS = {
    # the embedded tiny model's DiT
    "tiny": dict(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, cap_feat_dim=32, axes_dims=(8, 12, 12),
                 axes_lens=(1024, 128, 128)),
    # the real width (3840, 30 heads x 128, SwiGLU 10240) and refiner depth (2), one main layer (memory: every graph
    # of one ControlNet kind holds 3-6 real-width blocks, 0.7 GB each in float32)
    "real-width": dict(dim=3840, n_layers=1, n_refiner_layers=2, n_heads=30, cap_feat_dim=64),
}
KINDS = {
    "union-2.1": dict(add_control_noise_refiner="control_noise_refiner", control_in_dim=33),
    "union-1.0": dict(add_control_noise_refiner=None, control_in_dim=16),
}


class Fused(nn.Module):
    """One graph: every hint of the step, then the step taking them."""

    def __init__(self, dit):
        super().__init__()
        self.dit = dit

    def forward(self, latents, timestep, cap_states, cap_lens, control, scale):
        hints = control_hints(self.dit, latents, timestep, cap_states, cap_lens, control, scale)
        return self.dit(latents, timestep, cap_states, cap_lens, hints)


def random_(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5 if p.ndim >= 2 else 0.1)
                    + (1.0 if p.ndim == 1 and p.numel() > 1 else 0.0))
    return module


def export_fused(model: nn.Module, sample: tuple, folder: Path) -> Path:
    """As export/onnx_export.py exports (weights as named inputs, then attached one at a time, external data above
    512 MiB), for a module no spec describes."""
    import onnx

    from zimage_deploy.export.weights import attach_weights, module_weights

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    names = ["latents", "timestep", "cap_states", "cap_lens", "control", "scale"]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, sample, str(path), dynamo=False, opset_version=19, input_names=names,
                          output_names=["noise_pred"], export_params=False, do_constant_folding=False,
                          keep_initializers_as_inputs=True)
    graph = onnx.load(str(path))
    attach_weights(graph, set(names) | {"noise_pred"}, (("dit." + k, v) for k, v in module_weights(model.dit)),
                   folder, strip_prefix="dit.")
    onnx.save_model(graph, str(path))
    return path


def session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def measure(config: str, kind: str, side: int, cap: int, repeats: int, work: Path) -> dict:
    dcfg = DiTConfig(**CONFIGS[config])
    n = dcfg.n_layers
    cn = ControlNetConfig(control_layers_places=tuple(range(n)),
                          control_refiner_layers_places=tuple(range(dcfg.n_refiner_layers)) if KINDS[kind][
                              "add_control_noise_refiner"] else (),
                          dim=dcfg.dim, n_refiner_layers=dcfg.n_refiner_layers, n_heads=dcfg.n_heads, **KINDS[kind])
    facts = {"latent_channels": 16, "dim": dcfg.dim, "cap_feat_dim": dcfg.cap_feat_dim, "n_hints": cn.n_hints,
             "control_in_dim": cn.control_in_dim, "patch_size": 2, "patch_dim": 64, "vocab_size": 8}
    plain_facts = {k: v for k, v in facts.items() if k not in ("n_hints", "control_in_dim")}
    folder = work / f"{config}-{kind}"
    h = w = side // 8
    g = torch.Generator().manual_seed(0)
    lens = torch.tensor([cap])
    inputs = dict(latents=torch.randn(1, 16, h, w, generator=g), timestep=torch.tensor([0.4]),
                  cap_states=torch.randn(1, cap, dcfg.dim, generator=g), cap_lens=lens,
                  control=torch.randn(1, cn.control_in_dim, h, w, generator=g), scale=torch.tensor([0.75]))
    sizes = {}
    with torch.device("meta"):
        dit = ZImageDiT(dcfg)
    dit = dit.to_empty(device="cpu")
    from zimage_deploy.models.load import _restore_buffers

    _restore_buffers(dit, dcfg)
    del dit.context_refiner  # not in any per-step graph
    random_(dit, 1)
    t0 = time.perf_counter()
    entry = export_component("transformer", dit, plain_facts, torch.float32, folder / "plain")
    sizes["plain"] = entry["bytes"]
    attach(dit, cn)
    random_(dit.control, 2)
    random_(dit.layers, 3)
    from zimage_deploy.models.controlnet import hint_buffers

    for k, layer in enumerate(dit.layers):
        buf = dict(hint_buffers(cn, n))
        layer.hint_slot, layer.hint_on = buf[f"layers.{k}.hint_slot"], buf[f"layers.{k}.hint_on"]
    for name in ("controlnet", "transformer"):
        entry = export_component(name, dit, facts, torch.float32, folder / "separate")
        sizes[f"separate/{name}"] = entry["bytes"]
    fused_path = export_fused(Fused(dit).eval(), tuple(inputs.values()), folder / "fused" / "graph")
    sizes["fused"] = sum(p.stat().st_size for p in fused_path.parent.iterdir())
    export_seconds = time.perf_counter() - t0
    with torch.no_grad():  # the three layouts compute the same step
        ref = dit(*[inputs[k] for k in ("latents", "timestep", "cap_states", "cap_lens")],
                  control_hints(dit, *inputs.values())).numpy()
    del dit
    gc.collect()

    feeds = {k: v.numpy() for k, v in inputs.items()}
    step = {k: feeds[k] for k in ("latents", "timestep", "cap_states", "cap_lens")}
    rows = {}

    def alone(path, inputs):  # one session in memory at a time (the real-width graphs are several GB each)
        s = session(path)
        out = s.run(None, inputs)[0]
        times = timed(lambda: s.run(None, inputs), repeats)
        del s
        gc.collect()
        return out, times

    _, rows["plain"] = alone(folder / "plain" / "transformer" / "model.onnx", step)
    hints, rows["controlnet graph"] = alone(folder / "separate" / "controlnet" / "model.onnx", feeds)
    got_sep, rows["hinted transformer graph"] = alone(folder / "separate" / "transformer" / "model.onnx",
                                                      {**step, "hints": hints})
    # the separate layout's step: both graphs one after the other, the hints handed over as an array
    rows["separate"] = [a + b for a, b in zip(rows["controlnet graph"], rows["hinted transformer graph"])]
    got_fused, rows["fused"] = alone(fused_path, feeds)
    med = {k: statistics.median(v) for k, v in rows.items()}
    rel = lambda a: float(np.linalg.norm(a - ref) / np.linalg.norm(ref))  # noqa: E731
    return {
        "config": config, "kind": kind, "controlnet": cn.as_dict(), "size": [side, side], "caption_tokens": cap,
        "seconds_per_step": {k: {"median": round(v, 5), "all": [round(x, 5) for x in rows[k]]} for k, v in med.items()},
        "hints_bytes": int(hints.nbytes),
        "separate_over_fused": round(med["separate"] / med["fused"], 3),
        "control_cost_over_plain": {"separate": round(med["separate"] / med["plain"] - 1, 3),
                                    "fused": round(med["fused"] / med["plain"] - 1, 3)},
        "graph_bytes": sizes, "export_seconds": round(export_seconds, 1),
        "rel_l2_vs_torch": {"separate": rel(got_sep), "fused": rel(got_fused)},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--side", type=int, default=256)
    ap.add_argument("--cap", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (ONNX Runtime uses its default)")
    ap.add_argument("--report", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import onnxruntime

    results = []
    with tempfile.TemporaryDirectory(prefix="cn-layout-") as work:
        for kind in args.kinds.split(","):
            results.append(measure(args.config, kind, args.side, args.cap, args.repeats, Path(work)))
            print(json.dumps(results[-1]["seconds_per_step"]), flush=True)
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "load_average_at_end": os.getloadavg()},
              "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
              "date": time.strftime("%Y-%m-%d"), "results": results}
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
