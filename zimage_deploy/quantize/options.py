"""What the quantize stage is asked to do (one object, recorded in the manifest) and the calibration prompts."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UserError

SHIPPED_PROMPTS = Path(__file__).with_name("calib_prompts.txt")
SHIPPED_EDIT_PROMPTS = Path(__file__).with_name("calib_edit_prompts.txt")  # instructions, for the omni layout
INT4_METHODS = ("awq", "rtn")

# Kept in high precision by default (upstream FP8 without these exclusions gives pure noise): timestep embedder,
# adaLN modulations, caption / image / SigLIP embedders, final layer. Norms, RoPE and softmax are not matmuls and
# are never quantized; token embeddings are not matmuls either.
DEFAULT_EXCLUDE = ("t_embedder", "adaLN_modulation", "x_embedder", "cap_linear", "siglip_linear", "final_layer")


@dataclass(frozen=True)
class QuantOptions:
    calib_prompts: Path | None = None  # None: the prompts shipped with the project
    calib_size: int | None = None  # prompts used (None: all of the file)
    calib_side: int | None = None  # image side calibrated at (None: the build's default size)
    calib_steps: int | None = None  # sampling steps per calibration prompt (None: the variant's default)
    calib_images: Path | None = None  # Edit builds: condition images besides the embedded synthetic set
    int4_method: str = "awq"  # awq (activation-aware, modelopt awq_lite) or rtn (round to nearest, no data)
    int4_block: int | None = None  # None: 128 (32 for small test checkpoints)
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE  # module-name substrings kept unquantized
    fp8_attention: bool = False  # FP8 Q/DQ on the attention BMMs' inputs as well
    gate: bool = True
    gate_prompts: int = 3
    min_psnr: float = 20.0
    min_cosine: float = 0.95

    def __post_init__(self):
        if self.int4_method not in INT4_METHODS:
            raise UserError(f"--int4-method must be one of {INT4_METHODS}, got {self.int4_method!r}")
        if self.calib_size is not None and self.calib_size < 1:
            raise UserError(f"--calib-size must be >= 1, got {self.calib_size}")
        if self.calib_steps is not None and self.calib_steps < 1:
            raise UserError(f"--calib-steps must be >= 1, got {self.calib_steps}")
        if self.int4_block is not None and (self.int4_block < 16 or self.int4_block % 16):
            raise UserError(f"--int4-block must be a multiple of 16, got {self.int4_block}")
        if self.gate_prompts < 1:
            raise UserError(f"--gate-prompts must be >= 1, got {self.gate_prompts}")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["calib_prompts"] = str(self.calib_prompts) if self.calib_prompts else "shipped"
        d["calib_images"] = str(self.calib_images) if self.calib_images else None
        d["exclude"] = list(self.exclude)
        return d


def load_prompts(path: Path | None, size: int | None = None, layout: str = "basic") -> list[str]:
    """Prompts of a text file, one per line ('#' comments and blank lines skipped); the first `size` of them.
    Without a file: the shipped prompts (the omni layout's: the shipped Edit instructions)."""
    path = Path(path) if path else (SHIPPED_EDIT_PROMPTS if layout == "omni" else SHIPPED_PROMPTS)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"calibration prompt file {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"calibration prompt file {path} is a folder, not a text file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"calibration prompt file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UserError(f"cannot read calibration prompt file {path}: {e.strerror}") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise UserError(f"calibration prompt file {path} holds no prompt (one prompt per line; '#' starts a comment)")
    if size is not None and size > len(prompts):
        raise UserError(f"--calib-size {size} but {path} holds only {len(prompts)} prompts")
    return prompts[:size] if size else prompts


def prompts_sha256(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()
