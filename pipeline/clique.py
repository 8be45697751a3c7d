"""The largest clique of a "these two samples are near-copies" graph.

The paper flags a prompt when many of its samples are all pairwise close: a clique. Finding a
maximum clique is NP-hard in general, but the graphs here are small (hundreds of samples) and
of two easy kinds: sparse (a normal prompt, its samples differ) or made of one dense cluster
(a memorized prompt, its samples are copies of each other). Three steps keep both fast:

1. a greedy lower bound: from each vertex, in order of degree, grow a clique by repeatedly
   adding the candidate with the most neighbours among the remaining candidates. On a dense
   cluster this usually finds the maximum clique at once;
2. pruning: a vertex of degree below the best size found cannot be part of a larger clique,
   so such vertices are dropped, repeatedly (a k-core);
3. an exact branch and bound over what is left (vertex sets as Python integer bitsets, a greedy
   colouring as the upper bound), with a budget of ``max_steps`` search nodes. When the
   budget runs out, the best clique found so far is returned with ``exact=False``: the size
   is then a lower bound, which is still a sound reason to flag a prompt.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

MAX_STEPS = 200_000


@dataclass
class CliqueResult:
    """A clique: vertex indices in increasing order; ``exact`` when proven maximum."""

    members: list[int]
    exact: bool

    @property
    def size(self) -> int:
        return len(self.members)


class _BudgetExhausted(Exception):
    pass


def _bits(indices) -> int:
    mask = 0
    for i in indices:
        mask |= 1 << int(i)
    return mask


def _members(mask: int) -> list[int]:
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


def _greedy_clique(neighbours: list[int], start: int) -> list[int]:
    """Grow a clique from ``start``, always adding the candidate with most candidate neighbours."""
    clique = [start]
    candidates = neighbours[start]
    while candidates:
        best, best_degree = -1, -1
        for v in _members(candidates):
            degree = (neighbours[v] & candidates).bit_count()
            if degree > best_degree:
                best, best_degree = v, degree
        clique.append(best)
        candidates &= neighbours[best]
    return clique


def _colour_order(candidates: int, neighbours: list[int]) -> tuple[list[int], list[int]]:
    """Greedy sequential colouring of ``candidates``; returns vertices and their colour numbers.

    Vertices of one colour are pairwise non-adjacent, so a clique among the vertices up to
    position ``i`` has at most ``colours[i]`` members: the bound of the search.
    """
    order, colours = [], []
    uncoloured, colour = candidates, 0
    while uncoloured:
        colour += 1
        available = uncoloured
        while available:
            low = available & -available
            v = low.bit_length() - 1
            available &= ~neighbours[v] & ~low
            uncoloured &= ~low
            order.append(v)
            colours.append(colour)
    return order, colours


def max_clique(adjacency: np.ndarray, max_steps: int = MAX_STEPS) -> CliqueResult:
    """A maximum clique of an undirected graph.

    Args:
        adjacency: (n, n) boolean matrix; symmetric, the diagonal is ignored.
        max_steps: search nodes the exact phase may visit before giving up on proving
            optimality (see the module docstring).

    Returns:
        The clique; empty only when ``n == 0``.
    """
    adjacency = np.asarray(adjacency, dtype=bool)
    n = adjacency.shape[0]
    if adjacency.shape != (n, n):
        raise ValueError(f"adjacency must be square, got shape {adjacency.shape}")
    if n == 0:
        return CliqueResult([], exact=True)
    if not np.array_equal(adjacency, adjacency.T):
        raise ValueError("adjacency must be symmetric")
    adjacency = adjacency.copy()
    np.fill_diagonal(adjacency, False)
    neighbours = [_bits(np.flatnonzero(row)) for row in adjacency]
    degrees = adjacency.sum(axis=1)

    # 1. Greedy lower bound, from every vertex in order of degree (cheap at this size).
    best: list[int] = [int(np.argmax(degrees))]
    for start in np.argsort(-degrees, kind="stable"):
        if degrees[start] + 1 <= len(best):
            break  # no clique through this vertex (or any later one) can beat ``best``
        clique = _greedy_clique(neighbours, int(start))
        if len(clique) > len(best):
            best = clique

    # 2. k-core pruning: only vertices of degree >= len(best) can be in a larger clique.
    alive = (1 << n) - 1
    while True:
        weak = [v for v in _members(alive) if (neighbours[v] & alive).bit_count() < len(best)]
        if not weak:
            break
        alive &= ~_bits(weak)
    if not alive:
        return CliqueResult(sorted(best), exact=True)

    # 3. Exact branch and bound over the surviving vertices.
    pruned = [neighbours[v] & alive for v in range(n)]
    state = {"best": best, "steps": 0}

    def expand(clique: list[int], candidates: int) -> None:
        state["steps"] += 1
        if state["steps"] > max_steps:
            raise _BudgetExhausted
        order, colours = _colour_order(candidates, pruned)
        for v, colour in zip(reversed(order), reversed(colours)):
            if len(clique) + colour <= len(state["best"]):
                return
            grown = clique + [v]
            rest = candidates & pruned[v]
            if rest:
                expand(grown, rest)
            elif len(grown) > len(state["best"]):
                state["best"] = grown
            candidates &= ~(1 << v)

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, n + 200))  # the search is as deep as the clique is large
    try:
        expand([], alive)
        exact = True
    except _BudgetExhausted:
        exact = False
    finally:
        sys.setrecursionlimit(limit)
    return CliqueResult(sorted(int(v) for v in state["best"]), exact=exact)
