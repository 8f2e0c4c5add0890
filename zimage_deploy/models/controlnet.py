"""The Z-Image union ControlNet (own code; diffusers' `ZImageControlNetModel`, the Z-Image-Turbo-Fun-Controlnet-Union
family), export-friendly, as a branch of our DiT.

What diffusers computes per step (tests/test_controlnet.py checks it):
- the control latents (B, control_in_dim, h, w) are patchified like the image latents and embedded by
  `control_x_embedder`; image pad rows (to a multiple of 32) take the DiT's `x_pad_token`, in both streams;
- optional control refiner (`add_control_noise_refiner`): "control_noise_refiner" runs the control refiner blocks,
  "control_layers" runs the main control blocks, over the image tokens; their hints are added, scaled, after the DiT's
  noise-refiner layers `control_refiner_layers_places` while the ControlNet runs its own pass of the DiT's noise
  refiner (diffusers' transformer never sees those hints: they only shape the x the control blocks start from);
  without one (None), plain refiner blocks refine the control tokens on their own;
- the control blocks run over the joint [image, caption] sequence, the first starting from
  `before_proj(control) + x`; each block's `after_proj` output, times the scale, is the hint added after main layer
  `control_layers_places[i]` of the transformer.

Here the branch is `dit.control` (a ControlBranch) and `control_hints(dit, ...)` computes every hint of one step at
once (the `controlnet` graph, which shares the DiT's embedders and noise refiner); the DiT's main layers become
HintedBlocks that add `hints[slot]` when `on` (per-layer buffers, so that every main layer has the same structure:
the memory-lean export's layer stamping applies unchanged).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import torch
from torch import nn

from ..errors import UserError
from .dit import SEQ_MULTIPLE, Block, DiTConfig, ZImageDiT
from .layers import Linear, key_bias_from_valid

REFINER_KINDS = (None, "control_layers", "control_noise_refiner")


@dataclass(frozen=True)
class ControlNetConfig:
    control_layers_places: tuple[int, ...]
    control_refiner_layers_places: tuple[int, ...] = ()
    control_in_dim: int = 16
    add_control_noise_refiner: str | None = None
    dim: int = 3840
    n_refiner_layers: int = 2
    n_heads: int = 30
    norm_eps: float = 1e-5
    qk_norm: bool = True
    patch_size: int = 2

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "ControlNetConfig":
        """A diffusers `ZImageControlNetModel` config.json (as a dict)."""
        if not isinstance(cfg.get("control_layers_places"), (list, tuple)):
            raise UserError("the ControlNet config has no control_layers_places list: is it a ZImageControlNetModel?")
        patch = tuple(cfg.get("all_patch_size") or (2,))
        if len(patch) != 1 or tuple(cfg.get("all_f_patch_size") or (1,)) != (1,):
            raise UserError(f"unsupported ControlNet patch sizes {patch}: only one 2-D patch size is supported")
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in cfg.items() if k in names}
        for key in ("control_layers_places", "control_refiner_layers_places"):
            kw[key] = tuple(int(p) for p in (kw.get(key) or ()))
        if kw.get("control_in_dim") is None:
            raise UserError("the ControlNet config has no control_in_dim")
        return cls(**kw, patch_size=patch[0])

    @classmethod
    def from_record(cls, cfg: dict) -> "ControlNetConfig":
        """The config as a manifest records it (`as_dict`: lists for the layer places)."""
        return cls(**{**cfg, "control_layers_places": tuple(cfg["control_layers_places"]),
                      "control_refiner_layers_places": tuple(cfg["control_refiner_layers_places"])})

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def n_hints(self) -> int:
        return len(self.control_layers_places)

    def inpaint(self, latent_channels: int) -> bool:
        """An inpainting union ControlNet: control latents + mask + masked-image latents (16 + 1 + 16 = 33)."""
        return self.control_in_dim == 2 * latent_channels + 1

    def check(self, dit: DiTConfig) -> None:
        """Raise UserError when this ControlNet cannot run beside `dit` (the checkpoint's transformer)."""
        problems = []
        for name, mine, theirs in (("dim", self.dim, dit.dim), ("n_heads", self.n_heads, dit.n_heads),
                                   ("patch size", self.patch_size, dit.patch_size),
                                   ("qk_norm", self.qk_norm, dit.qk_norm)):
            if mine != theirs:
                problems.append(f"{name} {mine} (the transformer's: {theirs})")
        places = self.control_layers_places
        if not places or places[0] != 0:
            problems.append(f"control_layers_places {list(places)} must start with layer 0 (the block that adds the "
                            "control input)")
        if len(set(places)) != len(places) or any(not 0 <= p < dit.n_layers for p in places):
            problems.append(f"control_layers_places {list(places)} must be distinct layers in 0..{dit.n_layers - 1}")
        if self.add_control_noise_refiner not in REFINER_KINDS:
            problems.append(f"add_control_noise_refiner {self.add_control_noise_refiner!r} is not one of "
                            f"{REFINER_KINDS}")
        elif self.add_control_noise_refiner is not None:
            rp = self.control_refiner_layers_places
            blocks = self.n_hints if self.add_control_noise_refiner == "control_layers" else self.n_refiner_layers
            if len(set(rp)) != len(rp) or any(not 0 <= p < dit.n_refiner_layers for p in rp) or len(rp) > blocks:
                problems.append(f"control_refiner_layers_places {list(rp)} must be distinct noise-refiner layers in "
                                f"0..{dit.n_refiner_layers - 1}, at most {blocks}")
        if self.add_control_noise_refiner != "control_layers" and self.n_refiner_layers < 1:
            problems.append("n_refiner_layers must be >= 1")
        if self.control_in_dim < dit.in_channels:
            problems.append(f"control_in_dim {self.control_in_dim} is below the latent channels {dit.in_channels}")
        if problems:
            raise UserError("the ControlNet does not match the checkpoint's transformer: " + "; ".join(problems))


class ControlBlock(Block):
    """A DiT block on the control stream: the first adds the image stream through `before_proj`; each returns its
    output and the hint `after_proj(output)`."""

    def __init__(self, cfg: DiTConfig, first: bool):
        super().__init__(cfg, modulation=True)
        self.before_proj = Linear(cfg.dim, cfg.dim) if first else None
        self.after_proj = Linear(cfg.dim, cfg.dim)

    def forward(self, c, x, cos, sin, key_bias, adaln):
        if self.before_proj is not None:
            c = self.before_proj(c) + x
        c = super().forward(c, cos, sin, key_bias, adaln)
        return c, self.after_proj(c)


class ControlBranch(nn.Module):
    """The ControlNet's own weights (everything else it uses is the DiT's)."""

    def __init__(self, cn: ControlNetConfig, dit: DiTConfig):
        super().__init__()
        self.cn = cn
        cfg = replace(dit, norm_eps=cn.norm_eps, qk_norm=cn.qk_norm)
        p = cn.patch_size
        self.control_x_embedder = Linear(p * p * cn.control_in_dim, cfg.dim)
        self.control_layers = nn.ModuleList([ControlBlock(cfg, first=i == 0) for i in range(cn.n_hints)])
        kind = cn.add_control_noise_refiner
        if kind == "control_noise_refiner":
            self.control_noise_refiner = nn.ModuleList([ControlBlock(cfg, first=j == 0)
                                                        for j in range(cn.n_refiner_layers)])
        elif kind is None:
            self.control_noise_refiner = nn.ModuleList([Block(cfg, True) for _ in range(cn.n_refiner_layers)])
        else:
            self.control_noise_refiner = None


class HintedBlock(Block):
    """A main DiT layer that adds its hint after itself: `x + on * hints[slot]` (on = 0 where the ControlNet has no
    block). `slot` and `on` are buffers, i.e. graph weights, so that all main layers are traced alike."""

    def __init__(self, cfg: DiTConfig):
        super().__init__(cfg, modulation=True)
        self.register_buffer("hint_slot", torch.zeros((), dtype=torch.int64))
        self.register_buffer("hint_on", torch.zeros(()))

    def forward(self, x, cos, sin, key_bias, adaln=None, noisy=None, adaln_clean=None, hints=None):
        x = super().forward(x, cos, sin, key_bias, adaln, noisy, adaln_clean)
        if hints is None:
            return x
        hint = torch.index_select(hints, 0, self.hint_slot.reshape(1)).squeeze(0)
        return x + self.hint_on.to(x.dtype) * hint.to(x.dtype)


def hint_buffers(cn: ControlNetConfig, n_layers: int):
    """(name, tensor) of every main layer's hint slot and switch."""
    slot = {place: i for i, place in enumerate(cn.control_layers_places)}
    for k in range(n_layers):
        yield f"layers.{k}.hint_slot", torch.tensor(slot.get(k, 0), dtype=torch.int64)
        yield f"layers.{k}.hint_on", torch.tensor(1.0 if k in slot else 0.0)


def attach(dit: ZImageDiT, cn: ControlNetConfig) -> ZImageDiT:
    """Give `dit` the ControlNet branch (`dit.control`) and main layers that take hints (weights not loaded: the
    new modules are made on `dit`'s device, meta included, and filled by the loader)."""
    cn.check(dit.cfg)
    device = dit.x_embedder.weight.device
    with torch.device(device):
        dit.layers = nn.ModuleList([HintedBlock(dit.cfg) for _ in range(dit.cfg.n_layers)])
        dit.control = ControlBranch(cn, dit.cfg)
    return dit


def template_branch(dit: ZImageDiT, cn: ControlNetConfig, dtype: torch.dtype) -> ZImageDiT:
    """For tracing only (the memory-lean export's template, fewer main layers than the real model): the branch and
    hinted main layers with random values, allocated in `dtype`; every hint slot valid. The values are never
    exported (the real weights are streamed in)."""
    with torch.device("meta"):
        layers = nn.ModuleList([HintedBlock(dit.cfg) for _ in range(dit.cfg.n_layers)])
        branch = ControlBranch(cn, dit.cfg)
    gen = torch.Generator().manual_seed(1)
    for name, module in (("layers", layers), ("control", branch)):
        module = module.to(dtype).to_empty(device="cpu")
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(generator=gen)
        setattr(dit, name, module)
    for k, layer in enumerate(dit.layers):
        layer.hint_slot = torch.tensor(min(k, cn.n_hints - 1), dtype=torch.int64)
        layer.hint_on = torch.tensor(1.0)
    return dit


# -- the per-step hints ---------------------------------------------------------------------------------------
def _tokens(dit: ZImageDiT, latents: torch.Tensor, embedder: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Patchified, embedded tokens padded to a multiple of 32 with the DiT's x_pad_token (as `ZImageDiT.forward`)."""
    p = dit.cfg.patch_size
    b, c, h, w = latents.shape
    ht, wt = h // p, w // p
    n = ht * wt
    x = latents.to(embedder.weight.dtype).reshape(b, c, ht, p, wt, p).permute(0, 2, 4, 3, 5, 1).reshape(b, n, -1)
    x = embedder(x)
    n_pad = (n + (SEQ_MULTIPLE - 1)) // SEQ_MULTIPLE * SEQ_MULTIPLE
    j = torch.arange(n_pad, device=latents.device)
    is_img = j < n
    x = x[:, torch.clamp(j, max=n - 1)]
    return torch.where(is_img[None, :, None], x, dit.x_pad_token.to(x.dtype)), is_img


def control_hints(dit: ZImageDiT, latents, timestep, cap_states, cap_lens, control, scale) -> torch.Tensor:
    """latents (B, C, h, w), timestep (B,), cap_states (B, S, dim), cap_lens (B,) as for `ZImageDiT.forward`;
    control (B, control_in_dim, h, w) control latents; scale (B,) -> hints (n_hints, B, n_img_pad + S, dim), each
    already multiplied by its item's scale: what the DiT's main layers add."""
    cfg, branch = dit.cfg, dit.control
    cn = branch.cn
    b, _, h, w = latents.shape
    wt = w // cfg.patch_size
    x, is_img = _tokens(dit, latents, dit.x_embedder)
    c, _ = _tokens(dit, control, branch.control_x_embedder)
    n_pad = x.shape[1]
    j = torch.arange(n_pad, device=latents.device)
    zeros = torch.zeros_like(j)
    cap_padded = dit.padded_lengths(cap_lens)
    pos = torch.stack([torch.where(is_img[None], cap_padded[:, None] + 1, zeros[None]),
                       torch.where(is_img, j // wt, zeros).expand(b, -1),
                       torch.where(is_img, j % wt, zeros).expand(b, -1)], dim=-1)
    x_cos, x_sin = dit.rope(pos)
    adaln = dit.t_embedder(timestep * cfg.t_scale)
    s = scale.to(x.dtype)[:, None, None]

    refiner_hints = {}
    if cn.add_control_noise_refiner is not None:
        blocks = branch.control_layers if cn.add_control_noise_refiner == "control_layers" \
            else branch.control_noise_refiner
        for i, block in enumerate(blocks):  # every block refines the control stream; the first few give hints
            c, hint = block(c, x, x_cos, x_sin, None, adaln)
            if i < len(cn.control_refiner_layers_places):
                refiner_hints[cn.control_refiner_layers_places[i]] = hint * s
    for k, layer in enumerate(dit.noise_refiner):
        x = layer(x, x_cos, x_sin, None, adaln)
        if k in refiner_hints:
            x = x + refiner_hints[k]
    if cn.add_control_noise_refiner is None:
        for block in branch.control_noise_refiner:
            c = block(c, x_cos, x_sin, None, adaln)

    _, cap_attended, cap_cos, cap_sin = dit.caption_layout(cap_lens, cap_states.shape[1])
    states = cap_states.to(x.dtype)
    x = torch.cat([x, states], dim=1)
    c = torch.cat([c, states], dim=1)
    cos = torch.cat([x_cos, cap_cos.expand(b, -1, -1)], dim=1)
    sin = torch.cat([x_sin, cap_sin.expand(b, -1, -1)], dim=1)
    key_bias = key_bias_from_valid(torch.cat([is_img.new_ones(b, n_pad), cap_attended], dim=1))
    hints = []
    for block in branch.control_layers:
        c, hint = block(c, x, cos, sin, key_bias, adaln)
        hints.append(hint * s)
    return torch.stack(hints)
