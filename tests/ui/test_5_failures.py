"""When things go wrong: the control plane down (Envoy answers 503), the
network gone, and (by rewriting real responses in the browser, since the API
does not send them yet) a 429 token quota and tokens with `lastUseTime`.
Runs last: it stops and restarts the control plane."""

from __future__ import annotations

import json

from playwright.sync_api import expect

from testkit.clients import request
from testkit.controlplane import tokens_path
from testkit.harness import poll


def test_network_failure_in_words(console, browser_context, namespace):
    ns, owner = namespace()
    console.sign_in(ns, owner)
    d = console.fill_create("offline", "viewer")
    browser_context.set_offline(True)
    try:
        d.get_by_role("button", name="Create").click()
        expect(d.get_by_role("alert")).to_have_text(
            "The console could not reach the server. Check your network connection, then try again.")
        console.axe("create, network failure")
    finally:
        browser_context.set_offline(False)
    d.get_by_role("button", name="Create").click()
    expect(d).to_be_hidden()
    console.copy_secret()
    assert "offline" in console.rows()


def test_quota_429_in_words(console, namespace):
    """The API will answer 429 when a namespace's token quota is reached
    (another issue). Until it does, the browser answers the create call with
    the announced error body; the page must say it in words."""
    ns, owner = namespace()
    console.sign_in(ns, owner)
    body = {"code": 429, "message": "the namespace has reached its quota of API tokens"}
    console.page.route(f"**/apitokens/v1/namespaces/{ns}/apitokens",
                       lambda route: route.fulfill(status=429, json=body, headers={"retry-after": "30"})
                       if route.request.method == "POST" else route.fallback())
    d = console.fill_create("one-too-many", "viewer")
    d.get_by_role("button", name="Create").click()
    expect(d.get_by_role("alert")).to_have_text(
        f"Namespace “{ns}” has reached its token quota, so no more tokens can be created. Revoke tokens it no "
        "longer needs, then try again. You can try again in 30 seconds. (The server said: the namespace has "
        "reached its quota of API tokens)")
    console.axe("create, quota reached")
    console.page.unroute_all()


def test_last_used_column_when_tokens_carry_it(console, namespace, issue):
    """Tokens will carry `lastUseTime` (another issue). The real list answer
    is extended with it in the browser: the Last used column appears, with
    "Never" for tokens not used yet."""
    ns, owner = namespace()
    issue(ns, owner, "unused", "viewer")
    # Without the field: no column.
    console.sign_in(ns, owner)
    expect(console.page.get_by_role("columnheader", name="Last used")).to_be_hidden()

    def with_last_use(route):
        if route.request.method != "GET":
            return route.fallback()
        response = route.fetch()
        data = response.json()
        for token in data["apiTokens"]:
            token["lastUseTime"] = "2026-11-02T09:30:00Z" if token["name"].endswith("/admin") else None
        route.fulfill(response=response, body=json.dumps(data))

    console.page.route(f"**/apitokens/v1/namespaces/{ns}/apitokens", with_last_use)
    console.page.get_by_role("button", name="Sign out").click()
    console.sign_in(ns, owner)
    expect(console.page.get_by_role("columnheader", name="Last used")).to_be_visible()
    rows = console.rows()
    assert rows["admin"]["Last used"] == "2026-11-02 09:30 UTC"
    assert rows["unused"]["Last used"] == "Never"
    console.axe("list with Last used")
    console.page.unroute_all()


def test_control_plane_down_in_words(console, cp, envoy, namespace):
    page = console.page
    ns, owner = namespace()
    console.sign_in(ns, owner)
    d = console.fill_create("while-down", "editor")
    cp.stop()
    try:
        d.get_by_role("button", name="Create").click()
        expect(d.get_by_role("alert")).to_have_text(
            "The token service is not reachable right now (error 503). Wait a moment and try again; if this keeps "
            "happening, the control plane may be down.")
        console.axe("create, control plane down")
        # The list, too (switching namespaces reloads it); still signed in.
        d.get_by_role("button", name="Cancel").click()
        page.get_by_role("combobox", name="Namespace").select_option(ns)
        expect(page.locator("#tokens-error")).to_contain_text("error 503")
        expect(page.get_by_role("heading", name="API Tokens")).to_be_visible()
    finally:
        cp.start()
    # Back: Envoy reconnects, the same sign-in works, nothing was created.
    poll(lambda: request(envoy.port, "GET", tokens_path(ns), owner).status == 200, 10, "API back")
    console.create("after-restart", "viewer")
    assert set(console.rows()) == {"admin", "after-restart"}
