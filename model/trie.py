"""The trie of valid semantic IDs as dense transition tables (numpy only: the service uses it
without torch).

`children[d][p, c]` is the id of prefix p extended by code c at depth d, or -1 if no item has
that prefix; at the last depth it is the item index. `children[0]` has one row (the empty prefix).
"""

from __future__ import annotations

import numpy as np


def trie_tables(sids: np.ndarray, codebook_size: int) -> list[np.ndarray]:
    """D int64 tables built from (N, D) unique semantic IDs; item i is reached by sids[i]."""
    n, depth = sids.shape
    if n == 0:
        raise ValueError("an empty catalogue has no trie")
    if sids.min() < 0 or sids.max() >= codebook_size:
        raise ValueError(f"semantic ID codes must lie in [0, {codebook_size})")
    prefix = np.zeros(n, dtype=np.int64)  # every item starts at the root prefix 0
    children = []
    for d in range(depth):
        pairs = prefix * codebook_size + sids[:, d]
        table = np.full((int(prefix.max()) + 1, codebook_size), -1, dtype=np.int64)
        if d == depth - 1:
            if len(np.unique(pairs)) != n:
                raise ValueError("semantic IDs are not unique")
            table.reshape(-1)[pairs] = np.arange(n)
        else:
            unique, new_prefix = np.unique(pairs, return_inverse=True)
            table.reshape(-1)[unique] = np.arange(len(unique))
            prefix = new_prefix.reshape(-1)
        children.append(table)
    return children


def taken_extras(sids: np.ndarray, prefix: np.ndarray) -> list[int]:
    """The extra-level indices (last SID column) of the items whose other codes equal
    `prefix`, ascending."""
    rows = (sids[:, :-1] == np.asarray(prefix, dtype=np.int64)).all(axis=1)
    return sorted(set(sids[rows, -1].tolist()))


def next_free_extra(sids: np.ndarray, prefix: np.ndarray, codebook_size: int) -> int:
    """Smallest extra-level index not yet used under `prefix`: where a new item with that
    prefix goes (deterministic)."""
    used = set(taken_extras(sids, prefix))
    free = next((j for j in range(codebook_size) if j not in used), None)
    if free is None:
        prefix = np.asarray(prefix, dtype=np.int64)
        raise ValueError(f"SID prefix {prefix.tolist()} already holds {codebook_size} items")
    return free
