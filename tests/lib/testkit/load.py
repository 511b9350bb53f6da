"""A bounded load generator: threads sending requests through Envoy over
HTTP/1.1 and HTTP/2 (keep-alive testkit.clients.Client), each request with
the secret a `pick` function chooses at that moment. Every answer is recorded
with the times it was sent and answered (wall clock, as the filter's)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

import httpx

from testkit.clients import Client
from testkit.controlplane import APP
from testkit.timing import limit


@dataclass(frozen=True)
class Sample:
    secret: str | None
    sent: float
    answered: float
    status: int | str  # an HTTP status, or "error: ..." when no answer came
    proto: str
    echoed: bool = False  # the response body contained the secret


class Load:
    """`threads` workers (alternating h1 and h2), until stopped, `max_seconds`
    (a bound in case nobody stops it: scaled) passed or `max_requests` were
    sent, whichever comes first."""

    def __init__(self, envoy, pick: Callable[[], str | None], threads: int = 4, path: str = APP,
                 max_seconds: float = 60.0, max_requests: int = 200_000, pause: float = 0.0):
        self.envoy, self.pick, self.path = envoy, pick, path
        self.max_seconds, self.max_requests, self.pause = max_seconds, max_requests, pause
        self.samples: list[Sample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=("h1" if i % 2 == 0 else "h2",), daemon=True)
                         for i in range(threads)]

    def __enter__(self) -> "Load":
        self._deadline = time.monotonic() + limit(self.max_seconds)
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> list[Sample]:
        self._stop.set()
        for t in self._threads:
            t.join(limit(30))
        return self.samples

    def _run(self, proto: str) -> None:
        client = Client(self.envoy, proto)
        try:
            while not self._stop.is_set() and time.monotonic() < self._deadline:
                with self._lock:
                    if len(self.samples) >= self.max_requests:
                        return
                secret = self.pick()
                auth = f"Bearer {secret}" if secret else None
                sent = time.time()
                try:
                    r = client.get(self.path, authorization=auth)
                    status, echoed = r.status_code, bool(secret) and secret.encode() in r.content
                except httpx.HTTPError as exc:
                    status, echoed = f"error: {exc!r}", False
                sample = Sample(secret, sent, time.time(), status, proto, echoed)
                with self._lock:
                    self.samples.append(sample)
                if self.pause:
                    time.sleep(self.pause)
        finally:
            client.close()


def summary(samples: list[Sample]) -> dict[str, int]:
    """Answers by status."""
    out: dict[str, int] = {}
    for s in samples:
        key = str(s.status) if isinstance(s.status, int) else "error"
        out[key] = out.get(key, 0) + 1
    return out


def bad_answers(samples: list[Sample]) -> list[Sample]:
    """5xx, no answer at all, or the secret echoed back."""
    return [s for s in samples if not isinstance(s.status, int) or s.status >= 500 or s.echoed]
