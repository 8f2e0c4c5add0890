"""The explicit sequence layout the Omni (Edit) graphs take (context refiner, SigLIP refiner, transformer), built on
the host, reproducing the diffusers transformer's `patchify_and_embed_omni` (quirks included: caption segments
advance positions by their unpadded length + 2 and later segments' positions shift by the earlier segments'
padding; SigLIP features are flattened from a (C, H, W) view; SigLIP positions are rescaled to the latent size and
truncated to int). Used by the export (sample inputs) and the runtime (runtime/edit.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .dit import SEQ_MULTIPLE


def pad32(n: int) -> int:
    return -(-n // SEQ_MULTIPLE) * SEQ_MULTIPLE


# -- sequence layout ------------------------------------------------------------------------------------------
def patchify(latent: torch.Tensor, p: int = 2) -> torch.Tensor:
    """(C, H, W) -> (H/p * W/p, p*p*C), the DiT's patch order."""
    c, h, w = latent.shape
    return latent.reshape(c, h // p, p, w // p, p).permute(1, 3, 2, 4, 0).reshape(-1, p * p * c)


@dataclass
class OmniLayout:
    """Per batch item: caption rows (all segments), image rows (conditions then target), SigLIP rows."""

    cap_feats: torch.Tensor  # (S, C) with zero rows where padded
    cap_pad: torch.Tensor  # (S,) 1 = pad-to-32 token
    cap_pos: torch.Tensor  # (S, 3)
    cap_noise: torch.Tensor  # (S,)
    x_pad: torch.Tensor  # (Nx,)
    x_pos: torch.Tensor  # (Nx, 3)
    x_noise: torch.Tensor  # (Nx,)
    cond_patches: torch.Tensor  # (Nc, p*p*C)
    sig_feats: torch.Tensor  # (Ns, C_sig)
    sig_pad: torch.Tensor
    sig_pos: torch.Tensor
    sig_noise: torch.Tensor


def _rows(n_real: int, n_total: int, pos: torch.Tensor, noise: int):
    pad = torch.arange(n_total) >= n_real
    full = torch.zeros(n_total, 3, dtype=torch.int64)
    full[:n_real] = pos
    return pad.long(), full, torch.full((n_total,), noise, dtype=torch.int64)


def build_layout(segments: list[torch.Tensor], cond_latents: list[torch.Tensor], sig_feats: list[torch.Tensor],
                 target_hw: tuple[int, int], sig_dim: int, patch: int = 2) -> OmniLayout:
    """segments: caption features per segment (L_j, C); cond_latents: (C, H_j, W_j) per condition image;
    sig_feats: (Hs_j, Ws_j, C_sig) per condition image; target_hw: latent (h, w) of the output."""
    k = len(cond_latents)
    noise_of_image = [0] * k + [1]
    cap = {"feats": [], "pad": [], "pos": [], "noise": []}
    cu, ends = 1, []
    for j, seg in enumerate(segments):
        n, total = seg.shape[0], pad32(seg.shape[0])
        # diffusers gives each segment `total` grid positions and then `total - n` more (0, 0, 0) rows, and
        # concatenates them per item: later segments' tokens take positions shifted by the earlier extras.
        pos = torch.stack([torch.arange(total) + cu, torch.zeros(total, dtype=torch.int64),
                           torch.zeros(total, dtype=torch.int64)], dim=-1)
        cap["pos"] += [pos, torch.zeros(total - n, 3, dtype=torch.int64)]
        cap["feats"].append(torch.cat([seg, seg.new_zeros(total - n, seg.shape[1])]))
        cap["pad"].append((torch.arange(total) >= n).long())
        cap["noise"].append(torch.full((total,), noise_of_image[j] if j < k + 1 else 1, dtype=torch.int64))
        cu += n
        ends.append(cu)
        cu += 2
    cap_len = sum(f.shape[0] for f in cap["feats"])
    cap["pos"] = [torch.cat(cap["pos"])[:cap_len]]

    x = {"pad": [], "pos": [], "noise": []}
    cond_patches = []
    sizes = [tuple(lat.shape[1:]) for lat in cond_latents] + [tuple(target_hw)]
    for j, (h, w) in enumerate(sizes):
        ht, wt = h // patch, w // patch
        n = ht * wt
        hh, ww = torch.meshgrid(torch.arange(ht), torch.arange(wt), indexing="ij")
        pos = torch.stack([torch.full((n,), ends[j]), hh.flatten(), ww.flatten()], dim=-1)
        pad, full, noise = _rows(n, pad32(n), pos, noise_of_image[j])
        x["pad"].append(pad), x["pos"].append(full), x["noise"].append(noise)
        if j < k:
            patches = patchify(cond_latents[j], patch)
            cond_patches.append(torch.cat([patches, patches.new_zeros(pad32(n) - n, patches.shape[1])]))

    sig = {"feats": [], "pad": [], "pos": [], "noise": []}
    for j in range(k + 1):
        if j < k:
            hs, ws, cs = sig_feats[j].shape
            flat = sig_feats[j].permute(2, 0, 1).reshape(hs * ws, cs)  # as diffusers does (sic)
            n = hs * ws
            hh, ws_ = torch.meshgrid(torch.arange(hs), torch.arange(ws), indexing="ij")
            pos = torch.stack([torch.full((n,), ends[j] + 1), hh.flatten(), ws_.flatten()], dim=-1)
            pad, full, noise = _rows(n, pad32(n), pos, 0)
            full = full.float()
            full[:, 1] = full[:, 1] / max(hs - 1, 1) * (sizes[j][0] - 1)
            full[:, 2] = full[:, 2] / max(ws - 1, 1) * (sizes[j][1] - 1)
            full = full.to(torch.int32).long()
            feats = torch.cat([flat, flat.new_zeros(pad32(n) - n, cs)])
        else:  # the target has no SigLIP features: 32 pad tokens
            pad, full, noise = torch.ones(SEQ_MULTIPLE, dtype=torch.int64), torch.zeros(SEQ_MULTIPLE, 3,
                                                                                       dtype=torch.int64), \
                torch.ones(SEQ_MULTIPLE, dtype=torch.int64)
            feats = torch.zeros(SEQ_MULTIPLE, sig_dim)
        sig["feats"].append(feats), sig["pad"].append(pad), sig["pos"].append(full), sig["noise"].append(noise)

    cat = torch.cat
    return OmniLayout(
        cat(cap["feats"]), cat(cap["pad"]), cat(cap["pos"]), cat(cap["noise"]),
        cat(x["pad"]), cat(x["pos"]), cat(x["noise"]),
        cat(cond_patches) if cond_patches else torch.zeros(0, patch * patch * cond_latents[0].shape[0]),
        cat(sig["feats"]), cat(sig["pad"]), cat(sig["pos"]), cat(sig["noise"]),
    )


def batch_layouts(layouts: list[OmniLayout]) -> dict[str, torch.Tensor]:
    """Stack per-item layouts; captions of different lengths are padded and marked invalid (masked)."""
    s = max(lay.cap_feats.shape[0] for lay in layouts)

    def pad_to(t, n):
        return torch.cat([t, t.new_zeros((n - t.shape[0],) + tuple(t.shape[1:]))])

    out = {
        "cap_feats": torch.stack([pad_to(lay.cap_feats, s) for lay in layouts]),
        "cap_pad": torch.stack([pad_to(lay.cap_pad, s) for lay in layouts]),
        "cap_pos": torch.stack([pad_to(lay.cap_pos, s) for lay in layouts]),
        "cap_noise": torch.stack([pad_to(lay.cap_noise, s) for lay in layouts]),
        "cap_valid": torch.stack([pad_to(torch.ones(lay.cap_feats.shape[0], dtype=torch.int64), s)
                                  for lay in layouts]),
    }
    for name in ("x_pad", "x_pos", "x_noise", "cond_patches", "sig_feats", "sig_pad", "sig_pos", "sig_noise"):
        out[name] = torch.stack([getattr(lay, name) for lay in layouts])
    out["sig_valid"] = torch.ones_like(out["sig_pad"])
    return out
