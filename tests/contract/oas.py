"""The OpenAPI document of the token API (control-plane/openapi.json), and an
answer checked against it without schemathesis: for the requests schemathesis
does not make (several Authorization headers, a 64 KiB body, repeated query
parameters, a quota or a write rate reached).

`check(doc, template, method, status, headers, body)` asserts that the status
is documented for the operation, that the Content-Type is the documented one,
that every required header is there and every documented header's value
matches its schema, and that the body matches the response schema (JSON
Schema 2020-12 with formats: `date-time` is RFC 3339). Its messages go
through `redact`: no secret this run knows of, nothing shaped like an `apt_`
secret.

"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

REPO = Path(__file__).resolve().parents[2]
DOCUMENT = REPO / "control-plane" / "openapi.json"
URI = "urn:apitokens:openapi"
# What a secret looks like (docs/api.md, "Secrets"): never in an error body.
SECRET_SHAPE = re.compile(rb"apt_[0-9A-Za-z]{38}")

def load() -> dict:
    return json.loads(DOCUMENT.read_text())


def redact(text: str | bytes, secrets: list[str] = ()) -> str:
    """`text` safe to print: every known secret and every apt_ secret replaced."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    for s in secrets:
        if s:
            text = text.replace(s, "<secret>")
    return SECRET_SHAPE.sub(b"<apt_ secret>", text.encode()).decode()


class Document:
    def __init__(self, raw: dict):
        self.raw = raw
        self.registry = Registry().with_resource(URI, Resource.from_contents(raw, default_specification=DRAFT202012))

    def resolve(self, obj: dict) -> dict:
        """Follows a `$ref` to a component (responses, headers, parameters)."""
        while isinstance(obj, dict) and "$ref" in obj and len(obj) == 1:
            node = self.raw
            for part in obj["$ref"].removeprefix("#/").split("/"):
                node = node[part.replace("~1", "/").replace("~0", "~")]
            obj = node
        return obj

    def operation(self, template: str, method: str) -> dict:
        return self.raw["paths"][template][method.lower()]

    def validator(self, pointer: str) -> jsonschema.Draft202012Validator:
        return jsonschema.Draft202012Validator(
            {"$ref": f"{URI}#{pointer}"},
            registry=self.registry,
            format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
        )

    def response(self, template: str, method: str, status: int) -> tuple[dict, str]:
        """The documented response object and its JSON pointer."""
        responses = self.operation(template, method)["responses"]
        assert str(status) in responses, (
            f"{method.upper()} {template}: {status} is not documented (documented: {sorted(responses)})"
        )
        entry = responses[str(status)]
        if "$ref" in entry:
            return self.resolve(entry), entry["$ref"].removeprefix("#")
        esc = template.replace("~", "~0").replace("/", "~1")
        return entry, f"/paths/{esc}/{method.lower()}/responses/{status}"


def media_type(value: str | None) -> str:
    return (value or "").split(";")[0].strip().lower()


def check(doc: Document, template: str, method: str, status: int, headers: dict[str, str], body: bytes,
          secrets: list[str] = ()):
    """Asserts the answer matches the document; returns the parsed JSON body (or the text)."""
    where = f"{method.upper()} {template} -> {status}"
    entry, pointer = doc.response(template, method, status)
    lower = {k.lower(): v for k, v in headers.items()}
    for name, header in entry.get("headers", {}).items():
        header = doc.resolve(header)
        value = lower.get(name.lower())
        if value is None:
            assert not header.get("required"), f"{where}: required header {name} missing"
            continue
        schema = header.get("schema", {})
        if schema.get("type") == "integer":
            assert re.fullmatch(r"[0-9]+", value), f"{where}: {name}: {value!r} is not an integer"
            instance = int(value)
        else:
            instance = value
        errors = list(jsonschema.Draft202012Validator(schema).iter_errors(instance))
        assert not errors, f"{where}: header {name}: {redact(value, secrets)!r}: {redact(errors[0].message, secrets)}"
    content = entry.get("content", {})
    if not content:
        assert body == b"", f"{where}: a body where none is documented"
        return None
    got = media_type(lower.get("content-type"))
    assert got in content, f"{where}: Content-Type {got!r}, documented: {sorted(content)}"
    esc = got.replace("~", "~0").replace("/", "~1")
    validator = doc.validator(f"{pointer}/content/{esc}/schema")
    if got == "application/json":
        try:
            instance = json.loads(body)
        except ValueError:
            raise AssertionError(f"{where}: the body is not JSON: {redact(body[:200], secrets)!r}") from None
    else:
        instance = body.decode("utf-8")
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    assert not errors, (
        f"{where}: the body does not match the document: "
        + "; ".join(f"at {list(e.absolute_path)}: {redact(e.message, secrets)[:300]}" for e in errors[:5])
    )
    return instance


# (operation, status) -> answers, of the generated calls (printed at the end).
SEEN: dict[tuple[str, int], int] = {}


