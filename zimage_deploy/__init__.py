"""zimage-deploy: export Z-Image models to ONNX, build engines, and run them fast."""

__version__ = "0.1.0"


def __getattr__(name):  # the runtime API without importing torch for every CLI
    if name in ("ZImageRuntime", "GenerationResult"):
        from .runtime import api

        return getattr(api, name)
    raise AttributeError(name)
