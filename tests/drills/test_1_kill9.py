"""kill -9 of the control plane at random moments during a loop of creates,
regenerates and revokes (testkit/kill9.py): after each restart every acknowledged
operation is in the store, the one in flight is wholly applied or not at all,
and Envoy enforces the store. (tests/cp/test_2_resilience.py kills once,
right after a 2xx; this is the randomised loop.)"""

from __future__ import annotations

from testkit.fixtures import NODE
from testkit.kill9 import Drill

ROUNDS = 6


def test_kill_9_at_random_moments(cp, envoy, rng, figures):
    drill = Drill(cp, envoy, NODE, rng)
    for _ in range(ROUNDS):
        drill.round()
    figures[f"kill -9 loop, {ROUNDS} rounds"] = drill.figures.line()
    assert drill.figures.acknowledged >= ROUNDS, "the loop hardly ran: nothing was tested"
