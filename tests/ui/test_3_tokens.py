"""Settings > API Tokens: create with each role and with an expiry, copy the
one-time secret and use it at the gateway, regenerate, disable and enable,
revoke, and the create form's errors next to their fields."""

from __future__ import annotations

import datetime as dt

import pytest
from playwright.sync_api import expect

from testkit.clients import request
from testkit.controlplane import tokens_path

APP = "/api/v1/namespaces/{ns}/deployments"
# What each role may do at the gateway: list the app's resources, create
# one, list API tokens (owner only).
ALLOWED = {
    "viewer": {"list": 200, "create": 403, "tokens": 403},
    "editor": {"list": 200, "create": 200, "tokens": 403},
    "owner": {"list": 200, "create": 200, "tokens": 200},
}


def check_at_gateway(envoy, until, ns: str, secret: str, role: str):
    until(envoy, "GET", APP.format(ns=ns), secret, ALLOWED[role]["list"])
    assert request(envoy.port, "POST", APP.format(ns=ns), secret, body={}).status == ALLOWED[role]["create"]
    assert request(envoy.port, "GET", tokens_path(ns), secret).status == ALLOWED[role]["tokens"]
    # Never in another namespace.
    assert request(envoy.port, "GET", APP.format(ns="default"), secret).status == 403


@pytest.mark.parametrize("role", ["viewer", "editor", "owner"])
def test_create_copy_and_use_each_role(console, namespace, until, role):
    ns, owner = namespace(role)
    console.sign_in(ns, owner)
    secret = console.create(f"ci-{role}", role)
    row = console.rows()[f"ci-{role}"]
    assert row["Role"] == role and row["Expires"] == "Never"
    assert row["Created"].endswith(" UTC")
    # Focus is back on Create Token, ready for the next one.
    expect(console.page.get_by_role("button", name="Create Token")).to_be_focused()
    check_at_gateway(console.envoy, until, ns, secret, role)


def test_create_with_an_expiry_date(console, namespace, until, issue):
    ns, owner = namespace()
    # One that expires in a moment (created through the API: the form takes dates).
    soon = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) + dt.timedelta(seconds=3)
    issue(ns, owner, "brief", "viewer", expireTime=soon.strftime("%Y-%m-%dT%H:%M:%SZ"))
    console.page.wait_for_timeout(max(0.0, (soon - dt.datetime.now(dt.timezone.utc)).total_seconds()) * 1000 + 100)
    console.sign_in(ns, owner)
    assert console.rows()["brief"]["Expires"] == f"Expired {soon.strftime('%Y-%m-%d %H:%M')} UTC"
    expect(console.page.get_by_role("row", name="brief").locator("td.expired")).to_have_count(1)
    day = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=30)).date().isoformat()
    secret = console.create("expiring", "editor", day)
    assert console.rows()["expiring"]["Expires"] == f"{day} 00:00 UTC"
    token = request(console.envoy.port, "GET", tokens_path(ns, "expiring"), owner).json()["apiToken"]
    assert token["expireTime"] == f"{day}T00:00:00Z"
    check_at_gateway(console.envoy, until, ns, secret, "editor")


def test_the_console_screenshots(console, namespace):
    """The states docs/api.md shows: the list, the create form, the secret
    dialog; axe-core on each."""
    page = console.page
    ns, owner = namespace("payments", exact=True)
    console.sign_in(ns, owner)
    for name, role in (("deploy-bot", "editor"), ("grafana", "viewer")):
        console.create(name, role)
    day = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=90)).date().isoformat()
    console.create("release-2026", "viewer", day)
    console.confirm("Disable", "grafana")
    expect(page.get_by_role("button", name="Enable grafana")).to_be_visible()
    expect(page.get_by_role("row", name="release-2026")).to_be_visible()
    page.get_by_role("heading", name="API Tokens").click()  # no focus ring in the picture
    console.axe("token list")
    console.screenshot("console-tokens")
    d = console.fill_create("ci", "editor", day)
    console.axe("create form")
    console.screenshot("console-create")
    d.get_by_role("button", name="Create").click()
    expect(console.secret_dialog).to_be_visible()
    expect(console.secret_dialog.get_by_role("button", name="Copy")).to_be_focused()
    console.axe("one-time secret")
    console.screenshot("console-secret")
    console.copy_secret()


