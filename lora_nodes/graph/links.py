"""The link graph of a workflow: who links to whom, in what order nodes run, what an output needs.

One place builds it, for validation (cycles, preflight order), the scheduler (what to run, in
what order) and ComfyUI's editor files (node order, layout columns). An edge goes from the node
a link comes from to the node whose input it feeds; links to nodes that are not in the workflow
are left out (validation reports them).

The graph is a small class of our own, not networkx's: importing networkx takes a quarter of a
second, and ``lora-nodes validate`` must answer in less than half of one. The order is the one
networkx's ``lexicographical_topological_sort`` gives; networkx still lists the cycles of a workflow
that has some (Johnson's algorithm), imported only then.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

from .workflow import Link, NodeCall, Workflow

CYCLES_REPORTED = 10  # a graph of many nodes can hold exponentially many cycles: the first few tell enough


class _Bound(Protocol):
    """What a bound node (:class:`lora_nodes.graph.validate.BoundNode`) tells about its links."""

    links: Mapping[str, tuple[str, int]]  # input name -> (upstream node id, output index)


class LinkGraph:
    """Nodes (in the order they were added) and the links between them, each edge once."""

    def __init__(self, nodes: Iterable[str] = (), edges: Iterable[tuple[str, str]] = ()):
        self._upstream: dict[str, dict[str, None]] = {}  # node -> the nodes it links to (dicts keep order)
        self._downstream: dict[str, dict[str, None]] = {}  # node -> the nodes linking to it
        for node_id in nodes:
            self.add_node(node_id)
        for upstream, downstream in edges:
            self.add_edge(upstream, downstream)

    def add_node(self, node_id: str) -> None:
        self._upstream.setdefault(node_id, {})
        self._downstream.setdefault(node_id, {})

    def add_edge(self, upstream: str, downstream: str) -> None:
        self.add_node(upstream)
        self.add_node(downstream)
        self._upstream[downstream][upstream] = None
        self._downstream[upstream][downstream] = None

    def __iter__(self) -> Iterator[str]:
        return iter(self._upstream)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._upstream

    def __len__(self) -> int:
        return len(self._upstream)

    def predecessors(self, node_id: str) -> Iterator[str]:
        """The nodes ``node_id`` links to."""
        return iter(self._upstream[node_id])

    def successors(self, node_id: str) -> Iterator[str]:
        """The nodes that link to ``node_id``."""
        return iter(self._downstream[node_id])

    def edges(self) -> Iterator[tuple[str, str]]:
        return ((upstream, node_id) for node_id, ups in self._upstream.items() for upstream in ups)

    def subgraph(self, nodes: Iterable[str]) -> LinkGraph:
        """The graph of ``nodes`` alone (in this graph's order) and the links among them."""
        keep = set(nodes)
        return LinkGraph((n for n in self if n in keep),
                         ((u, d) for u, d in self.edges() if u in keep and d in keep))


def links_of(call: NodeCall) -> Iterator[Link]:
    """The links among the inputs of ``call``, in input order."""
    return (value for value in call.inputs.values() if isinstance(value, Link))


def link_edges(workflow: Workflow) -> Iterator[tuple[str, str]]:
    """(upstream, downstream) for every link to a node in the workflow, in file and input order."""
    for node_id, call in workflow.nodes.items():
        for link in links_of(call):
            if link.node in workflow.nodes:
                yield link.node, node_id


def workflow_graph(workflow: Workflow) -> LinkGraph:
    """Every node of ``workflow`` (in file order) and an edge for each of its links."""
    return LinkGraph(workflow.nodes, link_edges(workflow))


def bound_graph(bound: Mapping[str, _Bound]) -> LinkGraph:
    """Every bound node and an edge for each of its links (links to nodes that did not bind are left out)."""
    return LinkGraph(bound, ((upstream, node_id) for node_id, node in bound.items()
                             for upstream, _ in node.links.values() if upstream in bound))


class CycleError(ValueError):
    """The links form a cycle: there is no order in which every node comes after those it links to."""


def link_order(graph: LinkGraph, key: Callable[[Any], Any] | None = None) -> list[str]:
    """The nodes, each after every node it links to; ties broken by ``key`` (default: by node id),
    so the order is the same on every run. :class:`CycleError` when the links form a cycle.

    Of the nodes whose upstream nodes are all placed, the one with the smallest ``(key, position in
    the graph)`` comes next: networkx's ``lexicographical_topological_sort``, the same order.
    """
    sort_key = key or (lambda node_id: node_id)
    position = {node_id: i for i, node_id in enumerate(graph)}
    waiting = {node_id: len(list(graph.predecessors(node_id))) for node_id in graph}
    ready = [(sort_key(n), position[n], n) for n, count in waiting.items() if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        node_id = heapq.heappop(ready)[2]
        order.append(node_id)
        for downstream in graph.successors(node_id):
            waiting[downstream] -= 1
            if waiting[downstream] == 0:
                heapq.heappush(ready, (sort_key(downstream), position[downstream], downstream))
    if len(order) < len(graph):
        raise CycleError(f"the links among {sorted(n for n, count in waiting.items() if count)} form a cycle")
    return order


def needed_by(graph: LinkGraph, outputs: Iterable[str]) -> set[str]:
    """The ``outputs`` and every node they need, directly or through other nodes."""
    needed: set[str] = set()
    pending = list(outputs)
    while pending:
        node_id = pending.pop()
        if node_id not in needed:
            needed.add(node_id)
            pending.extend(graph.predecessors(node_id))
    return needed


def depths(graph: LinkGraph, order: Iterable[str]) -> dict[str, int]:
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
    try:
        link_order(workflow_graph(workflow))
        return []  # the common case, found without networkx
    except CycleError:
        import networkx as nx  # Johnson's algorithm, for the rare workflow whose links form cycles

    # the graph of the links alone (a node without links is in no cycle): its node order, the order
    # links are met in, decides where each reported cycle starts
    graph = nx.DiGraph(link_edges(workflow))
    found = []
    for cycle in nx.simple_cycles(graph):
        found.append(cycle)
        if len(found) >= limit:
            break
    return found
