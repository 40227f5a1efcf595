"""Merkle tree hashing, inclusion and consistency proofs exactly as RFC 9162 §2.1 defines them.

Leaves hash as SHA-256(0x00 || data) and interior nodes as SHA-256(0x01 || left || right), so a
leaf can never pass for a node.  The tree of ``n`` leaves splits at the largest power of two
below ``n``.  Proof *generation* reads the hashes of complete, aligned subtrees through a
``get(level, index)`` callable (node ``(level, i)`` covers leaves ``[i·2^level, (i+1)·2^level)``),
so a store that keeps those nodes answers any proof with O(log² n) reads; ``needed`` lists
them first so a database can fetch them in one query.  Proof *verification* is the iterative
algorithm of RFC 9162 §2.1.3.2 and §2.1.4.2, with a constant-time comparison of roots.
Test vectors: ``tests/vectors/merkle.json`` (the Certificate Transparency tree of 8 leaves).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Sequence

__all__ = [
    "EMPTY_ROOT",
    "Frontier",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "needed",
    "node_hash",
    "root_of",
    "subtree_hash",
    "verify_consistency",
    "verify_inclusion",
]

EMPTY_ROOT = hashlib.sha256(b"").digest()
Getter = Callable[[int, int], bytes]


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly below ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def subtree_hash(get: Getter, a: int, b: int) -> bytes:
    """MTH(D[a:b]) for a range the RFC's recursion produces (``a`` aligned to the left split)."""
    n = b - a
    if n <= 0:
        return EMPTY_ROOT
    if n & (n - 1) == 0 and a % n == 0:
        return get(n.bit_length() - 1, a // n)
    k = _split(n)
    return node_hash(subtree_hash(get, a, a + k), subtree_hash(get, a + k, b))


def inclusion_proof(get: Getter, index: int, size: int) -> list[bytes]:
    """PATH(index, D[0:size]), leaf side first (RFC 9162 §2.1.3.1)."""
    if not 0 <= index < size:
        raise ValueError("leaf index outside the tree")
    out: list[bytes] = []
    a, b = 0, size
    while b - a > 1:
        k = _split(b - a)
        if index < a + k:
            out.append(subtree_hash(get, a + k, b))
            b = a + k
        else:
            out.append(subtree_hash(get, a, a + k))
            a += k
    return out[::-1]


def consistency_proof(get: Getter, old: int, new: int) -> list[bytes]:
    """PROOF(old, D[0:new]) (RFC 9162 §2.1.4.1); empty when ``old`` is 0 or equals ``new``."""
    if not 0 <= old <= new:
        raise ValueError("a consistency proof needs 0 <= old <= new")
    if old in (0, new):
        return []
    out: list[bytes] = []
    a, b, complete = 0, new, True
    while True:
        if old - a == b - a:
            if not complete:
                out.append(subtree_hash(get, a, b))
            break
        k = _split(b - a)
        if old - a <= k:
            out.append(subtree_hash(get, a + k, b))
            b = a + k
        else:
            out.append(subtree_hash(get, a, a + k))
            a += k
            complete = False
    return out[::-1]


def needed(fn: Callable[[Getter], object]) -> list[tuple[int, int]]:
    """The ``(level, index)`` nodes ``fn(get)`` reads, in order, without real hashes."""
    keys: list[tuple[int, int]] = []

    def rec(level: int, i: int) -> bytes:
        keys.append((level, i))
        return EMPTY_ROOT

    fn(rec)
    return keys


def root_of(leaves: Iterable[bytes]) -> bytes:
    """MTH of leaf hashes given in order."""
    f = Frontier()
    for h in leaves:
        f.push(h)
    return f.root()


class Frontier:
    """The right edge of a growing tree: one complete subtree per set bit of its size.

    ``push`` appends a leaf hash and returns the interior nodes it completes as
    ``(level, index, hash)``; ``root`` is MTH of everything pushed."""

    def __init__(self, nodes: Sequence[tuple[int, int, bytes]] = ()):
        self.stack: list[tuple[int, int, bytes]] = list(nodes)
        self.size = sum(1 << lv for lv, _, _ in self.stack)

    @staticmethod
    def keys(size: int) -> list[tuple[int, int]]:
        """The ``(level, index)`` nodes that make up the frontier of a tree of ``size`` leaves."""
        out, a = [], 0
        for lv in range(size.bit_length() - 1, -1, -1):
            if size >> lv & 1:
                out.append((lv, a >> lv))
                a += 1 << lv
        return out

    def push(self, h: bytes) -> list[tuple[int, int, bytes]]:
        made = []
        self.stack.append((0, self.size, h))
        self.size += 1
        while len(self.stack) >= 2 and self.stack[-1][0] == self.stack[-2][0]:
            lv, i, right = self.stack.pop()
            _, _, left = self.stack.pop()
            node = (lv + 1, i >> 1, node_hash(left, right))
            self.stack.append(node)
            made.append(node)
        return made

    def root(self) -> bytes:
        if not self.stack:
            return EMPTY_ROOT
        r = self.stack[-1][2]
        for _, _, h in reversed(self.stack[:-1]):
            r = node_hash(h, r)
        return r


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> bool:
    """RFC 9162 §2.1.3.2: does ``proof`` place leaf hash ``leaf`` at ``index`` of the tree ``root``?"""
    if not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and hmac.compare_digest(r, root)


def verify_consistency(old: int, new: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]) -> bool:
    """RFC 9162 §2.1.4.2: is the tree ``new_root`` of ``new`` leaves an extension of ``old_root``?"""
    if not 0 <= old <= new:
        return False
    if old == new:
        return not proof and hmac.compare_digest(old_root, new_root)
    if old == 0:
        return not proof
    if not proof:
        return False
    path = list(proof)
    if old & (old - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old - 1, new - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and hmac.compare_digest(fr, old_root) and hmac.compare_digest(sr, new_root)
