"""Keyboard only: sign in, create, copy, close, cancel and confirm a
revocation without a pointer; the dialogs keep the focus where it belongs."""

from __future__ import annotations

from playwright.sync_api import expect

from testkit.clients import request
from testkit.controlplane import tokens_path


def tab_to(page, locator, limit: int = 30):
    """Tab forward until `locator` has the focus."""
    for _ in range(limit):
        if locator.evaluate("el => el === document.activeElement"):
            return
        page.keyboard.press("Tab")
    raise AssertionError(f"{locator} not reached with Tab")


def test_keyboard_only(console, namespace):
    page = console.page
    kb = page.keyboard
    ns, owner = namespace("keys")
    # The page opens with the Namespace field focused; before it, the skip link.
    expect(console.signin.get_by_label("Namespace")).to_be_focused()
    kb.press("Shift+Tab")
    expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    kb.press("Tab")
    expect(console.signin.get_by_label("Namespace")).to_be_focused()
    kb.type(ns)
    kb.press("Tab")
    expect(console.signin.get_by_label("Owner token")).to_be_focused()
    kb.type(owner)
    kb.press("Enter")
    expect(page.get_by_role("heading", name="API Tokens")).to_be_focused()

    # Create Token is the next stop; Enter opens the form with the Name focused.
    kb.press("Tab")
    expect(page.get_by_role("button", name="Create Token")).to_be_focused()
    kb.press("Enter")
    d = console.create_dialog
    expect(d.get_by_label("Name")).to_be_focused()
    kb.type("by-keyboard")
    kb.press("Tab")
    expect(d.get_by_label("Role")).to_be_focused()
    kb.press("ArrowDown")  # viewer -> editor
    expect(d.get_by_label("Role")).to_have_value("editor")
    # Escape closes the form without creating anything.
    kb.press("Escape")
    expect(d).to_be_hidden()
    expect(page.get_by_role("button", name="Create Token")).to_be_focused()
    kb.press("Enter")
    kb.type("by-keyboard")
    kb.press("Enter")  # submits from the Name field

    # The secret dialog: Copy has the focus; Enter copies, Tab reaches Done.
    s = console.secret_dialog
    expect(s.get_by_role("button", name="Copy")).to_be_focused()
    secret = console.shown_secret()
    kb.press("Enter")
    expect(s.get_by_role("status")).to_have_text("Copied to the clipboard.")
    copied = page.evaluate("navigator.clipboard.readText()") == secret
    assert copied, "Enter on Copy put the secret on the clipboard"
    kb.press("Tab")
    expect(s.get_by_role("button", name="Done")).to_be_focused()
    # The page behind the modal dialog is inert: Tab never lands there (past
    # the last button the focus leaves the document, then comes back in).
    for _ in range(6):
        kb.press("Tab")
        assert s.evaluate("d => d.contains(document.activeElement) || document.activeElement === document.body")
    tab_to(page, s.get_by_role("button", name="Done"))
    kb.press("Enter")
    expect(s).to_be_hidden()
    expect(page.get_by_role("button", name="Create Token")).to_be_focused()
    assert console.rows()["by-keyboard"]["Role"] == "viewer"

    # Revoke: Enter on the row's button asks; Enter again hits Cancel (focused).
    revoke = page.get_by_role("button", name="Revoke by-keyboard")
    tab_to(page, revoke)
    kb.press("Enter")
    c = console.confirm_dialog
    expect(c.get_by_role("button", name="Cancel")).to_be_focused()
    kb.press("Enter")
    expect(c).to_be_hidden()
    assert "by-keyboard" in console.rows()
    expect(revoke).to_be_focused()
    # Escape cancels as well.
    kb.press("Enter")
    expect(c).to_be_visible()
    kb.press("Escape")
    expect(c).to_be_hidden()
    assert "by-keyboard" in console.rows()
    # Then Tab to Revoke and confirm.
    kb.press("Enter")
    kb.press("Tab")
    expect(c.get_by_role("button", name="Revoke")).to_be_focused()
    kb.press("Enter")
    expect(page.get_by_role("status")).to_have_text("Token “by-keyboard” was revoked: its secret no longer works.")
    assert request(console.envoy.port, "GET", tokens_path(ns, "by-keyboard"), owner).status == 404


def test_a_confirmation_reopened_at_once_still_acts(console, namespace):
    """A quick hand (or a keyboard: Escape, Enter, Tab, Enter) closes the
    confirmation and opens it again before the browser has delivered the
    first close's event; confirming the second one must still revoke."""
    page = console.page
    ns, owner = namespace("reopen")
    console.sign_in(ns, owner)
    console.create("quick", "viewer")
    reopened = page.evaluate("""async () => {
        const dialog = document.getElementById("confirm-dialog");
        const revoke = document.querySelector('#tokens-body button[aria-label="Revoke quick"]');
        revoke.click();
        const closed = new Promise((r) => dialog.addEventListener("close", r, { once: true }));
        dialog.close();  // its close event is queued, not fired yet
        revoke.click();  // open again at once
        await closed;    // the first close's event arrives while the second is open
        document.getElementById("confirm-ok").click();
        return dialog.open;
    }""")
    assert reopened, "the second confirmation was still open when confirmed"
    expect(page.get_by_role("status")).to_have_text("Token “quick” was revoked: its secret no longer works.")
    assert request(console.envoy.port, "GET", tokens_path(ns, "quick"), owner).status == 404
