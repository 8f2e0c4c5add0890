"""Parity of a graph exported on the memory-lean path, without loading the whole model.

The graph is cut down to a stated sample of its main blocks (`sample_blocks`: the first, the middle and the last)
with everything outside the blocks kept (embedders, refiners, final layer): the sampled blocks are chained to one
another and the other blocks' nodes and weights dropped, so ONNX Runtime reads only the weights the cut graph
names. The reference is the Torch module with as many blocks, its weights streamed from the checkpoint (the
sampled blocks renumbered). Memory holds the sample, never the whole model. Figures: the outputs, and each
sampled block's output (the residual stream it hands on)."""

from __future__ import annotations

import onnx
import torch
from onnx import helper

from ..components import REPEATED_BLOCKS, loader_of
from ..models.load import TEMPLATES, _load

SAMPLE = 3  # blocks checked per repeated-block graph: the first, the middle and the last


def sample_blocks(n: int, k: int = SAMPLE) -> list[int]:
    """The blocks checked of `n`: all up to `k`, else `k` evenly spaced ones from the first to the last."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def block_chain(graph: onnx.GraphProto, scope: str, n: int) -> tuple[str, list[str]]:
    """(the value block 0 reads as its input, [the value block k hands on]) of a graph whose block k's nodes are
    named `/{scope}.{k}/...`."""
    tag = lambda k: f"/{scope}.{k}/"  # noqa: E731
    blocks = [[nd for nd in graph.node if nd.name.startswith(tag(k))] for k in range(n)]
    # constants the exporter shares between blocks are never what a block hands on
    produced = [{o for nd in b if nd.op_type != "Constant" for o in nd.output} for b in blocks]
    consumed = [{i for nd in b for i in nd.input} for b in blocks]
    outside = {i for nd in graph.node if not nd.name.startswith(f"/{scope}.") for i in nd.input}
    outside |= {o.name for o in graph.output}
    outs = []
    for k in range(n):
        readers = consumed[k + 1] if k + 1 < n else outside
        others = set().union(*(consumed[j] for j in range(n) if j not in (k, k + 1)))
        if k + 1 < n:
            others |= outside
        found = (produced[k] & readers) - others
        if len(found) != 1:
            raise ValueError(f"cannot tell what block {k} of {scope} hands on among {sorted(found)}")
        outs.append(found.pop())
    reader = next(nd for nd in blocks[1] if outs[0] in nd.input)
    twin = next(nd for nd in blocks[0] if nd.name == reader.name.replace(tag(1), tag(0)))
    return twin.input[list(reader.input).index(outs[0])], outs


def cut(model: onnx.ModelProto, scope: str, n: int, keep: list[int]) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of `model` (loaded without its external data) with only blocks `keep` (ascending) of `n`, chained;
    nodes and initializers nothing reads any more are dropped. Returns it and the kept blocks' output values."""
    x_in, outs = block_chain(model.graph, scope, n)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    tag = lambda k: f"/{scope}.{k}/"  # noqa: E731
    prev = x_in
    for k in keep:
        if k > 0:
            for nd in g.node:
                if nd.name.startswith(tag(k)):
                    nd.input[:] = [prev if i == outs[k - 1] else i for i in nd.input]
        prev = outs[k]
    last = outs[n - 1]
    if prev != last:
        for nd in g.node:
            if not nd.name.startswith(f"/{scope}."):
                nd.input[:] = [prev if i == last else i for i in nd.input]
        if last in {o.name for o in g.output}:
            for nd in g.node:
                nd.output[:] = [o + "/dropped" if o == last else o for o in nd.output]
            g.node.append(helper.make_node("Identity", [prev], [last], name="/parity/last_block"))
    _prune(g)
    return out, [outs[k] for k in keep]


def _prune(g: onnx.GraphProto) -> None:
    """Drop the nodes no graph output depends on, then the initializers no node reads."""
    producer = {o: nd for nd in g.node for o in nd.output}
    needed, todo, live = set(), [o.name for o in g.output], set()
    while todo:
        v = todo.pop()
        if v in needed:
            continue
        needed.add(v)
        nd = producer.get(v)
        if nd is not None and id(nd) not in live:
            live.add(id(nd))
            todo.extend(nd.input)
    nodes = [nd for nd in g.node if id(nd) in live]
    del g.node[:]
    g.node.extend(nodes)
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    del g.value_info[:]


def lean_reference(job, name: str) -> tuple[torch.nn.Module, list[int], int]:
    """The float32 Torch module that serves `name` with the sampled blocks of its real depth (renumbered 0..),
    its weights streamed from the checkpoint (LoRAs fused as the build's); the sampled blocks and the depth."""
    loader = loader_of(name)
    control = job.controlnet.kwargs(loader) if job.controlnet else {}
    model, depth = TEMPLATES[loader](job.ckpt, torch.float32, layers=SAMPLE, **control)
    keep = sample_blocks(depth)
    block = REPEATED_BLOCKS[loader]
    index = {k: j for j, k in enumerate(keep)}

    def renamed(items):
        for key, tensor in items:
            if key.startswith(block + "."):
                k = int(key.split(".")[1])
                if k not in index:
                    continue
                key = f"{block}.{index[k]}." + key.split(".", 2)[2]
            yield key, tensor

    _load(model, renamed(job.modules.weights(name)), job.ckpt / loader)
    return model.eval(), keep, depth


def block_scope(spec, module: torch.nn.Module, name: str) -> str:
    """The node-name scope of component `name`'s repeated blocks in its graph (as the export names it: the
    wrapper's attribute, then the blocks' module name)."""
    wrapper = spec.wrap(module)
    prefix = "" if wrapper is module else next(n for n, m in wrapper.named_children() if m is module) + "."
    return prefix + REPEATED_BLOCKS[name]


def hook_blocks(module: torch.nn.Module, name: str, keep: list[int]) -> dict:
    """{checked block: its output}, filled when `module` (with blocks `keep`, renumbered) runs."""
    outputs = {}
    for j, k in enumerate(keep):
        getattr(module, REPEATED_BLOCKS[name])[j].register_forward_hook(
            lambda m, a, o, k=k: outputs.__setitem__(k, o))
    return outputs
