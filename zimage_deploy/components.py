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


def loader_of(component: str) -> str:
    """The loader (models/load.py LOADERS key) whose model serves `component`."""
    return LOADER_OF.get(component, component)
