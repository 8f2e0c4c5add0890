"""LoRAs for Z-Image's DiT: fused at build time, swapped at run time.

- spec.py: `PATH[:SCALE]` arguments, folders holding one file, names inside a configured folder (servers);
- targets.py: the adaptable weights and their names in every LoRA format;
- formats.py: reading diffusers/PEFT, kohya and original-repository LoRA files into low-rank factors;
- fuse.py: build-time fusion into the DiT's weight stream (`build --lora`), manifest records;
- runtime.py: run-time sets per generation (`generate --lora`, `ZImageRuntime.generate(loras=...)`) over
  adapters.py (Torch: side branches beside each linear layer, models/lora_branch.py), onnx_branch.py (ONNX Runtime:
  the same branch in the graph, factors fed per run), tensorrt.py (refit); on float and quantized builds (TensorRT:
  float builds only).
"""

from .runtime import EMPTY, LoraManager, LoraSet
from .spec import LoraSpec, list_lora_names, parse_lora_arg, parse_lora_list, resolve_lora_name

__all__ = ["EMPTY", "LoraManager", "LoraSet", "LoraSpec", "list_lora_names", "parse_lora_arg", "parse_lora_list",
           "resolve_lora_name"]
