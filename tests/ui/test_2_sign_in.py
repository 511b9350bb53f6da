"""Signing in: with an owner token of a namespace (checked against the API),
the refusals in words, several namespaces at once with the Namespace
selector, sign-out, and a 401 taking the page back to sign-in."""

from __future__ import annotations

import re

from playwright.sync_api import expect

from testkit.clients import request
from testkit.controlplane import tokens_path


def test_sign_in_lists_the_namespace_tokens(console, namespace):
    ns, owner = namespace()
    console.axe("sign-in form")
    console.sign_in(ns, owner)
    page = console.page
    expect(page.get_by_role("status")).to_have_text(f"Signed in to namespace “{ns}”.")
    # Settings > API Tokens, the table with its headers; the owner's own token listed.
    expect(page.get_by_role("navigation", name="Breadcrumb")).to_have_text("Settings API Tokens")
    expect(page.get_by_role("link", name="API Tokens")).to_have_attribute("aria-current", "page")
    assert console.rows()["admin"]["Role"] == "owner"
    assert console.rows()["admin"]["Expires"] == "Never"
    assert console.rows()["admin"]["State"] == "Enabled"
    assert console.rows()["admin"]["Conditions"] == "None"
    headers = [h.strip().lower() for h in page.locator("#tokens-table thead th:visible").all_inner_texts()]
    # Last used shows once a token of the list carries a use (test_5): the
    # owner's own requests are reported within a second or two, so it may
    # be there already, and then with the owner's use in it.
    # The same report brings the evidence of what the owner's requests did:
    # the Access column may be there too.
    last_used = "last used" in headers
    access = "access (30 days)" in headers
    assert headers == ["name", "role", "state", "created", "expires", "conditions",
                       *(["last used"] if last_used else []),
                       *(["access (30 days)"] if access else []),
                       "actions"]
    if last_used:
        # (With where from, once the report named it.)
        assert re.fullmatch(r".* UTC(From 127\.0\.0\.1)?", console.rows()["admin"]["Last used"])
    # The token went nowhere but the Authorization header: not the URL, not a field.
    in_url = owner in page.url
    assert not in_url, "the owner token is not in the URL"
    assert page.get_by_label("Owner token").input_value() == ""
    console.axe("token list")


def test_a_bad_owner_token_is_refused_in_words(console, namespace, issue):
    ns, owner = namespace()
    form = console.signin
    # Unknown (a well-formed secret nobody issued): the filter answers 401.
    console.sign_in(ns, "apt_" + "A" * 38, ok=False)
    token_error = form.locator("#signin-token-error")
    expect(token_error).to_have_text(
        "This owner token was not accepted: it is unknown, expired, revoked or mistyped. Check it and try again.")
    expect(form.get_by_label("Owner token")).to_have_attribute("aria-invalid", "true")
    expect(form.get_by_label("Owner token")).to_be_focused()
    expect(form.get_by_label("Owner token")).to_have_value("")
    console.axe("sign-in, token refused")
    # Not a token at all: said without echoing it, and nothing sent.
    console.sign_in(ns, "my secret with spaces", ok=False)
    expect(token_error).to_contain_text("This is not a token")
    assert "my secret" not in console.page.content()
    # A valid token of another role: 403 in words.
    viewer = issue(ns, owner, "reader", "viewer")
    console.sign_in(ns, viewer, ok=False)
    expect(form.get_by_role("alert")).to_have_text(
        f"This token is not an owner of namespace “{ns}”. Only an owner token of a namespace can manage its API tokens.")
    # An owner of another namespace: 403 as well (the filter's namespace check).
    other, _ = namespace()
    console.sign_in(other, owner, ok=False)
    expect(form.get_by_role("alert")).to_contain_text(f"not an owner of namespace “{other}”")
    console.axe("sign-in, not an owner")
    # Empty fields.
    console.sign_in("", "", ok=False)
    expect(form.locator("#signin-ns-error")).to_have_text("Enter the namespace.")
    expect(token_error).to_have_text("Enter the owner token.")
    # Then the right one.
    console.sign_in(ns, owner)


def test_markup_in_the_namespace_field_stays_text(console, namespace):
    page = console.page
    hostile = '<img src=x id=injected onerror="window.pwned=1"><b>bold</b>'
    console.sign_in(hostile, "apt_" + "A" * 38, ok=False)
    error = console.signin.locator("#signin-ns-error")
    expect(error).to_contain_text(f"“{hostile}” is not a namespace name.")
    assert page.locator("#injected").count() == 0 and page.locator("main b").count() == 0
    assert page.evaluate("window.pwned") is None
    # Nothing was sent for it.
    assert "injected" not in console.envoy.access_log_path.read_text()
    console.axe("sign-in, invalid namespace")


