"""A token expires while Envoy runs, with no configuration change."""

import math
import time

from testkit.checks import allowed, denied, describe
from testkit.clients import Client
from testkit.harness import Token, plugin_config, rfc3339

PATH = "/api/v1/namespaces/default/deployments"
LEAD = 3.0       # seconds between Envoy's start and the expiry
MAX_LAG = 1.5    # how late after expireTime the filter may still accept (clock caching)


def test_token_expires_during_the_test(start_envoy):
    expire_at = math.ceil(time.time() + LEAD)
    expiring = Token("default", "expiring", "editor", expire_time=rfc3339(expire_at))
    lasting = Token("default", "lasting", "editor")
    envoy = start_envoy(plugin_config([expiring, lasting]), name="expiry")
    assert time.time() < expire_at - 0.5, "Envoy started too slowly for this test"
    config_before = envoy.admin_get("/config_dump?resource=static_listeners")

    clients = [Client(envoy, "h1"), Client(envoy, "h2")]  # keep-alive connections across the expiry
    results = []  # (sent, answered, response)
    try:
        deadline = expire_at + MAX_LAG + 1.0
        i = 0
        while time.time() < deadline:
            sent = time.time()
            resp = clients[i % 2].get(PATH, token=expiring)
            results.append((sent, time.time(), resp))
            i += 1
            time.sleep(0.05)
        for sent, answered, resp in results:
            if answered < expire_at:
                allowed(resp, expiring)
            elif sent >= expire_at + MAX_LAG:
                denied(resp, "expired", secret=expiring.secret)
            else:
                assert resp.status_code in (200, 401), describe(resp)
        codes = [r.status_code for _, _, r in results]
        first_401 = codes.index(401)
        assert all(c == 401 for c in codes[first_401:]), f"accepted again after expiry: {codes}"
        assert set(codes[:first_401]) == {200}, codes
        lag = results[first_401][1] - expire_at
        print(f"first 401 {lag:+.3f}s after expireTime")
        # The other token of the same configuration is unaffected, over both protocols.
        for c in clients:
            allowed(c.get(PATH, token=lasting), lasting)
    finally:
        for c in clients:
            c.close()
    config_after = envoy.admin_get("/config_dump?resource=static_listeners")
    assert config_before == config_after, "the configuration changed"
    envoy.stop()