def test_regenerate_and_revoke(console, namespace, until):
    page = console.page
    ns, owner = namespace()
    console.sign_in(ns, owner)
    old = console.create("rotating", "editor")
    until(console.envoy, "GET", APP.format(ns=ns), old, 200)
    created = console.rows()["rotating"]["Created"]

    # Cancel changes nothing.
    d = console.confirm("Regenerate", "rotating", ok=False)
    expect(d).to_be_hidden()
    assert request(console.envoy.port, "GET", APP.format(ns=ns), old).status == 200

    # Regenerate: a new secret, shown once; the old one is refused at once.
    d = console.confirm("Regenerate", "rotating")
    expect(console.secret_dialog.get_by_role("heading")).to_have_text("New secret for rotating")
    console.axe("regenerated secret")
    new = console.copy_secret()
    different = new != old
    assert different, "regenerate gives a new secret"
    until(console.envoy, "GET", APP.format(ns=ns), old, 401)
    until(console.envoy, "GET", APP.format(ns=ns), new, 200)
    assert console.rows()["rotating"]["Created"] == created
    expect(page.get_by_role("button", name="Regenerate rotating")).to_be_focused()

    # Revoke: asked first (Cancel focused), then refused at once, and gone from the list.
    d = console.confirm("Revoke", "rotating", ok=False)
    assert request(console.envoy.port, "GET", APP.format(ns=ns), new).status == 200
    page.get_by_role("button", name="Revoke rotating").click()
    expect(console.confirm_dialog.get_by_role("button", name="Cancel")).to_be_focused()
    expect(console.confirm_dialog).to_contain_text("stops working at once")
    console.axe("revoke confirmation")
    console.confirm_dialog.get_by_role("button", name="Revoke").click()
    expect(page.get_by_role("status")).to_have_text("Token “rotating” was revoked: its secret no longer works.")
    assert "rotating" not in console.rows()
    until(console.envoy, "GET", APP.format(ns=ns), new, 401)
    expect(page.get_by_role("heading", name="API Tokens")).to_be_focused()


def test_disable_and_enable(console, namespace, until, issue):
    """A token's state in the list, Disable (asked first) refuses its secret
    at once and keeps the token, Enable brings the same secret back."""
    page = console.page
    ns, owner = namespace()
    console.sign_in(ns, owner)
    secret = console.create("pausable", "editor")
    until(console.envoy, "GET", APP.format(ns=ns), secret, 200)
    rows = console.rows()
    assert rows["pausable"]["State"] == "Enabled" and rows["admin"]["State"] == "Enabled"
    before = rows["pausable"]

    # Cancel changes nothing.
    console.confirm("Disable", "pausable", ok=False)
    assert request(console.envoy.port, "GET", APP.format(ns=ns), secret).status == 200

    page.get_by_role("button", name="Disable pausable", exact=True).click()
    d = console.confirm_dialog
    expect(d).to_contain_text("stops working at once")
    expect(d).to_contain_text("keeps its secret")
    expect(d.get_by_role("button", name="Disable")).to_have_class("danger")
    console.axe("disable confirmation")
    d.get_by_role("button", name="Disable").click()
    expect(page.get_by_role("status")).to_have_text(
        "Token “pausable” was disabled: its secret is refused until it is enabled again.")
    # The answer came once the gateway enforced it: the first request is refused.
    assert request(console.envoy.port, "GET", APP.format(ns=ns), secret).status == 401
    row = page.get_by_role("row", name="pausable")
    expect(row.locator("td.state-disabled")).to_have_text("Disabled")
    expect(row).to_have_class("disabled")
    after = console.rows()["pausable"]
    assert after["State"] == "Disabled"
    # (Not "Last used" nor "Access": the request above used the token, and
    # the filter's usage report may land between the two reads, which adds
    # the columns.)
    moving = ("State", "Actions", "Last used", "Access (30 days)")
    assert {k: v for k, v in after.items() if k not in moving} == {
        k: v for k, v in before.items() if k not in moving}, "kept as it was"
    # The row's action is now Enable, and it has the focus.
    expect(page.get_by_role("button", name="Enable pausable")).to_be_focused()
    expect(page.get_by_role("button", name="Disable pausable")).to_have_count(0)
    token = request(console.envoy.port, "GET", tokens_path(ns, "pausable"), owner).json()["apiToken"]
    assert token["state"] == "disabled"
    console.axe("a disabled token in the list")

    # Enable: asked first too, not as a danger; the same secret works again.
    page.get_by_role("button", name="Enable pausable", exact=True).click()
    expect(d).to_contain_text("with the secret it had")
    expect(d.get_by_role("button", name="Enable")).to_have_class("primary")
    expect(d.get_by_role("button", name="Cancel")).to_be_focused()
    d.get_by_role("button", name="Enable").click()
    expect(page.get_by_role("status")).to_have_text("Token “pausable” was enabled: its secret works again.")
    assert request(console.envoy.port, "GET", APP.format(ns=ns), secret).status == 200
    assert console.rows()["pausable"]["State"] == "Enabled"
    expect(page.get_by_role("row", name="pausable")).not_to_have_class("disabled")
    expect(page.get_by_role("button", name="Disable pausable")).to_be_focused()

    # A short-lived owner may not disable the owner that outlives it: said
    # in the server's words, not as "not an owner".
    hour = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    short = issue(ns, owner, "short-owner", "owner", expireTime=hour)
    page.get_by_role("button", name="Sign out").click()
    console.sign_in(ns, short)
    console.confirm("Disable", "admin")
    expect(page.locator("#tokens-error")).to_contain_text("You may not disable “admin” with this owner token.")
    expect(page.locator("#tokens-error")).to_contain_text("never expires")
    assert request(console.envoy.port, "GET", tokens_path(ns), owner).status == 200