def test_two_namespaces_signed_in_at_once(console, namespace, issue):
    page = console.page
    (ns_a, owner_a), (ns_b, owner_b) = namespace("alpha"), namespace("beta")
    issue(ns_a, owner_a, "only-in-a", "viewer")
    issue(ns_b, owner_b, "only-in-b", "editor")
    console.sign_in(ns_a, owner_a)
    assert set(console.rows()) == {"admin", "only-in-a"}
    page.get_by_role("button", name="Sign in to another namespace").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    console.sign_in(ns_b, owner_b)
    assert set(console.rows()) == {"admin", "only-in-b"}
    selector = page.get_by_role("combobox", name="Namespace")
    expect(selector.locator("option")).to_have_text(sorted([ns_a, ns_b]))
    console.axe("two namespaces")
    # Switching shows the other namespace's tokens, with its own token.
    selector.select_option(ns_a)
    expect(page.locator("#tokens-ns")).to_have_text(ns_a)
    expect(page.get_by_role("row", name="only-in-a")).to_be_visible()
    assert set(console.rows()) == {"admin", "only-in-a"}
    # Create in b after switching back: the token lands in b.
    selector.select_option(ns_b)
    expect(page.get_by_role("row", name="only-in-b")).to_be_visible()
    console.create("made-in-b", "viewer")
    expect(page.get_by_role("row", name="made-in-b")).to_be_visible()
    names_b = [t["name"] for t in request(console.envoy.port, "GET", tokens_path(ns_b), owner_b).json()["apiTokens"]]
    names_a = [t["name"] for t in request(console.envoy.port, "GET", tokens_path(ns_a), owner_a).json()["apiTokens"]]
    assert f"namespaces/{ns_b}/apitokens/made-in-b" in names_b
    assert not any("made-in-b" in n for n in names_a)
    # Sign out of b: a remains.
    page.get_by_role("button", name="Sign out").click()
    expect(page.locator("#tokens-ns")).to_have_text(ns_a)
    expect(selector.locator("option")).to_have_text([ns_a])
    # Sign out of a: back to sign-in.
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    expect(page.get_by_role("combobox", name="Namespace")).to_have_count(0)  # no selector without a sign-in


def test_a_tab_keeps_its_own_sign_ins(console, second_console, namespace):
    ns, owner = namespace()
    console.sign_in(ns, owner)
    expect(second_console.page.get_by_role("heading", name="Sign in")).to_be_visible()
    # A reload forgets the token: it was in the page's memory only.
    console.page.reload()
    expect(console.page.get_by_role("heading", name="Sign in")).to_be_visible()


def test_401_returns_to_sign_in(console, namespace, until, issue):
    """The owner token is revoked elsewhere while the page is signed in: the
    next call gets 401 and the page asks to sign in again."""
    page = console.page
    ns, owner = namespace()
    second = issue(ns, owner, "second-owner", "owner")
    console.sign_in(ns, second)
    # Revoked by the first owner, through the gateway, and enforced.
    assert request(console.envoy.port, "DELETE", tokens_path(ns, "second-owner"), owner).status == 200
    until(console.envoy, "GET", tokens_path(ns), second, 401)
    # The page does not know yet; its next call (Create) gets 401.
    d = console.fill_create("after-revoke", "viewer")
    d.get_by_role("button", name="Create").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    expect(console.signin.get_by_role("alert")).to_have_text(
        f"Your owner token for namespace “{ns}” is no longer accepted: it may have been revoked or have expired. "
        "Sign in again.")
    expect(console.signin.get_by_label("Namespace")).to_have_value(ns)
    expect(console.signin.get_by_label("Owner token")).to_be_focused()
    expect(page.locator("dialog[open]")).to_have_count(0)
    expect(page.get_by_role("combobox", name="Namespace")).to_have_count(0)
    assert request(console.envoy.port, "GET", tokens_path(ns, "after-revoke"), owner).status == 404
    console.axe("signed out by a 401")
    console.sign_in(ns, owner)


def test_without_its_script_the_form_sends_nothing(console, namespace):
    """Should console.js fail to load, submitting the sign-in form must not put
    the token in a URL: the fields have no names, and the policy's
    `form-action 'none'` blocks the submission."""
    ns, owner = namespace()
    page = console.page
    page.route("**/console/console.js", lambda route: route.abort())
    page.reload()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    before = page.url
    form = console.signin
    form.get_by_label("Namespace").fill(ns)
    form.get_by_label("Owner token").fill(owner)
    with page.expect_console_message(lambda m: "form-action" in m.text) as message:
        page.keyboard.press("Enter")  # the focus is in the Owner token field
    # Blocked; and what it would have sent names no field.
    # (Compared as a boolean: the message would quote a field's value.)
    nothing_named = message.value.text.startswith(f"Sending form data to '{console.url}?'")
    assert nothing_named, "the blocked submission carried no field"
    page.wait_for_timeout(200)
    assert page.url == before
    in_log = owner in console.envoy.access_log_path.read_text()
    assert not in_log, "the owner token reached no URL"
    # The expected violation, and only that one.
    assert all("form-action" in p for p in console.problems), console.problems
    console.problems.clear()
    page.unroute_all()


def test_the_owner_token_field_is_masked_and_no_password_field(console):
    """Browsers and password managers offer to save what is typed in a
    password field, whatever `autocomplete` says: the owner token goes in a
    text field masked by CSS, which they leave alone."""
    page = console.page
    field = page.get_by_label("Owner token")
    expect(field).to_have_attribute("type", "text")
    expect(field).to_have_attribute("autocomplete", "off")
    assert page.locator("input[type=password]").count() == 0
    field.fill("apt_masked-for-the-test")
    masking = field.evaluate("e => getComputedStyle(e).webkitTextSecurity")
    assert masking == "disc", masking
    field.fill("")
