"""A writer for the replica drills (tests/replicas): creates tokens, and
revokes one now and then, on a set of `apitokens serve` replicas in turn,
one request at a time, until stopped. Every answer is recorded; what was
acknowledged (a 200) is what must never be lost."""

from __future__ import annotations

import hashlib
import http.client
import random
import threading
import time
from dataclasses import dataclass

from testkit.clients import request
from testkit.controlplane import APP, create, tokens_path
from testkit.harness import poll, remember_secret
from testkit.load import Load, Sample, bad_answers
from testkit.timing import limit


@dataclass(frozen=True)
class Answer:
    sent: float
    answered: float
    replica: str
    op: str  # create | revoke
    status: int | str  # an HTTP status, or "error: ..." without an answer
    message: str = ""
    retry_after: str | None = None
    applied: str | None = None  # x-apitokens-applied of a 200


class Writer:
    """One thread per replica of `planes`, each writing there one request at
    a time (so that one write held up, e.g. waiting for Envoys, does not stop
    the others), until stopped."""

    def __init__(self, planes, owner: str, tag: str, pause: float = 0.02):
        self.planes, self.owner, self.tag, self.pause = planes, owner, tag, pause
        self.created: dict[str, str] = {}  # acknowledged creates still live: token id -> secret
        self.revoked: dict[str, str] = {}  # acknowledged revokes: token id -> secret
        # Revokes without a 200 (a 503 after the commit, a lost answer): the
        # token may be gone or not; it is neither checked nor revoked again.
        self.uncertain: dict[str, str] = {}
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(p,), daemon=True) for p in planes]

    def __enter__(self) -> "Writer":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(limit(30))
            assert not t.is_alive(), "the writer hangs"

    def _run(self, plane) -> None:
        mine: list[str] = []  # this thread's live creates: only it revokes them
        n = 0
        deadline = time.monotonic() + limit(120)  # bounded, whatever happens
        while not self._stop.is_set() and time.monotonic() < deadline:
            n += 1
            sent = time.time()
            if n % 3 == 0 and mine:
                token_id = mine[0]
                op, method, path, body = "revoke", "DELETE", tokens_path(token=token_id), None
            else:
                token_id = f"{self.tag}-{plane.name}-{n}"
                body = {"name": f"namespaces/default/apitokens/{token_id}", "role": "viewer"}
                op, method, path = "create", "POST", tokens_path()
            try:
                r = request(plane.api_port, method, path, self.owner, body, timeout=15)
            except (OSError, http.client.HTTPException) as exc:
                with self._lock:
                    self.answers.append(Answer(sent, time.time(), plane.name, op, f"error: {exc!r}"))
                    if op == "revoke":
                        self._uncertain(token_id, mine)
                time.sleep(self.pause)
                continue
            message = ""
            if r.status != 200 and r.body.startswith(b"{"):
                message = r.json().get("message", "")
            with self._lock:
                if r.status == 200 and op == "create":
                    self.created[token_id] = remember_secret(r.json()["apiToken"]["secret"])
                    mine.append(token_id)
                elif r.status == 200:
                    self.revoked[token_id] = self.created.pop(token_id)
                    mine.remove(token_id)
                elif op == "revoke":
                    self._uncertain(token_id, mine)
                self.answers.append(Answer(sent, time.time(), plane.name, op, r.status, message,
                                           r.headers.get("retry-after"), r.headers.get("x-apitokens-applied")))
            time.sleep(self.pause)

    def _uncertain(self, token_id: str, mine: list[str]) -> None:
        self.uncertain[token_id] = self.created.pop(token_id)
        mine.remove(token_id)

    def acknowledged(self) -> int:
        return sum(1 for a in self.answers if a.status == 200)

    def check(self, render_from, envoys) -> None:
        """Every acknowledged create is in the store and accepted by every
        Envoy; every acknowledged revoke is gone from both."""
        store = {t["name"]: t for t in render_from.render()["tokens"]}
        for token_id, secret in self.created.items():
            entry = store.get(f"namespaces/default/apitokens/{token_id}")
            assert entry is not None, f"an acknowledged create is lost: {token_id}"
            assert entry["secretSha256"] == hashlib.sha256(secret.encode()).hexdigest(), token_id
            for e in envoys:
                # A worker whose delta stream is still catching up refuses
                # with 503 for a moment: a 401 would be a lost write.
                status = e.get(APP, secret).status
                deadline = time.monotonic() + limit(2.0)
                while status == 503 and time.monotonic() < deadline:
                    time.sleep(0.05)
                    status = e.get(APP, secret).status
                assert status == 200, f"{e.node}: acknowledged {token_id} refused ({status})"
        for token_id, secret in self.revoked.items():
            assert f"namespaces/default/apitokens/{token_id}" not in store, f"an acknowledged revoke is lost: {token_id}"
            for e in envoys:
                assert e.get(APP, secret).status == 401, f"{e.node}: revoked {token_id} accepted"


class GatewayLoad:
    """A steady load through every Envoy (two threads each, HTTP/1.1 and
    HTTP/2), each request with a live token, a revoked one or none, chosen at
    random: created on `planes[0]`, revoked on `planes[1]`, before the load
    starts. `stop()` returns every answer after checking that none was a 5xx
    (or missing) and each followed the configuration."""

    def __init__(self, envoys, planes, owner: str, tag: str, seed: int):
        # Every Envoy's VMs on their delta streams first: a VM whose stream is
        # still opening refuses (503) what a sibling's newer table refuses.
        for e in envoys:
            poll(lambda: any(s["node"] == e.node and s["connected"] and s.get("delta")
                             for s in planes[0].status()["envoys"]), 15, f"{e.node} on the delta channel")
        kept = create(planes[0].api_port, owner, f"{tag}-kept", "viewer").json()["apiToken"]["secret"]
        revoked = create(planes[0].api_port, owner, f"{tag}-revoked", "viewer").json()["apiToken"]["secret"]
        r = planes[1].api("DELETE", tokens_path(token=f"{tag}-revoked"), owner)
        assert r.status == 200 and r.headers["x-apitokens-applied"] == "true", r
        self.expected = {kept: 200, revoked: 401, None: 401}
        rng, choices = random.Random(seed), list(self.expected)
        self.loads = [Load(e, lambda: rng.choice(choices), threads=2, max_seconds=40) for e in envoys]
        for load in self.loads:
            load.__enter__()

    def stop(self, catching_up: tuple[float, float] | None = None) -> list[Sample]:
        """`catching_up`: a time window in which a VM may refuse with 503
        (a worker whose delta stream reconnects after a sibling applied a
        revocation); those answers are left out (`self.catching_up`)."""
        samples = [s for load in self.loads for s in load.stop()]
        self.catching_up: list[Sample] = []
        if catching_up:
            start, end = catching_up
            self.catching_up = [s for s in samples if s.status == 503 and start <= s.sent and s.answered < end]
            samples = [s for s in samples if s not in self.catching_up]
        bad = bad_answers(samples)
        assert bad == [], (f"a gateway answered 5xx (or not at all): {len(bad)} of {len(samples)}, {bad[:5]} "
                           f"(503 allowed from {catching_up})")
        wrong = [s for s in samples if s.status != self.expected[s.secret]]
        assert wrong == [], f"{len(wrong)} answers differ from the configuration: {wrong[:5]}"
        return samples