def test_a_token_revoked_meanwhile(console, namespace):
    """Regenerate a token someone else revoked: 404 in words, list refreshed."""
    ns, owner = namespace()
    console.sign_in(ns, owner)
    console.create("gone-soon", "viewer")
    assert request(console.envoy.port, "DELETE", tokens_path(ns, "gone-soon"), owner).status == 200
    console.confirm("Regenerate", "gone-soon")
    expect(console.page.locator("#tokens-error")).to_have_text(
        "The token “gone-soon” does not exist any more: it may have been revoked meanwhile. "
        "The list has been refreshed.")
    assert "gone-soon" not in console.rows()


def test_create_errors_next_to_their_field(console, namespace):
    page = console.page
    ns, owner = namespace()
    console.sign_in(ns, owner)
    console.create("taken", "viewer")
    d = console.create_dialog

    def submit_and_expect(field_label: str, error_id: str, text: str):
        d.get_by_role("button", name="Create").click()
        expect(d.locator(f"#{error_id}")).to_have_text(text)
        field = d.get_by_label(field_label)
        expect(field).to_have_attribute("aria-invalid", "true")
        expect(field).to_be_focused()
        # The error is tied to its field for assistive technology.
        assert error_id in field.get_attribute("aria-describedby").split()

    # Duplicate name: 409 from the API.
    console.fill_create("taken", "editor")
    submit_and_expect("Name", "create-name-error",
                      f"A token named “taken” already exists in namespace “{ns}”. Choose another name.")
    console.axe("create form with a field error")
    # Invalid name: 400 with field "name".
    d.get_by_label("Name").fill("Not_A_Label")
    submit_and_expect("Name", "create-name-error",
                      "“Not_A_Label” is not a valid token name. Use 1 to 63 lower-case letters (a-z), digits and "
                      "hyphens, starting and ending with a letter or digit.")
    # Markup in the name: the API refuses it (not a DNS label) and the page
    # shows it as text; nothing is parsed or run.
    hostile = '<img src=x id=injected onerror="window.pwned=1"><i>x</i>'
    d.get_by_label("Name").fill(hostile)
    submit_and_expect("Name", "create-name-error", f"“{hostile}” is not a valid token name. Use 1 to 63 lower-case "
                      "letters (a-z), digits and hyphens, starting and ending with a letter or digit.")
    expect(d.locator("#create-full-name")).to_have_text(f"namespaces/{ns}/apitokens/{hostile}")
    assert page.locator("#injected").count() == 0 and page.locator("dialog i").count() == 0
    assert page.evaluate("window.pwned") is None
    # Expiry in the past: 400 with field "expireTime", next to the date.
    d.get_by_label("Name").fill("late")
    d.get_by_label("Expiry date").fill("2020-01-01")
    submit_and_expect("Expiry date", "create-expiry-error",
                      "The expiry date must be in the future: choose a later date, or leave the field empty.")
    # The earlier field's error is gone once it is fixed.
    expect(d.locator("#create-name-error")).to_have_text("")
    expect(d.get_by_label("Name")).not_to_have_attribute("aria-invalid", "true")
    # Today is past as well (00:00 UTC).
    d.get_by_label("Expiry date").fill(dt.datetime.now(dt.timezone.utc).date().isoformat())
    submit_and_expect("Expiry date", "create-expiry-error",
                      "The expiry date must be in the future: choose a later date, or leave the field empty.")
    # An empty name is caught before any call.
    d.get_by_label("Expiry date").fill("")
    d.get_by_label("Name").fill("")
    submit_and_expect("Name", "create-name-error", "Enter a name for the token. Use 1 to 63 lower-case letters "
                      "(a-z), digits and hyphens, starting and ending with a letter or digit.")
    # None of these created anything.
    names = {t["name"].rsplit("/", 1)[1]
             for t in request(console.envoy.port, "GET", tokens_path(ns), owner).json()["apiTokens"]}
    assert names == {"admin", "taken"}
    # Cancel closes the form; then a valid one goes through.
    d.get_by_role("button", name="Cancel").click()
    expect(d).to_be_hidden()
    console.create("fixed", "viewer")
    assert "fixed" in console.rows()
