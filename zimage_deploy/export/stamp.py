"""Deepen a traced graph: repeat its last repeated block until the model's real depth.

A real-size model is traced with two main layers (real width, little memory); the second layer's subgraph is
then copied for layers 2 .. N-1 with its weights renamed (`layers.1.` -> `layers.k.`) and chained output to
input. The result has the same inputs, outputs, weight names and operators as tracing the full-depth model.
"""

from __future__ import annotations

import copy

import onnx


def stamp_layers(model: onnx.ModelProto, n_layers: int, prefix: str = "layers") -> int:
    """Grow `model` (traced with `prefix`.0 and `prefix`.1 present) to `n_layers` layers; returns how many
    layers were added."""
    graph = model.graph
    tag = lambda k: f"/{prefix}.{k}/"  # noqa: E731 - node and value name scope of layer k
    present = {n.name.split("/")[1] for n in graph.node if n.name.startswith(f"/{prefix}.")}
    if present != {f"{prefix}.0", f"{prefix}.1"}:
        raise ValueError(f"stamping needs a graph traced with exactly two layers, found {sorted(present)}")
    if n_layers <= 2:
        return 0
    nodes = list(graph.node)
    l1_idx = [i for i, n in enumerate(nodes) if n.name.startswith(tag(1))]
    if l1_idx != list(range(l1_idx[0], l1_idx[-1] + 1)):
        raise ValueError("layer 1's nodes are not contiguous in the graph")
    layer1 = [nodes[i] for i in l1_idx]
    produced = {o for n in layer1 for o in n.output}
    outside = [n for i, n in enumerate(nodes) if i not in set(l1_idx)]
    used_outside = {i for n in outside for i in n.input} | {o.name for o in graph.output}
    outs = [v for v in produced if v in used_outside]
    if len(outs) != 1:
        raise ValueError(f"layer 1 should hand one tensor to the rest of the graph, found {outs}")
    x_out = outs[0]
    x_in = x_out.replace(tag(1), tag(0))
    if x_in not in {i for n in layer1 for i in n.input}:
        raise ValueError(f"cannot find layer 1's input ({x_in})")
    weight_inputs = {i.name: i for i in graph.input if i.name.startswith(f"{prefix}.1.")}

    def renamed(value: str, k: int) -> str:
        if value in weight_inputs:
            return f"{prefix}.{k}." + value[len(f"{prefix}.1."):]
        if value in produced:
            return value.replace(tag(1), tag(k)) if tag(1) in value else f"{value}__{prefix}.{k}"
        return value

    new_nodes, prev_out = [], x_out
    for k in range(2, n_layers):
        for node in layer1:
            clone = copy.deepcopy(node)
            clone.name = node.name.replace(tag(1), tag(k))
            clone.input[:] = [prev_out if i == x_in else renamed(i, k) for i in node.input]
            clone.output[:] = [renamed(o, k) for o in node.output]
            new_nodes.append(clone)
        for vi in weight_inputs.values():
            extra = copy.deepcopy(vi)
            extra.name = renamed(vi.name, k)
            graph.input.append(extra)
        prev_out = renamed(x_out, k)
    last = prev_out
    for node in outside:
        node.input[:] = [last if i == x_out else i for i in node.input]
    for out in graph.output:
        if out.name == x_out:
            out.name = last
    insert_at = l1_idx[-1] + 1
    del graph.node[:]
    graph.node.extend(nodes[:insert_at] + new_nodes + nodes[insert_at:])
    # value_info of layer 1's inner tensors is not copied: shape inference rebuilds it
    return n_layers - 2
