// An upstream for tests/differential: Express 5 (from npm, see package.json)
// serving the product's resources (routes.json), each handler answering which
// route ran, with which method and namespace. Configured the way applications
// commonly configure it, so that the suite sees what such an application would
// run for each spelling of a request:
//
// - Express's defaults: case-insensitive routing, a trailing slash tolerated;
// - method-override (npm) for the X-HTTP-Method-Override, X-HTTP-Method and
//   X-Method-Override headers and `_method` in the query, on any method, and
//   for `_method` in a form or JSON body (POST, method-override's default);
// - `--mode format`: every route also takes a format suffix (`{.:format}`:
//   `/secret-values.json`), as Rails and older Spring do.
//
//   node express_app.js --mode default|format     prints "listening PORT"

"use strict";

const express = require("express");
const methodOverride = require("method-override");
const routes = require("./routes.json").routes;

const mode = process.argv[process.argv.indexOf("--mode") + 1] || "default";
if (!["default", "format"].includes(mode)) {
  console.error(`unknown mode ${mode}`);
  process.exit(2);
}

const app = express();
app.disable("x-powered-by");
app.use(express.urlencoded({ extended: false }));
app.use(express.json());
for (const header of ["X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"]) {
  app.use(methodOverride(header, { methods: null }));
}
app.use(methodOverride("_method", { methods: null }));
app.use(
  methodOverride((req) => {
    if (req.body && typeof req.body === "object" && "_method" in req.body) {
      return req.body._method;
    }
    return undefined;
  }),
);

// routes.json's {ns} / {name} as Express 5 (path-to-regexp 8) parameters; a
// literal ':' (custom methods) must be escaped.
function expressPath(template) {
  const path = template
    .replace(/:/g, "\\:")
    .replace("{ns}", ":ns")
    .replace("{name}", ":name");
  return mode === "format" ? `${path}{.:format}` : path;
}

for (const route of routes) {
  app.all(expressPath(route.path), (req, res) => {
    // In headers too, for answers without a body (HEAD).
    res.set({
      "x-route": route.id,
      "x-route-method": req.method,
      "x-route-ns": req.params.ns === undefined ? "" : req.params.ns,
    });
    res.json({
      route: route.id,
      method: req.method,
      originalMethod: req.originalMethod,
      ns: req.params.ns === undefined ? null : req.params.ns,
      url: req.originalUrl,
    });
  });
}

// Reached the application, but no route ran.
app.use((req, res) => {
  res.status(404).set("x-route", "-").json({ route: null });
});
// eslint-disable-next-line no-unused-vars
app.use((err, req, res, next) => {
  res
    .status(err.status || 500)
    .set("x-route", "-")
    .json({ route: null, error: String(err.type || err.name) });
});

const server = app.listen(0, "127.0.0.1", () => {
  console.log(`listening ${server.address().port}`);
});
