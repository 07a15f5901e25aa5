"""The link graph of a workflow: who links to whom, in what order nodes run, what an output needs.

One place builds it, for validation (cycles, preflight order), the scheduler (what to run, in
what order) and ComfyUI's editor files (node order, layout columns). An edge goes from the node
a link comes from to the node whose input it feeds; links to nodes that are not in the workflow
are left out (validation reports them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

import networkx as nx

from .workflow import Link, NodeCall, Workflow

CYCLES_REPORTED = 10  # a graph of many nodes can hold exponentially many cycles: the first few tell enough


class _Bound(Protocol):
    """What a bound node (:class:`lora_nodes.graph.validate.BoundNode`) tells about its links."""

    links: Mapping[str, tuple[str, int]]  # input name -> (upstream node id, output index)


def links_of(call: NodeCall) -> Iterator[Link]:
    """The links among the inputs of ``call``, in input order."""
    return (value for value in call.inputs.values() if isinstance(value, Link))


def link_edges(workflow: Workflow) -> Iterator[tuple[str, str]]:
    """(upstream, downstream) for every link to a node in the workflow, in file and input order."""
    for node_id, call in workflow.nodes.items():
        for link in links_of(call):
            if link.node in workflow.nodes:
                yield link.node, node_id


def workflow_graph(workflow: Workflow) -> nx.DiGraph:
    """Every node of ``workflow`` (in file order) and an edge for each of its links."""
    graph = nx.DiGraph()
    graph.add_nodes_from(workflow.nodes)
    graph.add_edges_from(link_edges(workflow))
    return graph


def bound_graph(bound: Mapping[str, _Bound]) -> nx.DiGraph:
    """Every bound node and an edge for each of its links (links to nodes that did not bind are left out)."""
    graph = nx.DiGraph()
    graph.add_nodes_from(bound)
    for node_id, node in bound.items():
        graph.add_edges_from((upstream, node_id) for upstream, _ in node.links.values() if upstream in bound)
    return graph


def link_order(graph: nx.DiGraph, key: Callable[[Any], Any] | None = None) -> list[str]:
    """The nodes, each after every node it links to; ties broken by ``key`` (default: by node id),
    so the order is the same on every run."""
    return list(nx.lexicographical_topological_sort(graph, key=key))


def needed_by(graph: nx.DiGraph, outputs: Iterable[str]) -> set[str]:
    """The ``outputs`` and every node they need, directly or through other nodes."""
    needed: set[str] = set()
    for node_id in outputs:
        needed |= {node_id} | nx.ancestors(graph, node_id)
    return needed


def depths(graph: nx.DiGraph, order: Iterable[str]) -> dict[str, int]:
    """Each node's depth: the longest path to it from a node without inputs (``order``: a link order)."""
    depth: dict[str, int] = {}
    for node_id in order:
        depth[node_id] = max((depth[p] + 1 for p in graph.predecessors(node_id)), default=0)
    return depth


def users(calls: Mapping[str, NodeCall]) -> dict[str, list[str]]:
    """For each node linked to, the nodes whose inputs link to it (once per link, in order)."""
    found: dict[str, list[str]] = {}
    for node_id, call in calls.items():
        for link in links_of(call):
            found.setdefault(link.node, []).append(node_id)
    return found


def cycles(workflow: Workflow, limit: int = CYCLES_REPORTED) -> list[list[str]]:
    """Up to ``limit`` cycles the links of ``workflow`` form, each as its nodes in link order."""
    # the graph of the links alone (a node without links is in no cycle): its node order, the order
    # links are met in, decides where each reported cycle starts
    graph = nx.DiGraph(link_edges(workflow))
    found = []
    for cycle in nx.simple_cycles(graph):
        found.append(cycle)
        if len(found) >= limit:
            break
    return found
