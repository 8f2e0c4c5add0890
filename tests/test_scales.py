"""Scale files (scales.py): the same scales give the same bytes in every process (a rebuild is reproducible byte
for byte), the metadata round-trips, and files written before the single-key metadata still read."""

import subprocess
import sys

import torch
from safetensors.torch import save_file

from zimage_deploy.scales import load_scales, save_scales

WRITE = """
import sys, torch
from zimage_deploy.scales import save_scales
d = {f"blocks.{i}.ffn.w{j}.weight_amax": torch.full((4, 2), float(i * 3 + j)) for i in range(30) for j in range(3)}
d.update({f"blocks.{i}.attention.qkv.input_amax": torch.tensor(float(i)) for i in range(30)})
save_scales(sys.argv[1], d, {"scheme": "fp8", "block": 0, "component": "transformer", "method": "max", "é": "ü"})
"""


def test_same_scales_same_bytes_in_every_process(tmp_path):
    """safetensors orders a multi-key metadata map at random per process (this failed before: three processes,
    three different files)."""
    files = [tmp_path / f"s{i}.safetensors" for i in range(3)]
    for f in files:
        subprocess.run([sys.executable, "-c", WRITE, str(f)], check=True, timeout=120)
    first = files[0].read_bytes()
    assert all(f.read_bytes() == first for f in files[1:])
    scales, meta = load_scales(files[0])
    assert meta == {"scheme": "fp8", "block": "0", "component": "transformer", "method": "max", "é": "ü"}
    assert len(scales) == 120 and float(scales["blocks.2.attention.qkv.input_amax"]) == 2.0


def test_older_files_still_read(tmp_path):
    path = tmp_path / "old.safetensors"
    save_file({"a.weight_amax": torch.ones(())}, str(path), metadata={"scheme": "int4", "block": "128"})
    scales, meta = load_scales(path)
    assert meta == {"scheme": "int4", "block": "128"} and float(scales["a.weight_amax"]) == 1.0


def test_roundtrip_in_process(tmp_path):
    path = tmp_path / "x.safetensors"
    save_scales(path, {"b.input_amax": torch.tensor(3.5)}, {"scheme": "nvfp4"})
    scales, meta = load_scales(path)
    assert meta == {"scheme": "nvfp4"} and float(scales["b.input_amax"]) == 3.5
