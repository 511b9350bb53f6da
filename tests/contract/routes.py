"""The routes the control plane's HTTP server has, read from its source
(`control-plane/src/**/*.rs`, tests left out): every `.route(PATH, METHODS)`
of an axum `Router`, with PATH resolved from string literals, `const`s and
`let x = format!(...)` in the same code, and METHODS from the method router
(`get(..).post(..)`, `any(..)`, `read_only(..)` for GET). A route whose path cannot be resolved is an
error, not a silent miss: a new route must be added to the document (and, if
its path is built in a new way, here).

`documented(route)` maps an axum route to the OpenAPI operations it serves:
axum's `{namespace}` is the document's `{ns}` (VVP's name); `{item}` is
`{apiTokenName}` for GET and DELETE and `{apiTokenName}:ACTION` for POST, for
each action of `TOKEN_ACTIONS` in `api/extract.rs` (axum cannot route on the
`:action` suffix of a segment, the handler parses it); the console's
catch-all `{*rest}` is `{asset}`, and its `any(..)` serves GET (and HEAD;
other methods are its own 405).
"""

from __future__ import annotations

import re
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / "control-plane" / "src"

PARAMS = {"namespace": "ns", "item": "apiTokenName", "*rest": "asset"}
LET_FORMAT = re.compile(r'\blet\s+([a-z_][a-z0-9_]*)\s*=\s*format!\(\s*"((?:[^"\\]|\\.)*)"\s*\)\s*;')
METHODS = ("get", "post", "put", "delete", "patch", "head", "options", "trace", "any")


def _code(path: Path) -> str:
    """The file without its `#[cfg(test)]` module and comments."""
    text = path.read_text()
    cut = text.find("#[cfg(test)]")
    if cut >= 0:
        text = text[:cut]
    return re.sub(r"//[^\n]*", "", text)


def _balanced(text: str, start: int) -> str:
    """The text from `start` (just after an opening parenthesis) to its closing one."""
    depth = 1
    i = start
    while depth and i < len(text):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        i += 1
    return text[start:i - 1]


def _resolve(expr: str, consts: dict[str, str], lets: dict[str, str]) -> str | None:
    expr = expr.strip().lstrip("&").strip()
    literal = re.fullmatch(r'"((?:[^"\\]|\\.)*)"', expr)
    if literal:
        return literal.group(1)
    if expr in lets:
        return lets[expr]
    if expr in consts:
        return consts[expr]
    return None


def _format(template: str, names: dict[str, str]) -> str | None:
    out = []
    for part in re.split(r"(\{\{|\}\}|\{[A-Za-z_][A-Za-z0-9_]*\})", template):
        if part == "{{":
            out.append("{")
        elif part == "}}":
            out.append("}")
        elif part.startswith("{") and part.endswith("}"):
            value = names.get(part[1:-1])
            if value is None:
                return None
            out.append(value)
        else:
            out.append(part)
    return "".join(out)


def server_routes() -> tuple[set[tuple[str, str]], list[str]]:
    """{(axum path, method)} of every route, and the route expressions that
    could not be resolved."""
    files = [p for p in SOURCE.rglob("*.rs") if p.name != "tests.rs" and "tests" not in p.parts]
    codes = {p: _code(p) for p in files}
    # Routers are axum's: a file without axum has none (push/grpc.rs's
    # `route(method, req)` dispatches a gRPC method on the xDS port).
    routers = {p: code for p, code in codes.items() if "axum" in code}
    const = re.compile(r'\bconst\s+([A-Z_][A-Z0-9_]*)\s*:\s*&str\s*=\s*"((?:[^"\\]|\\.)*)"\s*;')
    # A `const` of the same file, else one of that name in exactly one other file.
    everywhere: dict[str, set[str]] = {}
    for code in codes.values():
        for name, value in const.findall(code):
            everywhere.setdefault(name, set()).add(value)
    shared = {name: next(iter(values)) for name, values in everywhere.items() if len(values) == 1}
    routes: set[tuple[str, str]] = set()
    unresolved: list[str] = []
    for path, code in routers.items():
        consts = {**shared, **dict(const.findall(code))}
        lets: dict[str, str] = {}
        for name, template in LET_FORMAT.findall(code):
            value = _format(template, {**consts, **lets})
            if value is not None:
                lets[name] = value
        for m in re.finditer(r"\.(nest|nest_service|route_service)\(", code):
            unresolved.append(f"{path.relative_to(SOURCE.parent)}: .{m.group(1)}(...) (not read by routes.py)")
        for m in re.finditer(r"\.route\(", code):
            args = _balanced(code, m.end())
            # The first argument ends at the first comma outside parentheses.
            depth, cut = 0, len(args)
            for i, c in enumerate(args):
                depth += {"(": 1, ")": -1}.get(c, 0)
                if c == "," and depth == 0:
                    cut = i
                    break
            first, rest = args[:cut], args[cut + 1:]
            resolved = _resolve(first, consts, lets)
            if resolved is None:
                unresolved.append(f"{path.relative_to(SOURCE.parent)}: .route({first.strip()}, ...)")
                continue
            methods = set(re.findall(r"\b(" + "|".join(METHODS) + r")\(", rest))
            # api/mod.rs `read_only(handler)`: GET, other methods a JSON 405.
            if re.search(r"\bread_only\(", rest):
                methods.add("get")
            if not methods:
                unresolved.append(f"{path.relative_to(SOURCE.parent)}: .route({first.strip()}, {rest.strip()[:60]})")
            for method in methods:
                routes.add((resolved, method))
    return routes, unresolved


def token_actions() -> list[str]:
    """`TOKEN_ACTIONS` of `api/extract.rs`: the actions the item route's POST
    handler takes (`{item}:ACTION`)."""
    code = _code(SOURCE / "api" / "extract.rs")
    m = re.search(r"\bconst\s+TOKEN_ACTIONS\s*:\s*\[&str;\s*\d+\]\s*=\s*\[([^\]]*)\]", code)
    if not m:
        raise AssertionError("api/extract.rs: no `const TOKEN_ACTIONS: [&str; N] = [...]` (teach routes.py the new form)")
    return re.findall(r'"([^"]+)"', m.group(1))


def documented(route: tuple[str, str]) -> set[tuple[str, str]]:
    """The document's (path, method)s for an axum (path, method)."""
    path, method = route
    doc_path = re.sub(r"\{(\*?[a-z_]+)\}", lambda m: "{" + PARAMS.get(m.group(1), m.group(1)) + "}", path)
    if method == "any":
        method = "get"
    if path.endswith("/{item}") and method == "post":
        return {(f"{doc_path}:{action}", method) for action in token_actions()}
    return {(doc_path, method)}
