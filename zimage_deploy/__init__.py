"""zimage-deploy: export Z-Image models to ONNX, build engines, and run them fast."""

__version__ = "0.1.0"
