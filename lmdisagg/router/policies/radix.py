"""An approximate multi-tenant radix tree over token ids (the ``prefix_tree`` baseline's memory).

It remembers which prompts the router itself sent to which worker (tenant); it never hears of the
worker's own evictions, so it is an approximation of the real caches. Each tenant is bounded to
``max_tokens`` tokens; past that its least recently used leaves are dropped.

    root ── [t0 t1 t2 t3] ── [t4 t5] {w1}          edges hold token runs (int64 arrays);
        │                └── [t9 t7 t8] {w2}       a node lists its tenants with their last use
        └── [u0 u1 ...]  {w1, w3}                  tenants are prefix-closed: on a node => on
                                                   every ancestor
"""
from __future__ import annotations

import heapq
from typing import Sequence

import numpy as np


class _Node:
    __slots__ = ("edge", "children", "parent", "tenants")

    def __init__(self, edge: np.ndarray, parent: "_Node | None"):
        self.edge = edge                            # tokens on the edge into this node: [n] int64
        self.children: dict[int, _Node] = {}        # first token of the child's edge -> child
        self.parent = parent
        self.tenants: dict[str, int] = {}           # tenant -> logical time of last use


def _common(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    eq = a[:n] == b[:n]
    return n if eq.all() else int(eq.argmin())


class RadixTree:
    def __init__(self, max_tokens: int = 1 << 24):
        self.max_tokens = max_tokens
        self.root = _Node(np.empty(0, np.int64), None)
        self.size: dict[str, int] = {}       # tenant -> tokens held
        self._clock = 0
        self._lru: list[tuple[int, int, _Node, str]] = []  # (time, tiebreak, leaf, tenant), lazy
        self._tb = 0

    def match(self, tokens: Sequence[int]) -> dict[str, int]:
        """Per tenant, how many leading ``tokens`` the tree says it holds (no side effects)."""
        t = np.asarray(tokens, np.int64)
        out: dict[str, int] = {}
        node, i = self.root, 0
        while i < len(t):
            child = node.children.get(int(t[i]))
            if child is None:
                break
            k = _common(child.edge, t[i:])
            for ten in child.tenants:
                out[ten] = i + k
            if k < len(child.edge):
                break
            node, i = child, i + k
        return out

    def insert(self, tokens: Sequence[int], tenant: str) -> None:
        """Record that ``tenant`` now holds ``tokens``; then evict its LRU leaves past max_tokens."""
        t = np.asarray(tokens, np.int64)
        self._clock += 1
        now = self._clock
        node, i = self.root, 0
        while i < len(t):
            child = node.children.get(int(t[i]))
            if child is None:
                child = _Node(t[i:].copy(), node)
                node.children[int(t[i])] = child
            k = _common(child.edge, t[i:])
            if k < len(child.edge):
                child = self._split(child, k)
            if tenant not in child.tenants:
                self.size[tenant] = self.size.get(tenant, 0) + len(child.edge)
            child.tenants[tenant] = now
            node, i = child, i + k
        if node is not self.root:
            self._tb += 1
            heapq.heappush(self._lru, (now, self._tb, node, tenant))
        self._evict(tenant)

    def _split(self, child: _Node, k: int) -> _Node:
        """Cut ``child``'s edge after k tokens; returns the new upper node."""
        parent = child.parent
        mid = _Node(child.edge[:k], parent)
        mid.tenants = dict(child.tenants)
        parent.children[int(child.edge[0])] = mid
        child.edge = child.edge[k:]
        child.parent = mid
        mid.children[int(child.edge[0])] = child
        return mid

    def _evict(self, tenant: str) -> None:
        while self.size.get(tenant, 0) > self.max_tokens and self._lru:
            when, _, node, ten = heapq.heappop(self._lru)
            if ten not in node.tenants or node.tenants[ten] != when or \
                    any(ten in c.tenants for c in node.children.values()):
                continue  # stale entry: used again later, already gone, or no longer a leaf
            self._drop(node, ten)

    def _drop(self, node: _Node, tenant: str) -> None:
        """Remove ``tenant`` from leaf ``node``; its parent may become its new LRU leaf."""
        del node.tenants[tenant]
        self.size[tenant] -= len(node.edge)
        parent = node.parent
        if not node.tenants and not node.children:
            del parent.children[int(node.edge[0])]
        if parent is not self.root and tenant in parent.tenants and \
                not any(tenant in c.tenants for c in parent.children.values()):
            self._tb += 1
            heapq.heappush(self._lru, (parent.tenants[tenant], self._tb, parent, tenant))

    def remove_tenant(self, tenant: str) -> None:
        """Forget a tenant everywhere (a worker left)."""
        order, stack = [], [self.root]
        while stack:
            n = stack.pop()
            order.append(n)
            stack.extend(n.children.values())
        for n in reversed(order):  # children before parents, so emptied chains go entirely
            if n.tenants.pop(tenant, None) is not None and not n.tenants and not n.children:
                del n.parent.children[int(n.edge[0])]
        self.size.pop(tenant, None)
