"""The product's permission model (shared/notes/permission-model.md), written
independently of the filter's rules: given the route an upstream actually ran,
the method it ran it as and the namespace it read from the path, may a token
of this role and namespace do that?

This is the yardstick of the differential suite: the filter decides on the
path it sees; the oracle judges what the application did with the request.
"""

from __future__ import annotations

import json
from pathlib import Path

ROUTES = {r["id"]: r for r in json.loads(Path(__file__).with_name("routes.json").read_text())["routes"]}

ALL = frozenset({"list", "get", "create", "update", "delete"})
READ = frozenset({"list", "get"})
NONE: frozenset[str] = frozenset()

# resource -> role -> verbs
VERBS = {
    "ApiToken": {"viewer": NONE, "editor": NONE, "owner": ALL},
    "Namespace": {"viewer": NONE, "editor": NONE, "owner": frozenset({"get", "update"})},
    "SecretValue": {"viewer": NONE, "editor": ALL, "owner": ALL},
    "DeploymentDefaults": {"viewer": READ, "editor": READ, "owner": ALL},
    "DeploymentTarget": {"viewer": READ, "editor": READ, "owner": ALL},
    "Other": {"viewer": READ, "editor": ALL, "owner": ALL},
}

# Artifacts are used through actions: viewers may list and read metadata.
ARTIFACT_READS = frozenset({"list", "getMetadata"})


def verb(method: str, kind: str) -> str | None:
    """What a method does to a collection or an item (an action is judged by
    its method, as on a collection)."""
    if method in ("GET", "HEAD"):
        return "get" if kind == "item" else "list"
    return {"POST": "create", "PUT": "update", "PATCH": "update", "DELETE": "delete"}.get(method)


def judge(role: str, token_ns: str, route_id: str, method: str, ns: str) -> str | None:
    """None when the route that ran is one the token may run; otherwise why not."""
    route = ROUTES.get(route_id)
    if route is None:
        return f"unknown route {route_id!r}"
    if "{ns}" not in route["path"]:
        return "a route outside every namespace"
    if ns != token_ns:
        return f"namespace {ns!r}, not the token's {token_ns!r}"
    if route["resource"] == "Artifacts":
        if route["action"] in ARTIFACT_READS or role in ("editor", "owner"):
            return None
        return f"{role} may not call artifacts:{route['action']}"
    v = verb(method, route["kind"])
    if v is None:
        return f"method {method!r} is no verb"
    if v not in VERBS[route["resource"]][role]:
        return f"{role} may not {v} {route['resource']}"
    return None
