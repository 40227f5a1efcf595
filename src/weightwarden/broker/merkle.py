"""Moved: see :mod:`weightwarden.merkle.tree` (this shim goes after the issue-19 merge)."""

from ..merkle.tree import (  # noqa: F401  moved: see weightwarden.merkle.tree
    EMPTY_ROOT,
    Frontier,
    Getter,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    needed,
    node_hash,
    root_of,
    subtree_hash,
    verify_consistency,
    verify_inclusion,
)
