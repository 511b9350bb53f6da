"""The one setting for how long the suites wait: APITOKENS_TEST_TIME_SCALE.

Every waiting limit of the suites (how long a poll may take, a process to
start or stop, an HTTP answer, a subprocess, a thread to end, a browser
locator) goes through `limit`, which multiplies it by the scale (a float,
default 1.0). A slow or busy machine sets it above 1
(`APITOKENS_TEST_TIME_SCALE=3 make test`): the suites wait longer before
they give up, and nothing else changes.

What is not a limit is never scaled: a measurement window ("the rate held
over 10 s"), a bound a test asserts ("revoked within 2 s"), a token's expiry,
a sleep that makes a situation (the control plane down for 2 s), a period of
the system under test (the filter's counters reach Envoy once a second), a
timeout that is part of the situation (an HTTP/2 read timeout that must stay
under the xDS server's 30 s keepalive). A limit scaled up only ever waits
longer for something a test needs; it never turns a failure into a pass."""

from __future__ import annotations

import os

VARIABLE = "APITOKENS_TEST_TIME_SCALE"


def _scale() -> float:
    text = os.environ.get(VARIABLE, "").strip()
    if not text:
        return 1.0
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{VARIABLE}={text!r}: not a number (e.g. 3 on a slow machine)") from None
    if not 0 < value < float("inf"):
        raise ValueError(f"{VARIABLE}={text!r}: must be a positive number (e.g. 3 on a slow machine)")
    return value


# Read once, when testkit is first imported.
SCALE = _scale()


def limit(seconds: float) -> float:
    """A waiting limit (seconds), scaled: how long something may take before
    the test gives up on it."""
    return seconds * SCALE


def limit_ms(milliseconds: float) -> float:
    """The same in milliseconds (Playwright's timeouts)."""
    return milliseconds * SCALE
