"""The kill -9 drill: a loop of creates, regenerates and revokes against the
real control plane, SIGKILLed at a random moment; after each restart the store
and Envoy are compared with what the API acknowledged.

The model holds what the API acknowledged (a 2xx answer). The operation in
flight at the kill is unacknowledged: the store must show it either wholly
applied or not at all (never a half: a token without its role, a regenerated
token with the old digest gone but no new one, ...). An operation whose
connection was refused (sent after the kill) must not be applied. Envoy, once
it has acknowledged the restarted control plane's version, must enforce the
store: known live secrets 200, every revoked or replaced secret 401.
"""

from __future__ import annotations

import hashlib
import http.client
import random
import signal
import threading
import time
from dataclasses import dataclass, field

from testkit.clients import request
from testkit.controlplane import APP, ControlPlane, tokens_path
from testkit.harness import poll, remember_secret
from testkit.timing import limit


def sha(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def full_name(token_id: str) -> str:
    return f"namespaces/default/apitokens/{token_id}"


@dataclass
class Tok:
    id: str
    role: str
    secret: str | None  # None: issued by an unacknowledged create or regenerate (never shown)


@dataclass
class Op:
    kind: str  # create | regenerate | revoke
    token_id: str
    role: str = ""
    old_secret: str | None = None
    error: str = ""  # why no answer came
    refused: bool = False  # the connection was refused: never sent


@dataclass
class Figures:
    kills: int = 0
    acknowledged: int = 0
    in_flight_applied: int = 0
    in_flight_not_applied: int = 0
    refused: int = 0
    between_operations: int = 0
    converge: list[float] = field(default_factory=list)  # restart -> Envoy acknowledges its version (s)

    def line(self) -> str:
        c = sorted(self.converge)
        return (f"{self.kills} kills, {self.acknowledged} acknowledged operations all kept; "
                f"operation in flight at the kill: applied whole {self.in_flight_applied}, "
                f"not applied {self.in_flight_not_applied}, refused (after the kill) {self.refused}, "
                f"none {self.between_operations}; restart to Envoy's ACK of the store's version: "
                f"median {c[len(c) // 2]:.2f} s, max {c[-1]:.2f} s")


class Drill:
    def __init__(self, cp: ControlPlane, envoy, node: str, rng: random.Random):
        self.cp, self.envoy, self.node, self.rng = cp, envoy, node, rng
        self.owner = cp.owners["default"]
        # Tokens other tests left in the namespace: they must stay as they are.
        self.baseline = set(self.store())
        self.tag = format(rng.randrange(1 << 24), "x")  # token ids of this drill: k<tag>-<n>
        self.live: dict[str, Tok] = {}
        self.dead: list[str] = []  # revoked or replaced secrets: 401 for ever
        self.next_id = 0
        self.figures = Figures()

    # -- the operation loop -------------------------------------------------

    def choose(self) -> Op:
        r = self.rng.random()
        known = sorted(t.id for t in self.live.values() if t.secret is not None)
        if len(self.live) < 3 or r < 0.4 or (r < 0.7 and not known):
            self.next_id += 1
            return Op("create", f"k{self.tag}-{self.next_id}", role=self.rng.choice(["viewer", "editor", "owner"]))
        # A regenerate is judged by its old digest: only of tokens whose secret is known.
        tok = self.live[self.rng.choice(known if r < 0.7 else sorted(self.live))]
        return Op("regenerate" if r < 0.7 else "revoke", tok.id, role=tok.role, old_secret=tok.secret)

    def perform(self, op: Op):
        if op.kind == "create":
            body = {"name": full_name(op.token_id), "role": op.role}
            return request(self.cp.api_port, "POST", tokens_path(), self.owner, body)
        if op.kind == "regenerate":
            return request(self.cp.api_port, "POST", tokens_path(token=f"{op.token_id}:regenerate"), self.owner)
        return request(self.cp.api_port, "DELETE", tokens_path(token=op.token_id), self.owner)

    def acknowledged(self, op: Op, r) -> None:
        assert r.status == 200, (op, r)
        self.figures.acknowledged += 1
        if op.kind == "revoke":
            del self.live[op.token_id]
            self._dead(op.old_secret)
            return
        secret = remember_secret(r.json()["apiToken"]["secret"])
        if op.kind == "regenerate":
            self._dead(op.old_secret)
        self.live[op.token_id] = Tok(op.token_id, op.role, secret)

    def _dead(self, secret: str | None) -> None:
        if secret:
            self.dead.append(secret)

    def loop(self, holder: list, stop: threading.Event) -> None:
        """Operations one after another until one gets no answer (the kill)."""
        while not stop.is_set():
            op = self.choose()
            holder[0] = op
            try:
                r = self.perform(op)
            except ConnectionRefusedError as exc:
                op.error, op.refused = repr(exc), True
                return
            except (OSError, http.client.HTTPException) as exc:
                op.error = repr(exc)
                return
            self.acknowledged(op, r)
            holder[0] = None

    # -- one round: run, kill, restart, check -------------------------------

    def round(self, max_delay: float = 0.4) -> None:
        holder: list = [None]
        stop = threading.Event()
        worker = threading.Thread(target=self.loop, args=(holder, stop), daemon=True)
        worker.start()
        time.sleep(self.rng.uniform(0.02, max_delay))
        self.cp.stop(signal.SIGKILL)
        self.figures.kills += 1
        worker.join(limit(15))
        stop.set()
        assert not worker.is_alive(), "the operation loop hangs after the kill"
        restarted = time.monotonic()
        self.cp.start()
        version = int(self.cp.status()["version"])
        poll(lambda: int(self.cp.envoy_status(self.node).get("ackedVersion") or 0) >= version,
             15, f"Envoy acknowledges version {version}")
        self.figures.converge.append(time.monotonic() - restarted)
        self.check_store(holder[0])
        self.check_envoy()

    def store(self) -> dict[str, dict]:
        """The namespace's tokens as the store has them (`apitokens render`)."""
        return {t["name"]: t for t in self.cp.render()["tokens"] if t["name"].startswith(full_name(""))}

    def check_store(self, op: Op | None) -> None:
        store = self.store()
        listed = request(self.cp.api_port, "GET", tokens_path(), self.owner).json()["apiTokens"]
        # The pushed configuration is the API's list less the expired tokens.
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        current = [t["name"] for t in listed if t.get("expireTime", "9999") > now]
        assert sorted(store) == current, "the API and the pushed configuration differ"
        if op is None:
            self.figures.between_operations += 1
        else:
            self.settle(op, store.get(full_name(op.token_id)))
        expected = {full_name(t.id) for t in self.live.values()} | self.baseline
        assert set(store) == expected, f"store {sorted(store)} != acknowledged {sorted(expected)} (in flight: {op})"
        for tok in self.live.values():
            entry = store[full_name(tok.id)]
            assert entry["role"] == tok.role, (tok, entry)
            if tok.secret is not None:
                assert entry["secretSha256"] == sha(tok.secret), f"{tok.id}: an acknowledged secret was lost"

    def settle(self, op: Op, entry: dict | None) -> None:
        """The unacknowledged operation: wholly applied or not at all; the
        model follows what the store shows."""
        if op.kind == "create":
            applied = entry is not None
            if applied:
                assert entry["role"] == op.role, (op, entry)
                self.live[op.token_id] = Tok(op.token_id, op.role, None)
        elif op.kind == "revoke":
            applied = entry is None
            if applied:
                del self.live[op.token_id]
                self._dead(op.old_secret)
            else:
                assert op.old_secret is None or entry["secretSha256"] == sha(op.old_secret), (op, entry)
        else:
            assert entry is not None and entry["role"] == op.role, f"regenerate half-applied: {op} {entry}"
            applied = entry["secretSha256"] != sha(op.old_secret)
            if applied:
                self.live[op.token_id] = Tok(op.token_id, op.role, None)
                self._dead(op.old_secret)
        if op.refused:
            assert not applied, f"an operation that was never sent is in the store: {op}"
            self.figures.refused += 1
        elif applied:
            self.figures.in_flight_applied += 1
        else:
            self.figures.in_flight_not_applied += 1

    def check_envoy(self) -> None:
        """Envoy (which acknowledged the restarted control plane's version) enforces the store."""
        for tok in self.live.values():
            if tok.secret is not None:
                r = request(self.envoy.port, "GET", APP, tok.secret)
                assert r.status == 200, f"{tok.id}: a live secret refused: {r}"
        for secret in self.dead[-40:]:
            r = request(self.envoy.port, "GET", APP, secret)
            assert r.status == 401, f"a revoked or replaced secret answered {r}"
