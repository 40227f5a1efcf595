"""The custody agent: holds a keyring under M-of-N custody, unsealed, in memory only.

Like Vault's unseal: the agent starts *sealed*; custodians submit their shares one at a
time (``warden custody unseal``), each from their own terminal; once M distinct shares
are in, the agent rebuilds the root key, unlocks the keyring and serves wrap, unwrap and
sign to local ``warden`` commands.  Shares and keys never touch the disk.

Transport: a Unix socket ``$WARDEN_HOME/agent.sock`` (mode 0600, in a 0700 directory);
the agent reads each peer's OS user (SO_PEERCRED).  One JSON object per line each way.

Who may use which key is the key-use policy (keys/policy.py): per OS user and workload,
per key and operation; while sealed, and for every custody operation, only the agent's own
user.  Custody changes (re-share, destroy, export, policy, auditing) need a fresh quorum of
custodians' approvals of that exact change (keys/quorum.py): an unsealed agent alone
refuses them.  Every operation and every refusal is an audit event in the home's trail
(weightwarden.trail).

This module is the agent's public face; the code lives in four modules:

- ``agent_server.py``: the agent's state (:class:`AgentState`), unseal progress, key operations, policy;
- ``agent_custody.py``: custody changes (request, approve, execute under a quorum);
- ``agent_client.py``: :class:`AgentClient`, :class:`AgentKeyring` (and its provider and signer);
- ``agent_process.py``: the socket server, :func:`serve`, :func:`start`, :func:`stop`.
"""

from __future__ import annotations

from .agent_client import (
    AgentClient,
    AgentKeyring,
    AgentProvider,
    AgentSigner,
    approve,
    fetch_statement,
    under_custody,
)
from .agent_process import MAX_LINE, SOCKET, AgentRequestHandler, AgentServer, main, serve, start, stop
from .agent_server import CUSTODY_OPS, DEFAULT_IDLE_SEAL, AgentState, Caller

__all__ = [
    "CUSTODY_OPS",
    "DEFAULT_IDLE_SEAL",
    "MAX_LINE",
    "SOCKET",
    "AgentClient",
    "AgentKeyring",
    "AgentProvider",
    "AgentRequestHandler",
    "AgentServer",
    "AgentSigner",
    "AgentState",
    "Caller",
    "approve",
    "fetch_statement",
    "main",
    "serve",
    "start",
    "stop",
    "under_custody",
]

if __name__ == "__main__":  # pragma: no cover - run as a process by `start`
    main()
