"""Settings > API Tokens, Access: what each token's admitted requests did in
the last days (as the filters reported it with each use) and, when it is
narrower than the token's role, the role that would have admitted all of
it: least privilege from evidence, shown, never applied."""

from __future__ import annotations

from playwright.sync_api import expect

from testkit.clients import request
from testkit.controlplane import tokens_path
from testkit.harness import poll

COLUMN = "Access (30 days)"


def test_each_token_shows_what_it_used_and_the_narrowest_role_for_it(console, namespace, issue):
    ns, owner = namespace()
    port = console.envoy.port
    reader = issue(ns, owner, "reader", "owner")
    writer = issue(ns, owner, "writer", "owner")
    issue(ns, owner, "idle", "editor")
    app = f"/api/v1/namespaces/{ns}/deployments"
    assert request(port, "GET", app, reader).status == 200
    assert request(port, "GET", app, writer).status == 200
    assert request(port, "POST", app, writer, body={}).status == 200

    def access(token_id: str):
        return request(port, "GET", tokens_path(ns, token_id), owner).json()["apiToken"].get("access")

    poll(lambda: access("reader") and (access("writer") or {}).get("kinds") == ["read", "write"], 15,
         "the filter's evidence of both tokens")
    console.sign_in(ns, owner)
    rows = console.rows()
    assert rows["reader"][COLUMN] == "Used only: readviewer would do", rows["reader"]
    assert rows["writer"][COLUMN] == "Used: read, writeeditor would do", rows["writer"]
    # The console's own owner lists tokens: that needs an owner, no hint.
    assert rows["admin"][COLUMN] == "Used only: tokens", rows["admin"]
    assert rows["idle"][COLUMN] == "No evidence", rows["idle"]
    hint = console.page.locator("#tokens-body tr", has_text="reader").locator("td.access .suggestion")
    expect(hint).to_have_text("viewer would do")
    expect(hint).to_have_attribute("title", "Every request this token made in the last 30 days a viewer token "
                                            "could have made")
    console.axe("the access evidence")
