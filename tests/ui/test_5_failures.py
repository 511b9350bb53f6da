"""When things go wrong: the control plane down (Envoy answers 503), the
network gone, the namespace's token quota reached (429); and the Last used
column once tokens carry `lastUseTime`. It stops the control plane and
starts it again with the same settings: the modules after it, in any order,
find it as it was."""

from __future__ import annotations

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


def test_quota_429_in_words(console, cp, namespace, issue):
    """The control plane answers 429 once a namespace holds its quota of
    tokens (this suite's control plane allows `cp.quota`): the page says it in words."""
    quota = cp.quota
    ns, owner = namespace()
    for i in range(quota - 1):  # the bootstrap owner is one
        issue(ns, owner, f"filler-{i}", "viewer")
    console.sign_in(ns, owner)
    d = console.fill_create("one-too-many", "viewer")
    d.get_by_role("button", name="Create").click()
    expect(d.get_by_role("alert")).to_have_text(
        f"Namespace “{ns}” has reached its token quota, so no more tokens can be created. Revoke tokens it no "
        f"longer needs, then try again. (The server said: namespace {ns} already has {quota} API tokens, the most "
        "allowed; delete tokens it no longer needs first)")
    console.axe("create, quota reached")


def test_last_used_column_when_tokens_carry_it(console, envoy, namespace, issue):
    """Tokens carry `lastUseTime` once used (the filter reports it, every
    second in this suite): the Last used column appears, with the client
    addresses the gateway saw the token used from, "Never" for tokens not
    used yet."""
    ns, owner = namespace()
    used = issue(ns, owner, "used", "viewer")
    issue(ns, owner, "unused", "viewer")
    # Nothing used yet: no column.
    console.sign_in(ns, owner)
    expect(console.page.get_by_role("columnheader", name="Last used")).to_be_hidden()
    assert request(envoy.port, "GET", f"/api/v1/namespaces/{ns}/deployments", used).status == 200
    poll(lambda: "lastAddresses" in request(envoy.port, "GET", tokens_path(ns, "used"), owner).json()["apiToken"],
         15, "the last use reported, and where from")
    console.page.get_by_role("button", name="Sign out").click()
    console.sign_in(ns, owner)
    expect(console.page.get_by_role("columnheader", name="Last used")).to_be_visible()
    rows = console.rows()
    assert rows["used"]["Last used"].endswith(" UTCFrom 127.0.0.1"), rows["used"]
    assert rows["unused"]["Last used"] == "Never"
    console.axe("list with Last used")


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
