"""The components of a build and the model each is cut from (a leaf: imports nothing of the package).

A component is one graph of the build (one engine, one backend call). Several graphs are cut from one loaded
model: the DiT serves the context refiner, the SigLIP refiner and the transformer (and, with a ControlNet attached,
the `controlnet` hints graph, which shares its embedders and noise refiner)."""

from __future__ import annotations

# every component, in pipeline order (a variant runs a subset: variants.py)
ALL_COMPONENTS = ("text_encoder", "context_refiner", "siglip_refiner", "transformer", "vae_decoder", "vae_encoder",
                  "vision_encoder")
DIT = "transformer"  # the loader (models/load.py LOADERS key) of the DiT's graphs
LOADER_OF = {"context_refiner": DIT, "siglip_refiner": DIT, "controlnet": DIT}
# the repeated main blocks of a component's graph: a memory-lean export traces two of them (models/load.py
# TEMPLATES) and stamps the graph to the real depth
REPEATED_BLOCKS = {"transformer": "layers", "text_encoder": "layers"}
# the stages of low-VRAM mode: engines that run in turn inside one stage are resident together (a ControlNet's
# hints graph beside the transformer: swapping them every step would read both plans from disk each step); every
# other component is a stage of its own (runtime/tensorrt_backend.py evicts by it, plan.py counts memory by it)
STAGE_OF = {"controlnet": "denoise", "transformer": "denoise",
            "lora_branches": "denoise"}  # the planner's run-time LoRA branches on the DiT (plan.py)


def loader_of(component: str) -> str:
    """The loader (models/load.py LOADERS key) whose model serves `component`."""
    return LOADER_OF.get(component, component)


def with_controlnet(components) -> tuple[str, ...]:
    """`components` with a ControlNet's `controlnet` hints graph, run every step just before `transformer`."""
    comps = list(components)
    comps.insert(comps.index("transformer"), "controlnet")
    return tuple(comps)


def with_controlnet_precision(plan: dict[str, str]) -> dict[str, str]:
    """A per-component precision plan with the `controlnet` graph's: the DiT's (same scheme, calibrated in the same
    sampling loop), unless the plan already names one."""
    return {**plan, "controlnet": plan.get("controlnet", plan["transformer"])}


def stage_of(component: str) -> str:
    """The low-VRAM stage `component` runs in."""
    return STAGE_OF.get(component, component)
