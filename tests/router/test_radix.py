"""The prefix_tree baseline's approximate radix tree, checked against brute force."""
from __future__ import annotations

import random

from lmdisagg.router.policies.radix import RadixTree


def common(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tenant_tokens(tree: RadixTree, tenant: str) -> int:
    total, stack = 0, [tree.root]
    while stack:
        n = stack.pop()
        stack.extend(n.children.values())
        if tenant in n.tenants:
            total += len(n.edge)
    return total


def test_match_equals_brute_force_longest_common_prefix():
    rng = random.Random(3)
    tree, seen = RadixTree(), {"a": [], "b": []}
    heads = [[rng.randrange(50) for _ in range(rng.randrange(1, 30))] for _ in range(6)]
    for _ in range(200):
        seq = rng.choice(heads) + [rng.randrange(50) for _ in range(rng.randrange(0, 20))]
        probe = rng.choice(heads) + [rng.randrange(50) for _ in range(rng.randrange(0, 20))]
        want = {t: max(common(s, probe) for s in ss) for t, ss in seen.items() if ss}
        got = tree.match(probe)
        assert {t: got.get(t, 0) for t in want} == want
        t = rng.choice("ab")
        tree.insert(seq, t)
        seen[t].append(seq)
    for t in "ab":
        assert tree.size[t] == tenant_tokens(tree, t)


def test_lru_eviction_keeps_each_tenant_under_its_budget_and_drops_oldest_first():
    tree = RadixTree(max_tokens=100)
    old = list(range(0, 60))
    shared = list(range(1000, 1030))
    tree.insert(old, "a")
    tree.insert(shared + [1, 2, 3], "a")
    tree.insert(shared + [7, 8, 9], "a")          # 60 + 33 + 3 = 96 tokens
    assert tree.size["a"] == 96
    tree.insert(list(range(500, 520)), "a")        # 116 > 100: the oldest leaf (old) goes
    assert tree.size["a"] <= 100 and tree.size["a"] == tenant_tokens(tree, "a")
    assert tree.match(old).get("a", 0) == 0
    assert tree.match(shared + [7, 8, 9])["a"] == 33
    tree.insert(old, "b")
    tree.remove_tenant("a")
    assert tree.match(shared).get("a") is None and "a" not in tree.size
    assert tree.match(old) == {"b": 60}
    assert list(tree.root.children) == [0]        # a's emptied branches are gone
