"""The final secret search of the end-to-end suites: every secret a suite
issued must be absent from every log, access log, database file, Envoy admin
endpoint and control-plane page it could have reached.

Each suite's conftest makes its fixture with `session_search`: a
session-scoped autouse fixture `leak_search` that runs after the last test
(its teardown) and reports through `at_session_end`, so that a failed check
is an error of the run (pytest reports it at the teardown of the last test;
the exit status is not 0). What differs from suite to suite is an argument:
the fixtures it reads, the places it searches, the files that must have been
searched, what else it checks."""

from __future__ import annotations

import base64
import functools
import json
import re
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable

import pytest

from testkit.checks import no_wasm_failures
from testkit.clients import request
from testkit.harness import SECRETS

# What an Envoy's admin interface shows that could carry a secret.
ADMIN_ENDPOINTS = (
    "/config_dump?include_eds",
    "/config_dump?resource=ecds_filters",
    "/stats",
    "/stats/prometheus",
    "/clusters",
    "/listeners",
)


def exposed(
    dirs: Iterable[Path] = (),
    admins: dict[str, Callable[[str], str]] | None = None,
    texts: dict[str, str] | None = None,
    endpoints: Iterable[str] = ADMIN_ENDPOINTS,
) -> dict[str, str]:
    """Everything to search, by where it came from: every file under `dirs`
    (logs, access logs, databases and their WAL, ECDS files; read as bytes),
    each Envoy's admin `endpoints` (`admins`: name -> admin GET function), and
    `texts` (responses, status pages)."""
    out = dict(texts or {})
    for name, admin_get in (admins or {}).items():
        for endpoint in endpoints:
            out[f"{name} {endpoint}"] = text = admin_get(endpoint)
            if endpoint.startswith("/config_dump"):
                # The control plane pushes the compact (binary) encoding as a
                # BytesValue, which config_dump shows in base64: search it decoded.
                out[f"{name} {endpoint} (decoded BytesValue)"] = decoded_bytes_values(text)
    for d in dirs:
        for p in sorted(d.rglob("*")):
            if p.is_file():
                out[str(p)] = p.read_bytes().decode("latin-1")
    return out


def decoded_bytes_values(config_dump: str) -> str:
    """Every google.protobuf.BytesValue in a config_dump, decoded (latin-1)."""
    found: list[str] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            if node.get("@type") == "type.googleapis.com/google.protobuf.BytesValue":
                found.append(base64.b64decode(node.get("value", "")).decode("latin-1"))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    try:
        walk(json.loads(config_dump))
    except ValueError:
        pass
    return "\n".join(found)


RUN = re.compile(r"[0-9A-Za-z]{32,}")


def leaks(places: dict[str, str], secrets: Iterable[str]) -> list[str]:
    """Where a secret (or, for `apt_` secrets, its 32-character random part
    alone) appears: an empty list is a clean run. One pass over each text:
    every run of 32 or more base62 characters is matched against the random
    parts (a set), so thousands of secrets cost what one does."""
    secrets = list(dict.fromkeys(secrets))
    parts = {s[4:36]: s for s in secrets if s.startswith("apt_") and len(s) >= 36}
    others = [s for s in secrets if not (s.startswith("apt_") and len(s) >= 36)]
    found = []
    for where, text in places.items():
        hits: set[str] = set()
        for run in RUN.finditer(text):
            word = run.group()
            for i in range(len(word) - 31):
                if word[i:i + 32] in parts:
                    hits.add(parts[word[i:i + 32]])
        for secret in hits:
            found.append(f"a secret in {where}" if secret in text else f"a secret's random part in {where}")
        found += [f"a secret in {where}" for secret in others if secret in text]
    return found


def control_plane_places(workdir: Path, envoy, cp, texts: dict[str, str] | None = None) -> dict[str, str]:
    """What a suite on one control plane and one Envoy exposes: every file
    under `workdir`, the Envoy's admin endpoints, the control plane's /status
    and `texts`."""
    status = request(cp.api_port, "GET", "/status").body.decode()
    return exposed([workdir], {"envoy": envoy.admin_get}, {"status": status, **(texts or {})})


def envoy_logs(envoys: Iterable) -> dict[str, str]:
    """The log, stderr, stdout and access log of each Envoy (harness.Envoy), by
    where they came from, for the ones that exist."""
    out = {}
    for envoy in envoys:
        for what, path in (("log", envoy.log_path), ("stderr", envoy.dir / "stderr.txt"),
                           ("stdout", envoy.stdout_path), ("access log", envoy.access_log_path)):
            if path.exists():
                out[f"{envoy.name} {what} ({path})"] = path.read_text("utf-8", "replace")
    return out


