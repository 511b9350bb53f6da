"""The requests of the differential suite: the product's paths in the spellings
routers disagree about, and the ways a request can name another method.

Deterministic: the same list every run, the same for every upstream and role.
"""

from __future__ import annotations

from dataclasses import dataclass, field

NS = "default"

# (path, kind) for namespace NS; the write method follows from the kind.
BASE = [
    ("/apitokens/v1/namespaces/{ns}/apitokens", "collection"),
    ("/apitokens/v1/namespaces/{ns}/apitokens/t1", "item"),
    ("/apitokens/v1/namespaces/{ns}/apitokens/t1:regenerate", "action"),
    ("/namespaces/v1/namespaces", "collection"),
    ("/namespaces/v1/namespaces/{ns}", "item"),
    ("/api/v1/namespaces/{ns}/secret-values", "collection"),
    ("/api/v1/namespaces/{ns}/secret-values/s1", "item"),
    ("/api/v1/namespaces/{ns}/deployment-defaults/d1", "item"),
    ("/api/v1/namespaces/{ns}/deployment-targets", "collection"),
    ("/api/v1/namespaces/{ns}/deployments", "collection"),
    ("/api/v1/namespaces/{ns}/deployments/d1", "item"),
    ("/artifacts/v1/namespaces/{ns}/artifacts:list", "action"),
    ("/artifacts/v1/namespaces/{ns}/artifacts:upload", "action"),
    ("/sql/v1beta1/namespaces/{ns}/sqlscripts:validate", "action"),
]

WRITE = {"collection": "POST", "item": "DELETE", "action": "POST"}


@dataclass
class Variant:
    label: str
    method: str
    path: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def __str__(self) -> str:
        extra = "".join(f" [{k}: {v}]" for k, v in self.headers)
        body = f" body={self.body!r}" if self.body else ""
        return f"{self.method} {self.path}{extra}{body} ({self.label})"


def _title(segment: str) -> str:
    return "-".join(part[:1].upper() + part[1:] for part in segment.split("-"))


def _join(segs: list[str]) -> str:
    return "/" + "/".join(segs)


def spellings(path: str) -> list[tuple[str, str, bool]]:
    """(label, path, also with the write method) for the spellings of `path`.
    Segments: 0 group, 1 version, 2 `namespaces`, 3 the namespace, 4 the resource."""
    segs = path.strip("/").split("/")
    out: list[tuple[str, str, bool]] = [("plain", path, True)]

    def seg(label: str, i: int, new: str, both: bool = False) -> None:
        if i < len(segs):
            out.append((label, _join(segs[:i] + [new] + segs[i + 1:]), both))

    seg("group-title", 0, segs[0].capitalize(), True)
    seg("group-upper", 0, segs[0].upper())
    seg("group-dot", 0, segs[0] + ".")
    seg("version-upper", 1, segs[1].upper(), True)
    seg("namespaces-upper", 2, segs[2].upper())
    if len(segs) > 4:
        r = segs[4]
        seg("resource-upper", 4, r.upper(), True)
        seg("resource-title", 4, _title(r), True)
        seg("resource-json", 4, r + ".json", True)
        seg("resource-dot", 4, r + ".", True)
        seg("resource-xml-upper", 4, r.upper() + ".XML")
        seg("resource-escaped-dot", 4, r + "%2Ejson")
        seg("resource-escaped-letter", 4, f"%{ord(r[0]):02X}{r[1:]}")
        seg("resource-semicolon", 4, r + ";v=1")
        if ":" in r:
            seg("resource-escaped-colon", 4, r.replace(":", "%3A"))
        out.append(("dot-segment", _join(segs[:4] + ["."] + segs[4:]), False))
        out.append(("dotdot-segment", _join(segs[:4] + ["x", ".."] + segs[4:]), True))
        out.append(("escaped-dotdot", _join(segs[:4] + ["x", "%2e%2e"] + segs[4:]), False))
        out.append(("backslash", _join(segs[:4]) + "\\" + "/".join(segs[4:]), False))
    if len(segs) > 5:
        seg("item-json", 5, segs[5] + ".json")
        seg("item-semicolon", 5, segs[5] + ";jsessionid=1")
    if len(segs) > 3:
        seg("ns-upper", 3, segs[3].upper())
        seg("ns-dot", 3, segs[3] + ".")
        seg("ns-json", 3, segs[3] + ".json")
        seg("ns-escaped", 3, f"%{ord(segs[3][0]):02x}{segs[3][1:]}")
        seg("ns-other", 3, "other", True)
        out.append(("ns-climb", _join(segs[:3] + ["other", ".."] + segs[3:]), True))
        out.append(("ns-climb-out", _join(segs[:4] + ["..", "other"] + segs[4:]), False))
    out.append(("trailing-slash", path + "/", True))
    out.append(("trailing-slashes", path + "//", False))
    out.append(("trailing-dot-segment", path + "/.", False))
    out.append(("double-slashes", "/" + "//".join(segs), False))
    out.append(("leading-double-slash", "/" + path, False))
    return out


def overrides(path: str) -> list[Variant]:
    """Ways a request can name another method (and one URL override)."""
    form = [("content-type", "application/x-www-form-urlencoded")]
    json_type = [("content-type", "application/json")]
    return [
        Variant("header-override", "GET", path, [("x-http-method-override", "DELETE")]),
        Variant("header-override-post", "POST", path, [("x-http-method-override", "PUT")]),
        Variant("header-override-lower", "POST", path, [("x-http-method-override", "delete")]),
        Variant("header-x-http-method", "GET", path, [("x-http-method", "PATCH")]),
        Variant("header-x-method-override", "POST", path, [("x-method-override", "DELETE")]),
        Variant("query-override", "GET", path + "?_method=DELETE"),
        Variant("query-override-post", "POST", path + "?_method=PUT"),
        Variant("query-override-escaped", "GET", path + "?x=1&%5Fmethod=delete"),
        Variant("form-override", "POST", path, form, b"_method=DELETE"),
        Variant("form-override-get", "POST", path, form, b"name=x&_method=GET"),
        Variant("json-override", "POST", path, json_type, b'{"_method": "PATCH"}'),
        Variant("url-override", "GET", path, [("x-original-url", "/api/v1/namespaces/default/secret-values")]),
    ]


def all_variants() -> list[Variant]:
    out: list[Variant] = []
    for template, kind in BASE:
        path = template.replace("{ns}", NS)
        write = WRITE[kind]
        for i, (label, spelled, both) in enumerate(spellings(path)):
            methods = ["GET", write] if both else [("GET", write)[i % 2]]
            out.extend(Variant(label, m, spelled) for m in methods)
        out.extend(overrides(path))
        # Overrides together with an alias of the resource segment.
        upper = {label: spelled for label, spelled, _ in spellings(path)}.get("resource-upper")
        if upper is not None:
            out.extend(v for v in overrides(upper) if v.label != "url-override")
    return out
