"""LoRA side branches (models/lora_branch.py, lora/adapters.py): y = base(x) + s (x A) B beside any linear layer,
in fixed buffers. Zero buffers give the base bit for bit; a branch beside a quantized layer sees the unquantized
input; switching sets under torch.compile (inductor, on the CPU) recompiles nothing; fused weights (qkv, w13) take
LoRAs per row block."""

import pytest
import torch
import torch.nn.functional as F

from zimage_deploy.lora.adapters import TorchBranches, block_ranks, plan_bytes
from zimage_deploy.lora.targets import from_module
from zimage_deploy.models.dit import Block
from zimage_deploy.models.fast import FP8Linear, compile_regions
from zimage_deploy.models.layers import Linear
from zimage_deploy.models.load import load_dit
from zimage_deploy.models.lora_branch import LoraBranch
from zimage_deploy.numerics import fake_fp8, fp8_scale

G = torch.Generator().manual_seed(0)


def _rand(*shape, scale=1.0):
    return torch.randn(*shape, generator=G) * scale


def _factor(rows, r, in_features, s):
    return (rows, _rand(r, in_features, scale=0.3), _rand(rows[1] - rows[0], r, scale=0.3), s)


def _expected(base_out, x, parts):
    y = base_out.clone()
    for (a, b), d, u, s in parts:
        y[..., a:b] += (x @ d.T @ u.T) * s
    return y


def _layers():
    lin = Linear(24, 36, bias=True)
    quant = Linear(24, 36, bias=False)  # an emulated FP8 layer: the activation pre-hook of models/emulate.py
    amax = torch.tensor(2.0)
    quant.register_forward_pre_hook(lambda mod, args: (fake_fp8(args[0], fp8_scale(amax)),))
    fp8 = FP8Linear(torch.nn.Linear(24, 36, bias=False).to(torch.bfloat16))
    return {"plain": (lin, torch.float32), "emulated-fp8": (quant, torch.float32), "fp8": (fp8, torch.bfloat16)}


@pytest.mark.parametrize("kind", ["plain", "emulated-fp8", "fp8"])
def test_branch_beside_any_linear(kind):
    layer, dtype = _layers()[kind]
    x = _rand(2, 5, 24).to(dtype)
    with torch.no_grad():
        base = layer(x)
        branch = LoraBranch(layer, capacity=8, parts=3)
        assert torch.equal(branch(x), base)  # zero buffers: the base output, bit for bit
        a = [_factor((0, 12), 3, 24, 0.7), _factor((24, 36), 2, 24, -1.3)]  # q and v thirds
        b = [_factor((0, 36), 4, 24, 0.5)]  # a factor over all rows (the original repository's fused qkv)
        branch.load(branch.pack(a + b))
        assert branch.used == 7
        want = _expected(base.float(), x.float(), a + b)
        tol = 1e-5 if dtype == torch.float32 else 0.1
        assert (branch(x).float() - want).abs().max() <= tol * want.abs().max()
        if kind == "emulated-fp8":  # the branch reads the unquantized input: Q(x) W + s (x A) B, not Q(x) A
            wrong = _expected(base, fake_fp8(x, fp8_scale(torch.tensor(2.0))), a + b)
            assert (branch(x) - wrong).abs().max() > 100 * tol * want.abs().max()
        branch.load(branch.pack(b))  # A then B: B alone, bit for bit
        after = branch(x)
        fresh = LoraBranch(layer, capacity=8, parts=3)
        fresh.load(fresh.pack(b))
        assert torch.equal(after, fresh(x))
        branch.load(None)
        assert torch.equal(branch(x), base) and branch.used == 0
        with pytest.raises(ValueError, match="capacity"):
            branch.pack([_factor((0, 12), 9, 24, 1.0)])


