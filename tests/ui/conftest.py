"""The web console (control-plane/console/) in a real headless Chromium,
through a real Envoy on envoy/envoy-ecds.yaml as shipped (ports replaced: the
console's route with the filter off, every API call through the filter) and
the real control plane (`apitokens serve`), which serves the console and the
token API.

Chromium is Debian's (`/usr/bin/chromium`, `make chromium` installs it),
driven by the PyPI `playwright` package through `executable_path`; its own
browser download is never used. axe-core comes inside `axe-playwright-python`.

The browser profile lives in the run's directory, so the final leak search
(the session-end fixture `leak_search`) reads it too, with every log,
the database, Envoy's admin endpoints and the page's storage and cookies.

Environment: APITOKENS_BIN, ENVOY_BIN, APITOKENS_WASM (testkit/controlplane.py),
CHROMIUM_BIN (default /usr/bin/chromium), UI_SCREENSHOT_DIR (also write the
screenshots docs/api.md shows there, e.g. docs/console; they always go to the run's
directory).
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from axe_playwright_python.sync_playwright import Axe
from playwright.sync_api import expect, sync_playwright

from testkit import leaks
from testkit.clients import request
from testkit.controlplane import ControlPlane, create, reporting_every_second, tokens_path
from testkit.harness import SECRETS, poll
from testkit.timing import limit_ms

# The session fixtures envoy, upstream and workdir (cp is this suite's own,
# below); the binaries checked at the start; every Envoy's logs in the report
# of a failed test.
pytest_plugins = ["testkit.fixtures"]

# A namespace's token quota the suite can reach, and usage reported every
# second, so the page shows a real 429 and a real Last used.
QUOTA = 8


@pytest.fixture(scope="session")
def cp(workdir):
    """`apitokens serve` (bootstrap owners in `cp.owners`) with a small token
    quota and usage reports every second."""
    base = reporting_every_second(workdir / "plugin-ui.json")
    plane = ControlPlane(workdir / "cp", plugin_config=base,
                         always=("--max-tokens-per-namespace", str(QUOTA), "--usage-flush-seconds", "1"))
    plane.owners = {ns: plane.bootstrap(ns, "admin") for ns in ("default", "other")}
    plane.quota = QUOTA
    plane.start()
    yield plane
    plane.stop()

REPO = Path(__file__).resolve().parents[2]
VIEWPORT = {"width": 1200, "height": 720}
# Generous waits: the machine may be busy (2 cores, other suites); a wait
# only ever ends early when the expected state is there.
expect.set_options(timeout=limit_ms(10_000))
# What Envoy's upstream serves for a token's namespace (the echo server):
# GET lists (viewer and up), POST creates (editor and up).
APP = "/api/v1/namespaces/{ns}/deployments"


class Hidden(str):
    """A secret: a plain string to use, `<secret>` when shown. A failed
    assertion prints the arguments of the calls in it; never a secret."""

    def __repr__(self) -> str:
        return "<secret>"


def chromium_bin() -> str:
    return os.environ.get("CHROMIUM_BIN") or "/usr/bin/chromium"


def pytest_sessionstart(session):
    if not os.access(chromium_bin(), os.X_OK):
        raise pytest.UsageError(f"missing {chromium_bin()} (make chromium: apt-get install chromium)")


# ---------------------------------------------------------------------------
# The browser


@pytest.fixture(scope="session")
def browser_context(workdir, envoy):
    """One Chromium with its profile under the run's directory; the clipboard
    readable and writable for the console's origin (Envoy's listener)."""
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(workdir / "chromium-profile"),
            executable_path=chromium_bin(),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--no-first-run"],
            viewport=VIEWPORT,
            locale="en-US",
            timezone_id="UTC",
        )
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=envoy.base_url)
        context.set_default_timeout(limit_ms(10_000))
        yield context
        try:
            context.close()
        except Exception:  # closed already by the leak search
            pass


class Console:
    """The console in one browser page, with the checks every test makes:
    no page error and no Content-Security-Policy violation."""

    def __init__(self, page, envoy, workdir: Path):
        self.page = page
        self.envoy = envoy
        self.workdir = workdir
        self.url = envoy.base_url + "/console/"
        self.problems: list[str] = []
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("console", self._console)
        self.axe_runs: list[str] = []

    def _console(self, msg):
        text = msg.text
        if "Content Security Policy" in text or "Content-Security-Policy" in text:
            self.problems.append(f"CSP: {text}")

    def open(self):
        self.page.goto(self.url)
        expect(self.page.get_by_role("heading", name="Sign in")).to_be_visible()
        return self

    # -- locators ---------------------------------------------------------

    @property
    def signin(self):
        return self.page.get_by_role("form", name="Sign in")

    @property
    def create_dialog(self):
        return self.page.get_by_role("dialog", name="Create Token")

    @property
    def secret_dialog(self):
        return self.page.locator("#secret-dialog")

    @property
    def confirm_dialog(self):
        return self.page.locator("#confirm-dialog")

    @property
    def table(self):
        return self.page.get_by_role("table")

    # -- actions ----------------------------------------------------------

    def sign_in(self, ns: str, token: str, ok: bool = True):
        form = self.signin
        form.get_by_label("Namespace").fill(ns)
        form.get_by_label("Owner token").fill(token)
        form.get_by_role("button", name="Sign in").click()
        if ok:
            expect(self.page.get_by_role("heading", name="API Tokens")).to_be_visible()
            expect(self.page.locator("#tokens-ns")).to_have_text(ns)
            expect(self.page.get_by_role("combobox", name="Namespace").locator("option:checked")).to_have_text(ns)

    def open_create(self):
        self.page.get_by_role("button", name="Create Token").click()
        expect(self.create_dialog).to_be_visible()
        return self.create_dialog

    def fill_create(self, name: str, role: str, expiry: str | None = None):
        d = self.open_create()
        d.get_by_label("Name").fill(name)
        d.get_by_label("Role").select_option(role)
        if expiry:
            d.get_by_label("Expiry date").fill(expiry)
        return d

    def create(self, name: str, role: str, expiry: str | None = None) -> str:
        """Creates through the dialog; returns the secret as the Copy button put it on the clipboard."""
        d = self.fill_create(name, role, expiry)
        d.get_by_role("button", name="Create").click()
        expect(self.create_dialog).to_be_hidden()
        return self.copy_secret()

    def shown_secret(self) -> Hidden:
        """The secret in the open secret dialog (remembered for the leak search)."""
        shown = Hidden(self.secret_dialog.get_by_label("Secret").input_value())
        SECRETS.append(shown)
        return shown

    def copy_secret(self) -> str:
        """Copy in the secret dialog, read the clipboard back, close the dialog;
        the secret is then gone from the page."""
        d = self.secret_dialog
        expect(d).to_be_visible()
        field = d.get_by_label("Secret")
        # (Secrets are compared as booleans: a failed assertion must not print one.)
        shown = self.shown_secret()
        well_formed = re.fullmatch(r"apt_[0-9A-Za-z]{38}", shown) is not None
        assert well_formed, "the Secret field holds an apt_ secret"
        self.page.evaluate("navigator.clipboard.writeText('')")
        d.get_by_role("button", name="Copy").click()
        expect(d.get_by_role("status")).to_have_text("Copied to the clipboard.")
        copied = self.page.evaluate("navigator.clipboard.readText()")
        same = copied == shown
        assert same, "the clipboard holds the secret the dialog showed"
        d.get_by_role("button", name="Done").click()
        expect(d).to_be_hidden()
        emptied = field.input_value() == ""
        assert emptied, "the Secret field is emptied when the dialog closes"
        gone = shown not in self.page.content()
        assert gone, "the secret is gone from the page"
        return Hidden(copied)

    def rows(self) -> dict[str, dict[str, str]]:
        """The table: token id -> {column header: cell text}."""
        headers = [h.strip() for h in self.page.locator("#tokens-table thead th:visible").all_text_contents()]
        out = {}
        for row in self.page.locator("#tokens-body tr").all():
            cells = [c.strip() for c in row.locator("th, td").all_text_contents()]
            out[cells[0]] = dict(zip(headers, cells))
        return out

    def confirm(self, action: str, token_id: str, ok: bool = True):
        self.page.get_by_role("button", name=f"{action} {token_id}", exact=True).click()
        d = self.confirm_dialog
        expect(d).to_be_visible()
        expect(d.get_by_role("heading")).to_have_text(f"{action} {token_id}?")
        # Cancel has the focus: Enter or Space by mistake cancels.
        expect(d.get_by_role("button", name="Cancel")).to_be_focused()
        d.get_by_role("button", name="Cancel" if not ok else action, exact=True).click()
        return d

    # -- checks -----------------------------------------------------------

    def axe(self, state: str):
        """Zero axe-core violations in this state (every rule axe runs by default)."""
        results = Axe().run(self.page)
        self.axe_runs.append(state)
        assert results.violations_count == 0, f"axe-core, {state}:\n{results.generate_report()}"

    def screenshot(self, name: str):
        """The console's screenshots (docs/api.md): always into the run's directory, and into
        $UI_SCREENSHOT_DIR when set (docs/console for the committed ones)."""
        path = self.workdir / "screenshots" / f"{name}.png"
        path.parent.mkdir(exist_ok=True)
        self.page.screenshot(path=str(path))
        target = os.environ.get("UI_SCREENSHOT_DIR")
        if target:
            dest = Path(target) if os.path.isabs(target) else REPO / target
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest / path.name)
        return path


@pytest.fixture
def console(browser_context, envoy, workdir):
    page = browser_context.new_page()
    c = Console(page, envoy, workdir).open()
    yield c
    problems = c.problems
    page.close()
    assert problems == [], problems


@pytest.fixture
def second_console(browser_context, envoy, workdir):
    """Another tab: its own memory, so its own sign-ins."""
    page = browser_context.new_page()
    c = Console(page, envoy, workdir).open()
    yield c
    page.close()
    assert c.problems == [], c.problems


# ---------------------------------------------------------------------------
# Namespaces with an owner, and the gateway's answers


_counter = itertools.count(1)


@pytest.fixture
def namespace(cp, envoy):
    """A fresh namespace and its bootstrap owner token (`apitokens bootstrap`
    next to the running control plane), enforced by Envoy before the test."""

    def make(prefix: str = "team", exact: bool = False) -> tuple[str, str]:
        ns = prefix if exact else f"{prefix}-{next(_counter)}"
        owner = Hidden(cp.bootstrap(ns, "admin"))
        poll(lambda: request(envoy.port, "GET", tokens_path(ns), owner).status == 200, 10,
             f"owner of {ns} enforced")
        return ns, owner

    return make


@pytest.fixture
def issue(envoy):
    """issue(ns, owner, token_id, role): a token created through the gateway
    (not the console); its secret, remembered for the leak search."""

    def make(ns: str, owner: str, token_id: str, role: str, **extra) -> Hidden:
        r = create(envoy.port, owner, token_id, role, ns=ns, **extra)
        assert r.status == 200, f"create {token_id}: {r.status}"
        return Hidden(r.json()["apiToken"]["secret"])

    return make


def gateway_status(envoy, method: str, path: str, secret: str | None) -> int:
    return request(envoy.port, method, path, secret, body={} if method == "POST" else None).status


@pytest.fixture
def until():
    """until(envoy, method, path, secret, status): Envoy's answer once the
    pushed configuration carries the change (fresh connection per try)."""

    def wait(envoy, method: str, path: str, secret: str | None, status: int, timeout: float = 10.0) -> float:
        start = time.monotonic()
        poll(lambda: gateway_status(envoy, method, path, secret) == status, timeout,
             f"{method} {path} -> {status}")
        return time.monotonic() - start

    return wait


# ---------------------------------------------------------------------------
# The final search (session end): no secret the suite saw is left anywhere


def browser_places(run) -> dict[str, str]:
    """What the page's origin keeps (storage and cookies, kept on `run` for
    `nothing_kept`); then the browser closed, which writes its profile out,
    and the profile searched with every log, the database and its WAL, and
    Envoy's admin endpoints."""
    page = run.browser_context.new_page()
    page.goto(run.envoy.base_url + "/console/")
    run.storage = page.evaluate(
        "({local: Object.entries(localStorage), session: Object.entries(sessionStorage),"
        " cookie: document.cookie})"
    )
    run.cookies = run.browser_context.cookies()
    page.close()
    run.browser_context.close()
    return leaks.control_plane_places(run.workdir, run.envoy, run.cp,
                                      {"browser storage": repr(run.storage), "cookies": repr(run.cookies)})


def nothing_kept(run, places: dict[str, str]) -> None:
    """The page's origin keeps nothing at all; the profile was searched."""
    assert run.storage == {"local": [], "session": [], "cookie": ""}, run.storage
    assert run.cookies == [], run.cookies
    assert sum("chromium-profile" in p for p in places) >= 10, "the browser profile was searched"


leak_search = leaks.session_search(
    __file__, "workdir", "envoy", "cp", "browser_context",
    places=browser_places,
    must_exist={"apitokens.db", "envoy.log", "access.log", "serve-01.log", "Preferences"},
    searched=nothing_kept,
)
