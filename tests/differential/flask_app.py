"""An upstream for tests/differential: Flask (from PyPI, tests/requirements.txt)
serving the product's resources (routes.json), each handler answering which
route ran, with which method and namespace.

- Flask's defaults: case-sensitive routes, a missing trailing slash redirected;
- `--mode tolerant`: `strict_slashes=False` (a trailing slash is the same
  route), Werkzeug's trailing-slash-tolerant configuration;
- the WSGI middleware `method-override` (PyPI) in front, which honours
  `X-HTTP-Method-Override` and `_method` in a POST's form body, as PHP
  frameworks do. (Its header lookup compares the CGI-style upper-case name,
  so the name is given in upper case.)

    python flask_app.py --mode default|tolerant     prints "listening PORT"
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from flask import Flask, jsonify, request
from method_override import MethodOverrideMiddleware
from werkzeug.exceptions import HTTPException
from werkzeug.serving import make_server

ROUTES = json.loads((Path(__file__).with_name("routes.json")).read_text())["routes"]
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def create_app(mode: str) -> Flask:
    app = Flask("differential")
    app.url_map.strict_slashes = mode != "tolerant"

    def handler(route: dict):
        def view(**params):
            resp = jsonify(route=route["id"], method=request.method, ns=params.get("ns"), url=request.full_path)
            # In headers too, for answers without a body (HEAD).
            resp.headers["x-route"] = route["id"]
            resp.headers["x-route-method"] = request.method
            resp.headers["x-route-ns"] = params.get("ns") or ""
            return resp

        return view

    for route in ROUTES:
        rule = route["path"].replace("{ns}", "<ns>").replace("{name}", "<name>")
        app.add_url_rule(rule, endpoint=route["id"], view_func=handler(route), methods=METHODS,
                         provide_automatic_options=False)

    @app.errorhandler(HTTPException)
    def no_route(e: HTTPException):
        # Reached the application, but no route ran (404, 405, 400, ...).
        resp = jsonify(route=None, error=e.code)
        resp.status_code = e.code or 500
        resp.headers["x-route"] = "-"
        return resp

    app.wsgi_app = MethodOverrideMiddleware(app.wsgi_app, header_override="X-HTTP-METHOD-OVERRIDE")
    return app


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["default", "tolerant"], default="default")
    args = ap.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    logging.getLogger("method_override").setLevel(logging.ERROR)
    server = make_server("127.0.0.1", 0, create_app(args.mode), threaded=True)
    print(f"listening {server.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
