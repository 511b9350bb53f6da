"""Settings > API Tokens, Recent activity: the namespace's latest token
changes under the table, a leak report's revocation among them ("Revoked:
reported leaked"), who made each and from where; never a secret."""

from __future__ import annotations

from playwright.sync_api import expect

from testkit.clients import request

REVOKE = "/apitokens/v1/credentials:revoke"


def cells(row) -> list[str]:
    return [c.strip() for c in row.locator("td").all_text_contents()]


def test_a_leak_reported_revocation_shows_in_the_activity(console, namespace, issue):
    ns, owner = namespace()
    secret = issue(ns, owner, "leaky", "editor")
    issue(ns, owner, "kept", "viewer")
    r = request(console.envoy.port, "POST", REVOKE, body={"credentials": [secret]})
    assert r.status == 202, r
    console.sign_in(ns, owner)
    assert "leaky" not in console.rows() and "kept" in console.rows()
    # Closed until asked for: the tokens stay the page's one list of rows.
    expect(console.page.locator("#activity-body tr").first).to_be_hidden()
    console.page.get_by_text("Recent activity").click()
    rows = console.page.locator("#activity-body tr")
    expect(rows.first).to_contain_text("Revoked: reported leaked")
    newest, kept, created = cells(rows.nth(0)), cells(rows.nth(1)), cells(rows.nth(2))
    assert newest[1:4] == ["Revoked: reported leaked", "leaky", "reported leaked"], newest
    assert newest[4], "the reporter's address"
    assert kept[1:4] == ["Created", "kept", "admin"], kept
    assert created[1:4] == ["Created", "leaky", "admin"], created
    assert newest[0].endswith(" UTC")
    gone = secret not in console.page.content()
    assert gone, "no secret on the page"
    # A change made in the console shows at once.
    console.confirm("Disable", "kept")
    expect(rows.first).to_contain_text("Disabled")
    assert cells(rows.first)[1:4] == ["Disabled", "kept", "admin"]
    console.axe("activity")