def test_bounds_count_row_blocks(tiny_ckpt):
    dit = load_dit(tiny_ckpt)
    targets = from_module(dit)
    qkv = "layers.0.attention.qkv.weight"
    d = targets.shapes[qkv][0] // 3
    ranks = block_ranks(targets, [(qkv, (0, d), 4), (qkv, (d, 2 * d), 4), (qkv, (0, 3 * d), 2)])
    assert ranks == {(qkv, 0): 6, (qkv, 1): 6, (qkv, 2): 2}
    assert targets.parts(qkv) == 3 and targets.parts("layers.0.feed_forward.w13.weight") == 2
    assert targets.parts("layers.0.attention.out.weight") == 1
    # plan: capacity x (parts x in + out + parts) per layer, 2 bytes
    assert plan_bytes(targets, 8, 2) == sum(16 * (targets.parts(n) * i + o + targets.parts(n)) * 2
                                            for n, (o, i) in targets.shapes.items())


def _inputs(dit, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, 8, 8, generator=g), torch.full((1,), 0.4), torch.randn(1, 64, dit.cfg.dim, generator=g),
            torch.full((1,), 40))


def _table(targets, seed, rank):
    g = torch.Generator().manual_seed(seed)
    table = {}
    for name, (out, inp) in targets.shapes.items():
        if name.endswith(("attention.qkv.weight", "feed_forward.w2.weight", "adaLN_modulation.weight")):
            rows = (0, out // 3) if "qkv" in name else (0, out)
            table[name] = [(rows, torch.randn(rank, inp, generator=g) * 0.2,
                            torch.randn(rows[1] - rows[0], rank, generator=g) * 0.2, 0.8)]
    return table


def test_switching_sets_under_torch_compile_recompiles_nothing(tiny_ckpt):
    """Regional inductor compilation of the DiT's blocks with the branches installed: the first call compiles,
    switching between two sets and back to none recompiles nothing, and every compiled result is the eager one."""
    from zimage_deploy.runtime.torch_fast import compile_counters, reset_compile_counters

    eager = load_dit(tiny_ckpt)
    compiled = load_dit(tiny_ckpt)
    targets = from_module(eager)
    branches = {m: TorchBranches(m, targets, max_rank=8, max_loras=1) for m in (eager, compiled)}
    reset_compile_counters()
    compile_regions(compiled, (Block,), backend="inductor")
    x = _inputs(eager, 1)
    sets = [None, _table(targets, 1, 4), _table(targets, 2, 8), None, _table(targets, 1, 4)]
    assert len(sets[1]) > 10
    outs = []
    with torch.no_grad():
        for i, table in enumerate(sets):
            for m, br in branches.items():
                br.load(br.prepare(table) if table else {})
            want, got = eager(*x), compiled(*x)
            if i == 0:  # the first call compiles (refiner and main blocks: shapes differ, a recompile)
                first = compile_counters()
                assert first["frames_total"] > 0
            assert (got - want).abs().max() <= 1e-4 * want.abs().max(), i
            outs.append(got)
    c = compile_counters()
    assert (c["recompiles"], c["frames_total"], c["unique_graphs"]) == (
        first["recompiles"], first["frames_total"], first["unique_graphs"]), (first, c)
    assert (outs[1] - outs[0]).abs().max() > 1e-2 and (outs[2] - outs[1]).abs().max() > 1e-2  # the sets count
    assert torch.equal(outs[3], outs[0]) and torch.equal(outs[4], outs[1])
    reset_compile_counters()


def test_plan_counts_the_branches(capsys):
    """`plan --max-lora-rank R --max-loras N`: a lora_branches part with the buffers' bytes (real Z-Image configs,
    meta modules), in the all-resident total."""
    from zimage_deploy import plan

    base = plan.make_plan("h100", "fp8")
    with_lora = plan.make_plan("h100", "fp8", lora=(64, 2))
    part = next(p for p in with_lora.parts if p.name == "lora_branches")
    assert 0.6 * 2**30 < part.weights < 0.8 * 2**30 and part.flops > 0 and part.calls == base.steps
    assert with_lora.modes["all-resident"] - base.modes["all-resident"] == part.weights
    smaller = next(p for p in plan.make_plan("h100", "fp8", lora=(32, 1)).parts if p.name == "lora_branches")
    assert smaller.weights * 4 == part.weights
    assert plan.main(["--target", "h100", "--precision", "fp8", "--max-lora-rank", "32", "--max-loras", "1"]) == 0
    assert "| lora_branches | bf16 | 0.18 |" in capsys.readouterr().out
    with pytest.raises(Exception, match="must be >= 1"):
        plan.main(["--target", "h100", "--max-loras", "0"])


# -- end to end on the compiled Torch runtime -----------------------------------------------------------------
@pytest.fixture(scope="module")
def runtime_loras(tiny_ckpt, tmp_path_factory):
    from test_lora import make_peft_lora

    d = tmp_path_factory.mktemp("compiled-loras")
    return (make_peft_lora(tiny_ckpt, d / "a", 21, ("to_q", "to_k", "to_v", "to_out.0", "w2"), r=4, lora_alpha=8),
            make_peft_lora(tiny_ckpt, d / "b", 22, ("to_q", "w3", "adaLN_modulation.0"), r=2, lora_alpha=3))


def _image(rt, loras=None):
    import numpy as np

    out = rt.generate("a red fox", seed=3, steps=2, height=64, width=64, loras=loras)
    return np.asarray(out.images[0], np.int16)


def test_compiled_runtime_switches_loras_without_recompiling(tiny_fp32, runtime_loras):
    """ZImageRuntime on the compiled Torch path with the branches reserved (`torch_options={"lora_bounds": ...}`):
    once the first generation has compiled, LoRA A, then B, then none compile nothing (dynamo's counters), and
    each image is the eager runtime's with the same set. Compiled by dynamo with its "eager" backend (the same
    guards and recompiles as inductor, without code generation: inductor on the CPU took 140 s here; the blocks
    under inductor: test_switching_sets_under_torch_compile_recompiles_nothing)."""
    from zimage_deploy.runtime.api import ZImageRuntime
    from zimage_deploy.runtime.torch_fast import compile_counters, reset_compile_counters

    a, b = [(runtime_loras[0], 1.5)], [(runtime_loras[1], -2.0)]
    eager = ZImageRuntime(tiny_fp32, backend="torch", torch_mode="eager")
    reset_compile_counters()
    rt = ZImageRuntime(tiny_fp32, backend="torch", torch_mode="compiled",
                       torch_options={"lora_bounds": (8, 2), "compile_backend": "eager"})
    assert (rt.loras.max_rank, rt.loras.max_loras) == (8, 2)
    base = _image(rt)
    first = compile_counters()
    assert first["frames_total"] > 0
    for loras in (a, b, None, a):
        got, want = _image(rt, loras), _image(eager, loras)
        assert abs(got - want).max() <= 1, (loras, abs(got - want).max())
        if loras is None:
            assert (got == base).all()
    assert abs(_image(eager, a) - _image(eager)).mean() > 3  # the LoRA matters
    c = compile_counters()
    assert (c["recompiles"], c["frames_total"], c["unique_graphs"]) == (
        first["recompiles"], first["frames_total"], first["unique_graphs"]), (first, c)
    assert rt.fallbacks() == {}
    reset_compile_counters()


def test_eager_fallback_of_the_compiled_dit_runs_the_loras(tiny_fp32, runtime_loras):
    """The compiled DiT failing to compile falls back to its eager twin (counted); without reserved bounds the
    branches are installed on the compiled module at the first LoRA, after the twin was copied: the twin runs them
    too (it ran the base model before the fix: the LoRA image was the base image)."""
    from zimage_deploy.runtime.api import ZImageRuntime

    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    a, b = [(runtime_loras[0], 1.5)], [(runtime_loras[1], -2.0)]
    eager = ZImageRuntime(tiny_fp32, backend="torch", torch_mode="eager")
    rt = ZImageRuntime(tiny_fp32, backend="torch", torch_mode="compiled",
                       torch_options={"compile_backend": {"transformer": broken, "text_encoder": "eager",
                                                          "vae_decoder": "eager", "vae_encoder": "eager"}})
    assert (_image(rt) == _image(eager)).all()
    for loras in (a, b, None):
        assert (_image(rt, loras) == _image(eager, loras)).all(), loras
    assert rt.fallbacks().get("transformer", 0) >= 8
