"""A writer for the replica drills (tests/replicas): creates tokens, and
revokes one now and then, on a set of `apitokens serve` replicas in turn,
one request at a time, until stopped. Every answer is recorded; what was
acknowledged (a 200) is what must never be lost."""

from __future__ import annotations

import hashlib
import http.client
import threading
import time
from dataclasses import dataclass

from testkit.clients import request
from testkit.controlplane import APP, tokens_path
from testkit.harness import remember_secret


@dataclass(frozen=True)
class Answer:
    sent: float
    answered: float
    replica: str
    op: str  # create | revoke
    status: int | str  # an HTTP status, or "error: ..." without an answer
    message: str = ""
    retry_after: str | None = None


class Writer:
    def __init__(self, planes, owner: str, tag: str, pause: float = 0.02):
        self.planes, self.owner, self.tag, self.pause = planes, owner, tag, pause
        self.created: dict[str, str] = {}  # acknowledged creates still live: token id -> secret
        self.revoked: dict[str, str] = {}  # acknowledged revokes: token id -> secret
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Writer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "the writer hangs"

    def _run(self) -> None:
        n = 0
        deadline = time.monotonic() + 120  # bounded, whatever happens
        while not self._stop.is_set() and time.monotonic() < deadline:
            plane = self.planes[n % len(self.planes)]
            n += 1
            sent = time.time()
            if n % 3 == 0 and self.created:
                token_id = next(iter(self.created))
                op, method, path, body = "revoke", "DELETE", tokens_path(token=token_id), None
            else:
                token_id = f"{self.tag}-{n}"
                body = {"name": f"namespaces/default/apitokens/{token_id}", "role": "viewer"}
                op, method, path = "create", "POST", tokens_path()
            try:
                r = request(plane.api_port, method, path, self.owner, body, timeout=15)
            except (OSError, http.client.HTTPException) as exc:
                self.answers.append(Answer(sent, time.time(), plane.name, op, f"error: {exc!r}"))
                time.sleep(self.pause)
                continue
            message = ""
            if r.status == 200 and op == "create":
                self.created[token_id] = remember_secret(r.json()["apiToken"]["secret"])
            elif r.status == 200:
                self.revoked[token_id] = self.created.pop(token_id)
            elif r.body.startswith(b"{"):
                message = r.json().get("message", "")
            self.answers.append(Answer(sent, time.time(), plane.name, op, r.status, message,
                                       r.headers.get("retry-after")))
            time.sleep(self.pause)

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
                assert e.get(APP, secret).status == 200, f"{e.node}: acknowledged {token_id} refused"
        for token_id, secret in self.revoked.items():
            assert f"namespaces/default/apitokens/{token_id}" not in store, f"an acknowledged revoke is lost: {token_id}"
            for e in envoys:
                assert e.get(APP, secret).status == 401, f"{e.node}: revoked {token_id} accepted"
