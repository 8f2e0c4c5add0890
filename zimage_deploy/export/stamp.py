"""Deepen a traced graph: repeat its last repeated block until the model's real depth.

A real-size model is traced with two main layers (real width, little memory); the second layer's subgraph is
then copied for layers 2 .. N-1 with its weights renamed (`layers.1.` -> `layers.k.`) and chained output to
input. The result has the same inputs, outputs, weight names and operators as tracing the full-depth model.
"""

from __future__ import annotations

import copy

import onnx


def stamp_layers(model: onnx.ModelProto, n_layers: int, prefix: str = "layers", scope: str | None = None) -> int:
    """Grow `model` (traced with `prefix`.0 and `prefix`.1 present) to `n_layers` layers; returns how many
    layers were added. `prefix`: the layers' weight names; `scope`: their node names' scope (default: `prefix`; a
    wrapper that calls a method of the model, e.g. the Omni step, traces its layers without the model's name)."""
    graph = model.graph
    scope = scope or prefix
    tag = lambda k: f"/{scope}.{k}/"  # noqa: E731 - node and value name scope of layer k
    present = {n.name.split("/")[1] for n in graph.node if n.name.startswith(f"/{scope}.")}
    if present != {f"{scope}.0", f"{scope}.1"}:
        raise ValueError(f"stamping needs a graph traced with exactly two layers, found {sorted(present)}")
    if n_layers <= 2:
        return 0
    nodes = list(graph.node)
    l1_idx = [i for i, n in enumerate(nodes) if n.name.startswith(tag(1))]
    layer1 = [nodes[i] for i in l1_idx]
    produced = {o for n in layer1 for o in n.output}
    outside = [n for i, n in enumerate(nodes) if i not in set(l1_idx)]
    used_outside = {i for n in outside for i in n.input} | {o.name for o in graph.output}
    # The tensor layer 1 hands on is the one whose layer-0 twin layer 1 consumes (the residual stream).
    # Other layer-1 values used outside are common subexpressions the exporter shared (e.g. one cast of
    # the timestep embedding); they stay where they are.
    consumed_by_l1 = {i for n in layer1 for i in n.input}
    twins = {n.name: n for n in nodes if n.name.startswith(tag(0))}
    chained = []
    for v in sorted(v for v in produced if v in used_outside):
        producer = next(n for n in layer1 if v in n.output)
        twin = twins.get(producer.name.replace(tag(1), tag(0)))
        if twin is not None and twin.output[list(producer.output).index(v)] in consumed_by_l1:
            chained.append((v, twin.output[list(producer.output).index(v)]))
    if len(chained) != 1:
        raise ValueError(f"cannot tell layer 1's output among {sorted(v for v in produced if v in used_outside)}")
    x_out, x_in = chained[0]
    graph_output = x_out if x_out in {o.name for o in graph.output} else None
    if graph_output:  # the last layer feeds the graph output: keep that name for the deepest copy
        x_out = tag(1) + "stamped_output_0"
        for n in layer1:
            n.output[:] = [x_out if o == graph_output else o for o in n.output]
        produced = {o for n in layer1 for o in n.output}
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
    if graph_output:
        for node in new_nodes:
            node.output[:] = [graph_output if o == last else o for o in node.output]
        last = graph_output
    for node in outside:
        node.input[:] = [last if i == x_out else i for i in node.input]
    insert_at = l1_idx[-1] + 1
    ordered = topological(nodes[:insert_at] + new_nodes + nodes[insert_at:],
                          {i.name for i in graph.input} | {t.name for t in graph.initializer})
    del graph.node[:]
    graph.node.extend(ordered)
    # value_info of layer 1's inner tensors is not copied: shape inference rebuilds it
    return n_layers - 2


def topological(nodes: list, available: set[str]) -> list:
    """Nodes in an order where each runs after the producers of its inputs (stable for ready nodes)."""
    available = set(available) | {""}
    waiting, ordered = list(nodes), []
    while waiting:
        rest = []
        for node in waiting:
            if all(i in available for i in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(waiting):
            raise ValueError(f"graph has a cycle or a missing input near {rest[0].name}")
        waiting = rest
    return ordered
