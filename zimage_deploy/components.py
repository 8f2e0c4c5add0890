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


def loader_of(component: str) -> str:
    """The loader (models/load.py LOADERS key) whose model serves `component`."""
    return LOADER_OF.get(component, component)
