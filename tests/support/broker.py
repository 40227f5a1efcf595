"""The broker as the tests build it: accounts whose Ed25519 keys sign their request tokens, a broker with one
account per role and model ``m1``, an HTTP client that signs every call."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from weightwarden.broker.service import Broker, BrokerConfig
from weightwarden.broker.storage import LocalWeightStore
from weightwarden.broker.tokens import mint
from weightwarden.keys import Ed25519Signer
from weightwarden.keys.provider import ed25519_key_id
from weightwarden.merkle import AuditLog

__all__ = ["AUD", "Account", "Http", "make_broker"]

AUD = "weightwarden-broker"


class Account:
    def __init__(self, name: str):
        self.name = name
        self.key = Ed25519PrivateKey.generate()
        self.pub = self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.kid = ed25519_key_id(self.pub)

    def token(self, method: str, path: str, **kw: Any) -> str:
        return mint(self.name, self.key, self.kid, AUD, method, path, **kw)

    def sign(self, msg: bytes) -> bytes:
        return self.key.sign(msg)


def make_broker(db_url: str, tmp_path: Path, sealed: Path, config: BrokerConfig | None = None,
                store: Any = None) -> tuple[Broker, dict[str, Account]]:  # fmt: skip
    log = AuditLog(db_url, Ed25519Signer.generate("audit-log"))
    b = Broker(db_url, store or LocalWeightStore(tmp_path / "store"), log, config or BrokerConfig(chunk=1 << 16))
    accts = {n: Account(n) for n in ("rel", "ap1", "ap2", "ap3", "loader", "aud", "reader", "rel2")}
    b.add_account("rel", "human", accts["rel"].pub, {"releaser"}, {"core"})
    b.add_account("rel2", "human", accts["rel2"].pub, {"releaser", "approver"}, {"core"})
    b.add_account("ap1", "human", accts["ap1"].pub, {"approver"}, {"core"})
    b.add_account("ap2", "human", accts["ap2"].pub, {"approver"}, {"core"})
    b.add_account("ap3", "human", accts["ap3"].pub, {"approver"}, {"other"})
    b.add_account("loader", "workload", accts["loader"].pub, {"inference-loader"}, {"core"})
    b.add_account("aud", "human", accts["aud"].pub, {"auditor"}, set())
    b.add_account("reader", "service", accts["reader"].pub, {"reader"}, {"core"})
    b.add_model("m1", "core", sealed)
    return b, accts


class Http:
    """A test client that signs a fresh request token for every call."""

    def __init__(self, broker: Broker):
        from fastapi.testclient import TestClient

        from weightwarden.broker.app import create_app

        self.c = TestClient(create_app(broker), raise_server_exceptions=False)

    def __call__(self, who: Account | None, method: str, path: str, **kw: Any) -> Any:
        headers = kw.pop("headers", {})
        if who is not None:
            headers["authorization"] = f"Bearer {who.token(method, path)}"
        return self.c.request(method, path, headers=headers, **kw)


@contextlib.contextmanager
def serving(b: Broker, uds: Path | None = None) -> Iterator[str]:
    """``b`` behind a real uvicorn server with the zero-copy protocol `warden serve` uses, on 127.0.0.1 (yields
    ``http://127.0.0.1:PORT``) or on the Unix socket ``uds`` bound as `warden serve --uds` binds it (yields
    ``unix:PATH``)."""
    import uvicorn

    from tests.support.services import free_port
    from weightwarden.broker.app import create_app
    from weightwarden.broker.unixsock import bind_unix
    from weightwarden.broker.zerocopy import ZeroCopyH11Protocol

    sock = bind_unix(uds) if uds is not None else None
    port = free_port()
    where: dict[str, Any] = {"fd": sock.fileno()} if sock is not None else {"host": "127.0.0.1", "port": port}
    server = uvicorn.Server(uvicorn.Config(create_app(b), **where, log_level="critical", http=ZeroCopyH11Protocol))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    try:
        yield f"unix:{uds}" if sock is not None else f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        th.join(10)
        if sock is not None:
            sock.close()
