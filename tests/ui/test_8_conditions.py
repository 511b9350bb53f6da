"""Conditions in the console: the create form takes a valid-from date, the
client addresses a token may be used from (and those excepted) and a request
rate, the table shows them, the gateway enforces them, and a bad range is
named next to its box, by line."""

from __future__ import annotations

import datetime as dt

from playwright.sync_api import expect

from testkit.clients import request
from testkit.controlplane import tokens_path

APP = "/api/v1/namespaces/{ns}/deployments"


def test_create_with_conditions_shows_them_and_the_gateway_enforces_them(console, namespace, until):
    ns, owner = namespace()
    console.sign_in(ns, owner)
    # The tests reach Envoy from 127.0.0.1: inside the first token's range,
    # outside the second's.
    d = console.fill_create("lan", "editor")
    d.get_by_label("Valid from").fill("2020-01-01")
    d.get_by_label("Allowed client addresses").fill("127.0.0.0/8\n::1")
    d.get_by_label("Excepted client addresses").fill("127.0.0.9")
    console.axe("create form with conditions")
    d.get_by_role("button", name="Create").click()
    lan = console.copy_secret()
    row = console.rows()["lan"]
    assert row["Conditions"] == ("Valid since 2020-01-01 00:00 UTC"
                                 "Only from 127.0.0.0/8, ::1/128"
                                 "Not from 127.0.0.9/32"), row
    until(console.envoy, "GET", APP.format(ns=ns), lan, 200)

    d = console.fill_create("office", "editor")
    d.get_by_label("Allowed client addresses").fill("10.0.0.0/8")
    d.get_by_role("button", name="Create").click()
    office = console.copy_secret()
    assert console.rows()["office"]["Conditions"] == "Only from 10.0.0.0/8"
    assert request(console.envoy.port, "GET", APP.format(ns=ns), office).status == 403

    # Valid from a day to come: listed as pending, refused as an unknown secret.
    day = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=2)).date().isoformat()
    d = console.fill_create("later", "viewer")
    d.get_by_label("Valid from").fill(day)
    d.get_by_role("button", name="Create").click()
    later = console.copy_secret()
    assert console.rows()["later"]["Conditions"] == f"Not before {day} 00:00 UTC"
    expect(console.page.get_by_role("row", name="later").locator("td .pending")).to_have_count(1)
    assert request(console.envoy.port, "GET", APP.format(ns=ns), later).status == 401
    # What the API says, as the console showed it.
    token = request(console.envoy.port, "GET", tokens_path(ns, "later"), owner).json()["apiToken"]
    assert token["notBeforeTime"] == f"{day}T00:00:00Z"

    # A request rate: 3 a minute, 2 at once.
    d = console.fill_create("paced", "viewer")
    d.get_by_label("Requests").fill("3")
    d.get_by_label("per").select_option("minute")
    d.get_by_label("Burst").fill("2")
    d.get_by_role("button", name="Create").click()
    paced = console.copy_secret()
    assert console.rows()["paced"]["Conditions"] == "At most 3 a minute, 2 at once"
    until(console.envoy, "GET", APP.format(ns=ns), paced, 200)  # the first of the burst
    assert request(console.envoy.port, "GET", APP.format(ns=ns), paced).status == 200
    over = request(console.envoy.port, "GET", APP.format(ns=ns), paced)
    assert over.status == 429, over
    assert over.headers["ratelimit-policy"] == '"token";q=3;w=60'
    assert 1 <= int(over.headers["retry-after"]) <= 20
    token = request(console.envoy.port, "GET", tokens_path(ns, "paced"), owner).json()["apiToken"]
    assert token["rateLimit"] == {"requests": 3, "per": "minute", "burst": 2}
    console.axe("the table with conditions")