def whole_suite(session: pytest.Session, suite: Path) -> bool:
    """Whether this session ran the whole suite in the directory `suite`: every
    test module there collected, no test deselected (-k, -m, --deselect, --lf)
    or chosen by node id, no stop after failures (-x, --maxfail), whatever
    the order of its modules. A suite's sanity checks of its final search
    ("its tests issued secrets", "these files were searched") hold only then;
    the search itself runs after any run."""
    if session.shouldfail or session.shouldstop:
        return False
    if any("::" in str(arg) for arg in session.config.args):
        return False
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and reporter.stats.get("deselected"):
        return False
    return {item.path for item in session.items} == set(suite.glob("test_*.py"))


def at_session_end(checks: dict[str, Callable[[], object]]) -> None:
    """Run every check (one failing does not skip the next) and fail with what
    each failed one said. Called from a session fixture's teardown, so a
    failure is reported as an error at the end of the run."""
    failures = []
    for name, check in checks.items():
        try:
            check()
        except AssertionError as exc:
            where = traceback.extract_tb(exc.__traceback__)[-1]
            failures.append(f"{name}: {where.filename}:{where.lineno}: {where.line}\n{exc}".rstrip())
        except Exception:  # an Envoy or a control plane that no longer answers, ...
            failures.append(f"{name}:\n{traceback.format_exc()}".rstrip())
    if failures:
        pytest.fail("checks at the end of the session failed:\n\n" + "\n\n".join(failures), pytrace=False)


def session_search(conftest: str, *fixtures: str,
                   places: Callable[[SimpleNamespace], dict[str, str]],
                   must_exist: Iterable[str] = (),
                   whole_suite_must_exist: Iterable[str] = (),
                   searched: Callable[[SimpleNamespace, dict[str, str]], None] | None = None,
                   wasm: Callable[[SimpleNamespace], Iterable] | None = None,
                   checks: dict[str, Callable[[SimpleNamespace], object]] | None = None,
                   extra_secrets: Iterable[str] = (),
                   tests_issue_secrets: bool = True):
    """A suite's final search, as the session-scoped autouse fixture its
    conftest names `leak_search` (`leak_search = leaks.session_search(__file__,
    "workdir", "envoy", "cp", places=...)`). When the session ends (before
    the session fixtures it reads stop), it runs these checks, each reported
    on its own (`at_session_end`):

    - "no secret anywhere": no secret of `SECRETS` (and `extra_secrets`) in
      `places(run)`. `run` has the session fixtures named in `fixtures` as
      attributes, and `whole`: whether the session ran the whole suite (the
      directory of `conftest`; see `whole_suite`). The files named in
      `must_exist` were searched (the session fixtures make them), and, when
      the whole suite ran, those of `whole_suite_must_exist` too; then
      `searched(run, places)` checks what else the places must hold. There
      are secrets to look for; when the whole suite ran and
      `tests_issue_secrets`, its tests issued some beyond those of the session
      fixtures (in whatever order its modules ran).
    - "no Wasm failure": each Envoy of `wasm(run)` shows no Wasm failure
      (testkit.checks.no_wasm_failures) and still runs.
    - every check of `checks`, by its name, called with `run`.
    """
    suite = Path(conftest).parent
    always, whole_only = set(must_exist), set(whole_suite_must_exist)

    @pytest.fixture(scope="session", autouse=True)
    def leak_search(request):
        # Read with getfixturevalue: pytest stops them after this fixture's teardown.
        run = SimpleNamespace(**{name: request.getfixturevalue(name) for name in fixtures}, whole=False)
        before_tests = len(SECRETS)
        yield
        run.whole = whole_suite(request.session, suite)

        def no_secret_anywhere() -> None:
            assert SECRETS, "no secret to look for: did the suite run?"
            if run.whole and tests_issue_secrets:
                assert len(SECRETS) > before_tests, "the suite's tests issued no secret: none of theirs to look for"
            searched_places = places(run)
            names = {Path(p).name for p in searched_places}
            wanted = always | (whole_only if run.whole else set())
            assert wanted <= names, f"not searched: {sorted(wanted - names)}"
            found = leaks(searched_places, [*SECRETS, *extra_secrets])
            assert found == [], "\n".join(found)
            if searched is not None:
                searched(run, searched_places)

        def no_wasm_failure() -> None:
            for envoy in wasm(run):
                no_wasm_failures(envoy)
                assert envoy.running, f"{envoy.name} is no longer running"

        named: dict[str, Callable[[], object]] = {"no secret anywhere": no_secret_anywhere}
        if wasm is not None:
            named["no Wasm failure"] = no_wasm_failure
        named.update({name: functools.partial(check, run) for name, check in (checks or {}).items()})
        at_session_end(named)

    return leak_search