def test_a_bad_range_is_named_next_to_its_box_by_line(console, namespace):
    ns, owner = namespace()
    console.sign_in(ns, owner)
    d = console.fill_create("bad", "viewer")
    d.get_by_label("Allowed client addresses").fill("10.0.0.0/8\n10.0.0.1/8")
    d.get_by_role("button", name="Create").click()
    box = d.get_by_label("Allowed client addresses")
    expect(d.locator("#create-allow-error")).to_have_text(
        "Line 2: has bits set past its prefix length: write the range's first address.")
    expect(box).to_have_attribute("aria-invalid", "true")
    expect(box).to_be_focused()
    assert "create-allow-error" in box.get_attribute("aria-describedby").split()
    console.axe("create form with a bad address range")
    # Fixed, and an excepted range that is not one, after a blank line: the
    # other box, the line as the owner sees it.
    box.fill("10.0.0.0/8")
    d.get_by_label("Excepted client addresses").fill("10.1.0.0/16\n\nnot-an-address")
    d.get_by_role("button", name="Create").click()
    expect(d.locator("#create-except-error")).to_have_text(
        "Line 3: must be an IP address or a CIDR range such as 10.0.0.0/8 or 2001:db8::/32.")
    expect(d.locator("#create-allow-error")).to_have_text("")
    # Valid from after the expiry.
    d.get_by_label("Excepted client addresses").fill("")
    d.get_by_label("Expiry date").fill("2031-01-01")
    d.get_by_label("Valid from").fill("2032-01-01")
    d.get_by_role("button", name="Create").click()
    expect(d.locator("#create-not-before-error")).to_have_text(
        "The token must become valid before it expires: choose an earlier date, or a later expiry.")
    # A burst past the limit, named by the API, shown next to its box; a
    # burst without a rate, by the form.
    d.get_by_label("Valid from").fill("")
    d.get_by_label("Requests").fill("10")
    d.get_by_label("Burst").fill("2000000")
    d.get_by_role("button", name="Create").click()
    expect(d.locator("#create-burst-error")).to_have_text("The burst must be from 1 to 1000000.")
    expect(d.get_by_label("Burst")).to_be_focused()
    d.get_by_label("Requests").fill("")
    d.get_by_label("Burst").fill("5")
    d.get_by_role("button", name="Create").click()
    expect(d.locator("#create-rate-error")).to_have_text(
        "Enter the number of requests the burst goes with, or leave the burst empty.")
    console.axe("create form with a bad rate limit")
    assert "bad" not in console.rows()


def test_conditions_are_edited_in_place_and_the_gateway_follows(console, namespace, until):
    ns, owner = namespace()
    console.sign_in(ns, owner)
    d = console.fill_create("movable", "editor")
    d.get_by_label("Allowed client addresses").fill("10.0.0.0/8")
    d.get_by_role("button", name="Create").click()
    secret = console.copy_secret()
    # The tests reach Envoy from 127.0.0.1: outside the range.
    until(console.envoy, "GET", APP.format(ns=ns), secret, 403)
    page = console.page
    page.get_by_role("button", name="Conditions movable").click()
    edit = page.get_by_role("dialog", name="Token conditions")
    expect(edit).to_be_visible()
    # Filled with what the token has.
    allow = edit.get_by_label("Allowed client addresses")
    expect(allow).to_have_value("10.0.0.0/8")
    expect(edit.get_by_label("Requests")).to_have_value("")
    console.axe("the conditions dialog")
    # A bad range: named by line, next to its box; nothing changed.
    allow.fill("127.0.0.0/8\n127.0.0.1/8")
    edit.get_by_role("button", name="Save").click()
    expect(edit.locator("#edit-allow-error")).to_have_text(
        "Line 2: has bits set past its prefix length: write the range's first address.")
    expect(allow).to_be_focused()
    # Fixed, with a rate limit: saved, shown, enforced.
    allow.fill("127.0.0.0/8")
    edit.get_by_label("Requests").fill("5")
    edit.get_by_label("per").select_option("second")
    edit.get_by_role("button", name="Save").click()
    expect(edit).to_be_hidden()
    assert console.rows()["movable"]["Conditions"] == "At most 5 a secondOnly from 127.0.0.0/8"
    expect(page.get_by_role("button", name="Conditions movable")).to_be_focused()
    assert request(console.envoy.port, "GET", APP.format(ns=ns), secret).status == 200
    token = request(console.envoy.port, "GET", tokens_path(ns, "movable"), owner).json()["apiToken"]
    assert token["clientAddresses"] == {"allow": ["127.0.0.0/8"]}
    assert token["rateLimit"] == {"requests": 5, "per": "second", "burst": 5}
    # Everything cleared: no conditions left.
    page.get_by_role("button", name="Conditions movable").click()
    expect(edit.get_by_label("Requests")).to_have_value("5")
    allow.fill("")
    edit.get_by_label("Requests").fill("")
    edit.get_by_label("Burst").fill("")
    edit.get_by_role("button", name="Save").click()
    expect(edit).to_be_hidden()
    assert console.rows()["movable"]["Conditions"] == "None"
