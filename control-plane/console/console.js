// The apitokens console: Settings > API Tokens.
//
// Talks only to the token REST API on this origin, with Authorization: Bearer.
// Owner tokens live in `sessions` (this tab's memory) and nowhere else; a
// one-time secret lives in the Secret field of its dialog until the dialog
// closes. Every piece of dynamic text is set with textContent or .value,
// never parsed as markup.
"use strict";

(() => {
  const API = "/apitokens/v1/namespaces/";
  const DNS_LABEL = /^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$/;
  // RFC 6750 b64token: what may follow "Bearer ".
  const B64TOKEN = /^[A-Za-z0-9\-._~+/]+=*$/;
  const NAME_RULE =
    "Use 1 to 63 lower-case letters (a-z), digits and hyphens, starting and ending with a letter or digit.";

  /** namespace -> owner token, in this tab's memory only. */
  const sessions = new Map();
  /** The namespace on screen. */
  let current = null;
  /** What the confirm dialog will do when confirmed. */
  let pending = null;

  const $ = (id) => document.getElementById(id);

  // ---------------------------------------------------------------------
  // The API

  class ApiError extends Error {
    constructor(status, body, retryAfter, challenged) {
      super(status === 0 ? "network error" : `HTTP ${status}`);
      this.status = status;
      this.body = body;
      this.retryAfter = retryAfter;
      // A WWW-Authenticate challenge: the gateway's (or the API's) refusal
      // of the credential or its role, not a rule about the token acted on.
      this.challenged = challenged;
    }

    get field() {
      return this.body && typeof this.body.field === "string" ? this.body.field : null;
    }

    get detail() {
      return this.body && typeof this.body.message === "string" ? this.body.message : "";
    }
  }

  async function call(ns, token, method, path, body) {
    const headers = { Authorization: `Bearer ${token}`, Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let resp;
    try {
      resp = await fetch(`${API}${encodeURIComponent(ns)}/apitokens${path}`, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        credentials: "omit",
        cache: "no-store",
        redirect: "error",
        referrerPolicy: "no-referrer",
        mode: "same-origin",
      });
    } catch {
      throw new ApiError(0, null, null, false);
    }
    let data = null;
    try {
      data = JSON.parse(await resp.text());
    } catch {
      data = null;
    }
    if (!resp.ok) {
      throw new ApiError(resp.status, data, resp.headers.get("retry-after"), resp.headers.has("www-authenticate"));
    }
    return data;
  }

  /** An API error in words, for `what` ("sign-in", "list", "create", "regenerate", "disable", "enable", "revoke"). */
  function describe(err, what, ns, id) {
    const detail = err.detail ? ` (The server said: ${err.detail})` : "";
    const s = err.status;
    if (s === 0) {
      return "The console could not reach the server. Check your network connection, then try again.";
    }
    if (s === 401) {
      return what === "sign-in"
        ? "This owner token was not accepted: it is unknown, expired, revoked or mistyped. Check it and try again."
        : `Your owner token for namespace “${ns}” is no longer accepted: it may have been revoked or have expired. Sign in again.`;
    }
    if (s === 403) {
      // An owner refused by a rule beyond its role (a token that outlives
      // it, a previous secret): no challenge, and the server's words say which.
      if (!err.challenged && id) {
        return `You may not ${what} “${id}” with this owner token.${detail}`;
      }
      return `This token is not an owner of namespace “${ns}”. Only an owner token of a namespace can manage its API tokens.`;
    }
    if (s === 404 && id) {
      return `The token “${id}” does not exist any more: it may have been revoked meanwhile. The list has been refreshed.`;
    }
    if (s === 409) {
      return what === "update"
        ? `The token “${id}” was changed meanwhile by someone else; nothing was saved. The list has been refreshed: open its conditions again to see them.`
        : `A token named “${id}” already exists in namespace “${ns}”. Choose another name.`;
    }
    if (s === 413) return "The request was too large for the server.";
    if (s === 429) {
      const wait = /^\d+$/.test(err.retryAfter || "") ? ` You can try again in ${err.retryAfter} seconds.` : "";
      return what === "create"
        ? `Namespace “${ns}” has reached its token quota, so no more tokens can be created. Revoke tokens it no longer needs, then try again.${wait}${detail}`
        : `The server is receiving too many requests. Wait a moment, then try again.${wait}${detail}`;
    }
    if (s === 502 || s === 503 || s === 504) {
      return `The token service is not reachable right now (error ${s}). Wait a moment and try again; if this keeps happening, the control plane may be down.`;
    }
    if (s >= 500) {
      return `The token service failed to complete the request (error ${s}). Try again; if this keeps happening, check the control plane's log.${detail}`;
    }
    if (s === 400) return `The server refused the request as invalid.${detail}`;
    return `The server gave an unexpected answer (error ${s}).${detail}`;
  }

  // ---------------------------------------------------------------------
  // Small helpers

  function show(el, visible) {
    el.hidden = !visible;
  }

  function setText(id, text) {
    $(id).textContent = text;
  }

  function formatTime(value) {
    const time = document.createElement("time");
    const d = new Date(value);
    if (typeof value !== "string" || Number.isNaN(d.getTime())) {
      time.textContent = String(value);
      return time;
    }
    time.dateTime = value;
    time.textContent = `${d.toISOString().slice(0, 16).replace("T", " ")} UTC`;
    return time;
  }

  function shortId(name) {
    const parts = String(name).split("/");
    return parts[parts.length - 1];
  }

  /** Field errors: text next to the field, aria-invalid on it. */
  function fieldError(inputId, message) {
    const input = $(inputId);
    setText(`${inputId}-error`, message || "");
    if (message) input.setAttribute("aria-invalid", "true");
    else input.removeAttribute("aria-invalid");
  }

  function busy(form, on) {
    for (const b of form.querySelectorAll("button")) b.disabled = on;
    form.setAttribute("aria-busy", on ? "true" : "false");
  }

  // ---------------------------------------------------------------------
  // Views

  function showSignIn(message, namespace) {
    show($("tokens-view"), false);
    show($("side-nav"), false);
    show($("signin-view"), true);
    show($("signin-cancel"), sessions.size > 0);
    fieldError("signin-ns", "");
    fieldError("signin-token", "");
    setText("signin-error", message || "");
    $("signin-token").value = "";
    if (namespace !== undefined) $("signin-ns").value = namespace;
    renderNamespaces();
    ($("signin-ns").value ? $("signin-token") : $("signin-ns")).focus();
  }

  function renderNamespaces() {
    const select = $("ns-select");
    select.replaceChildren();
    for (const ns of [...sessions.keys()].sort()) {
      const option = document.createElement("option");
      option.value = ns;
      option.textContent = ns;
      option.selected = ns === current;
      select.append(option);
    }
    show($("ns-bar"), sessions.size > 0);
  }

  function showTokens() {
    show($("signin-view"), false);
    show($("side-nav"), true);
    show($("tokens-view"), true);
    renderNamespaces();
    setText("tokens-ns", current);
    setText("tokens-caption-ns", current);
  }

  /** Loads and shows the tokens of the current namespace; false on failure. */
  async function refresh() {
    const ns = current;
    let data;
    try {
      data = await call(ns, sessions.get(ns), "GET", "");
    } catch (err) {
      if (handleUnauthorized(err, ns)) return false;
      setText("tokens-error", describe(err, "list", ns));
      return false;
    }
    if (ns !== current) return false;
    renderTable(Array.isArray(data && data.apiTokens) ? data.apiTokens : []);
    await refreshActivity(ns);
    return true;
  }

  /** What each audit event is, in words. */
  const EVENTS = {
    "apitoken.create": "Created",
    "apitoken.regenerate": "Secret regenerated",
    "apitoken.disable": "Disabled",
    "apitoken.enable": "Enabled",
    "apitoken.delete": "Revoked",
    "apitoken.revoke": "Revoked: reported leaked",
    "apitoken.import": "Imported",
    "apitoken.expiring": "Expires soon",
    "apitoken.update": "Conditions changed",
    "apitoken.inactivity": "Inactivity policy set",
  };

  /** The namespace's latest audit events (the activity table); a failure is
   * said above it, the tokens stay. */
  async function refreshActivity(ns) {
    setText("activity-error", "");
    let data;
    try {
      data = await call(ns, sessions.get(ns), "GET", ":events?pageSize=20");
    } catch (err) {
      if (ns === current) setText("activity-error", describe(err, "list", ns));
      return;
    }
    if (ns !== current) return;
    const events = Array.isArray(data && data.events) ? data.events : [];
    const rows = events.map((e) => {
      const tr = document.createElement("tr");
      const when = document.createElement("td");
      when.append(formatTime(e.time));
      const what = document.createElement("td");
      const kind = String(e.event);
      what.textContent = EVENTS[kind] || kind;
      if (kind === "apitoken.revoke") what.className = "state-disabled";
      const token = document.createElement("td");
      token.textContent = e.token ? shortId(e.token) : e.count !== undefined ? `${e.count} tokens` : "";
      const by = document.createElement("td");
      const actor = String(e.actor || "");
      by.textContent = actor.startsWith("namespaces/") ? shortId(actor) : actor;
      by.title = actor;
      const from = document.createElement("td");
      from.textContent = e.clientAddress ? String(e.clientAddress) : "";
      tr.append(when, what, token, by, from);
      return tr;
    });
    $("activity-body").replaceChildren(...rows);
    show($("activity-table"), rows.length > 0);
    show($("activity-empty"), rows.length === 0);
  }

  function renderTable(tokens) {
    const withLastUse = tokens.some((t) => t && Object.prototype.hasOwnProperty.call(t, "lastUseTime"));
    show($("col-last-used"), withLastUse);
    // The access evidence: shown once any token has some (an older control
    // plane, or filters that do not report it, leave the column out).
    const withAccess = tokens.some((t) => t && t.access && Array.isArray(t.access.kinds));
    show($("col-access"), withAccess);
    if (withAccess) {
      const days = tokens.find((t) => t && t.access).access.days;
      $("col-access").textContent = Number.isInteger(days) ? `Access (${days} days)` : "Access";
    }
    const now = Date.now();
    const rows = tokens.map((t) => {
      const id = shortId(t.name);
      const tr = document.createElement("tr");
      const name = document.createElement("th");
      name.scope = "row";
      name.textContent = id;
      name.title = String(t.name);
      const role = document.createElement("td");
      role.textContent = String(t.role);
      // Listed as the API says it; a token without a state (an older
      // control plane) is enabled.
      const disabled = t.state === "disabled";
      const state = document.createElement("td");
      state.textContent = disabled ? "Disabled" : "Enabled";
      if (disabled) {
        state.className = "state-disabled";
        tr.className = "disabled";
      }
      const created = document.createElement("td");
      created.append(formatTime(t.createTime));
      const expires = document.createElement("td");
      if (t.expireTime) {
        const past = new Date(t.expireTime).getTime() <= now;
        if (past) {
          expires.className = "expired";
          expires.append("Expired ");
        }
        expires.append(formatTime(t.expireTime));
      } else {
        expires.textContent = "Never";
      }
      tr.append(name, role, state, created, expires, conditionsCell(t, now));
      if (withLastUse) {
        const last = document.createElement("td");
        if (t.lastUseTime) last.append(formatTime(t.lastUseTime));
        else last.textContent = "Never";
        // The last client addresses the gateways saw it used from, the
        // latest first.
        const from = Array.isArray(t.lastAddresses)
          ? t.lastAddresses.map((a) => a && a.address).filter((a) => typeof a === "string")
          : [];
        if (from.length) last.append(document.createElement("br"), `From ${from.join(", ")}`);
        tr.append(last);
      }
      if (withAccess) tr.append(accessCell(t));
      const actions = document.createElement("td");
      actions.className = "row-actions";
      actions.append(
        actionButton("Conditions", id, () => openEdit(t)),
        actionButton("Regenerate", id, () => confirmRegenerate(id)),
        disabled
          ? actionButton("Enable", id, () => confirmEnable(id))
          : actionButton("Disable", id, () => confirmDisable(id)),
        actionButton("Revoke", id, () => confirmRevoke(id)),
      );
      tr.append(actions);
      return tr;
    });
    $("tokens-body").replaceChildren(...rows);
    show($("tokens-table"), rows.length > 0);
    show($("tokens-empty"), rows.length === 0);
  }

  const ROLES = ["viewer", "editor", "owner"];

  /**
   * What a token's requests did in the window, and the narrowest role that
   * would have admitted them when it is narrower than the token's own: a
   * suggestion (least privilege from evidence), never an action.
   */
  function accessCell(t) {
    const cell = document.createElement("td");
    cell.className = "access";
    const a = t.access;
    if (!a || !Array.isArray(a.kinds) || a.kinds.length === 0) {
      cell.textContent = "No evidence";
      cell.title = "No request admitted in the window (or only through filters that do not report access)";
      return cell;
    }
    const kinds = a.kinds.map(String).join(", ");
    if (a.complete === false) {
      // Some uses came through filters that do not say what they did.
      cell.append(`Used: ${kinds}, and more unreported`);
      cell.title = "Some uses in the window came through filters that do not report access: no role is suggested";
      return cell;
    }
    cell.append(a.kinds.length === 1 ? `Used only: ${kinds}` : `Used: ${kinds}`);
    const narrowest = ROLES.indexOf(a.narrowestRole);
    if (narrowest >= 0 && narrowest < ROLES.indexOf(String(t.role))) {
      const hint = document.createElement("span");
      hint.className = "suggestion";
      hint.textContent = `${a.narrowestRole} would do`;
      hint.title = `Every request this token made in the last ${a.days} days a ${a.narrowestRole} token could have made`;
      cell.append(document.createElement("br"), hint);
    }
    return cell;
  }

  function actionButton(label, id, onClick) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    b.setAttribute("aria-label", `${label} ${id}`);
    b.dataset.token = id;
    b.className = label === "Revoke" ? "danger-outline" : "";
    b.addEventListener("click", onClick);
    return b;
  }

  /** On a 401: forget the namespace's token and go back to sign-in. */
  function handleUnauthorized(err, ns) {
    if (err.status !== 401) return false;
    sessions.delete(ns);
    for (const d of document.querySelectorAll("dialog[open]")) d.close();
    current = sessions.size ? [...sessions.keys()].sort()[0] : null;
    showSignIn(describe(err, "list", ns), ns);
    return true;
  }

  function clearMessages() {
    setText("tokens-status", "");
    setText("tokens-error", "");
  }

  async function switchTo(ns) {
    current = ns;
    clearMessages();
    showTokens();
    $("tokens-body").replaceChildren();
    await refresh();
  }

  // ---------------------------------------------------------------------
  // Sign in, switch, sign out

  async function signIn(event) {
    event.preventDefault();
    const form = $("signin-form");
    const nsInput = $("signin-ns");
    const tokenInput = $("signin-token");
    const ns = nsInput.value.trim();
    const token = tokenInput.value.trim();
    fieldError("signin-ns", "");
    fieldError("signin-token", "");
    setText("signin-error", "");
    let bad = null;
    if (!ns) {
      fieldError("signin-ns", "Enter the namespace.");
      bad = bad || nsInput;
    } else if (!DNS_LABEL.test(ns)) {
      fieldError(
        "signin-ns",
        `“${ns}” is not a namespace name. A namespace uses 1 to 63 lower-case letters (a-z), digits and hyphens, starting and ending with a letter or digit.`,
      );
      bad = bad || nsInput;
    }
    if (!token) {
      fieldError("signin-token", "Enter the owner token.");
      bad = bad || tokenInput;
    } else if (!B64TOKEN.test(token)) {
      // Never echo a token: it is a secret.
      fieldError(
        "signin-token",
        "This is not a token: a token is one word of letters, digits and the characters - . _ ~ + /, such as apt_…",
      );
      bad = bad || tokenInput;
    }
    if (bad) {
      bad.focus();
      return;
    }
    busy(form, true);
    let data;
    try {
      data = await call(ns, token, "GET", "");
    } catch (err) {
      busy(form, false);
      if (err.status === 401) {
        tokenInput.value = "";
        fieldError("signin-token", describe(err, "sign-in", ns));
        tokenInput.focus();
      } else {
        setText("signin-error", describe(err, "sign-in", ns));
        (err.status === 403 ? nsInput : form.querySelector("button[type=submit]")).focus();
      }
      return;
    }
    busy(form, false);
    sessions.set(ns, token);
    tokenInput.value = "";
    nsInput.value = "";
    current = ns;
    clearMessages();
    showTokens();
    renderTable(Array.isArray(data && data.apiTokens) ? data.apiTokens : []);
    setText("tokens-status", `Signed in to namespace “${ns}”.`);
    $("tokens-title").focus();
    await refreshActivity(ns);
  }

  function signOut() {
    const ns = current;
    sessions.delete(ns);
    if (sessions.size) {
      switchTo([...sessions.keys()].sort()[0]).then(() =>
        setText("tokens-status", `Signed out of namespace “${ns}”.`),
      );
      $("tokens-title").focus();
    } else {
      current = null;
      showSignIn(`Signed out of namespace “${ns}”.`, "");
    }
  }

  // ---------------------------------------------------------------------
  // Create

  function updateFullName() {
    const id = $("create-name").value.trim();
    setText("create-full-name", `namespaces/${current}/apitokens/${id || "…"}`);
  }

  function openCreate() {
    const form = $("create-form");
    form.reset();
    for (const f of CREATE_FIELDS) fieldError(f, "");
    setText("create-error", "");
    setText("create-ns", current);
    updateFullName();
    busy(form, false);
    $("create-dialog").showModal();
    $("create-name").focus();
  }

  async function create(event) {
    event.preventDefault();
    const ns = current;
    const form = $("create-form");
    const id = $("create-name").value.trim();
    const role = $("create-role").value;
    const expiryInput = $("create-expiry");
    for (const f of CREATE_FIELDS) fieldError(f, "");
    setText("create-error", "");
    if (!id) {
      fieldError("create-name", `Enter a name for the token. ${NAME_RULE}`);
      $("create-name").focus();
      return;
    }
    if (expiryInput.validity.badInput) {
      fieldError("create-expiry", "Enter a complete date, or leave the field empty for a token that does not expire.");
      expiryInput.focus();
      return;
    }
    const conditions = readConditions("create");
    if (!conditions) return;
    const body = { name: `namespaces/${ns}/apitokens/${id}`, role };
    if (expiryInput.value) body.expireTime = `${expiryInput.value}T00:00:00Z`;
    // Only the conditions given (null is "none" as well, but a create's
    // body stays VVP's model plus what is set).
    for (const [k, v] of Object.entries(conditions)) if (v !== null) body[k] = v;
    busy(form, true);
    let data;
    try {
      data = await call(ns, sessions.get(ns), "POST", "", body);
    } catch (err) {
      busy(form, false);
      if (handleUnauthorized(err, ns)) return;
      showCreateError(err, ns, id);
      return;
    }
    busy(form, false);
    $("create-dialog").close();
    showSecret("Token created", data && data.apiToken, $("create-open"));
    await refresh();
    setText("tokens-status", `Token “${id}” was created.`);
  }

  // The create form's fields, cleared together.
  const CREATE_FIELDS = ["create-name", "create-role", "create-expiry", "create-not-before", "create-allow",
    "create-except", "create-rate", "create-burst"];

  // ---------------------------------------------------------------------
  // Conditions: the create form's fieldset, and its copy in the edit
  // dialog (ids `create-…` there, `edit-…` here).

  /** The conditions in the fieldset of `p` (`create`, `edit`), each field
   *  a value or null (none), or null after showing what is wrong. */
  function readConditions(p) {
    const notBefore = $(`${p}-not-before`);
    if (notBefore.validity.badInput) {
      fieldError(notBefore.id, "Enter a complete date, or leave the field empty for a token valid at once.");
      notBefore.focus();
      return null;
    }
    const rate = $(`${p}-rate`);
    const burst = $(`${p}-burst`);
    for (const [input, what] of [[rate, "a number of requests"], [burst, "a burst"]]) {
      if (input.validity.badInput || (input.value && !/^[1-9][0-9]*$/.test(input.value))) {
        fieldError(input.id, `Enter ${what} as a whole number from 1, or leave the field empty.`);
        input.focus();
        return null;
      }
    }
    if (burst.value && !rate.value) {
      fieldError(rate.id, "Enter the number of requests the burst goes with, or leave the burst empty.");
      rate.focus();
      return null;
    }
    const allow = ranges($(`${p}-allow`).value);
    const except = ranges($(`${p}-except`).value);
    sentLines = { allow: allow.lines, except: except.lines };
    const out = { notBeforeTime: null, clientAddresses: null, rateLimit: null };
    if (notBefore.value) out.notBeforeTime = `${notBefore.value}T00:00:00Z`;
    if (allow.values.length || except.values.length) {
      out.clientAddresses = {};
      if (allow.values.length) out.clientAddresses.allow = allow.values;
      if (except.values.length) out.clientAddresses.except = except.values;
    }
    if (rate.value) {
      out.rateLimit = { requests: Number(rate.value), per: $(`${p}-rate-per`).value };
      if (burst.value) out.rateLimit.burst = Number(burst.value);
    }
    return out;
  }

  /** The fieldset of `p` filled with token `t`'s conditions. */
  function fillConditions(p, t) {
    $(`${p}-not-before`).value = typeof t.notBeforeTime === "string" ? t.notBeforeTime.slice(0, 10) : "";
    const a = t.clientAddresses || {};
    $(`${p}-allow`).value = Array.isArray(a.allow) ? a.allow.join("\n") : "";
    $(`${p}-except`).value = Array.isArray(a.except) ? a.except.join("\n") : "";
    const l = t.rateLimit;
    $(`${p}-rate`).value = l && Number.isInteger(l.requests) ? String(l.requests) : "";
    $(`${p}-rate-per`).value = l && l.per === "second" ? "second" : "minute";
    // A burst of a period's worth is the default: left empty, so that a
    // changed rate takes its own.
    $(`${p}-burst`).value = l && Number.isInteger(l.burst) && l.burst !== l.requests ? String(l.burst) : "";
  }

  /** What the edit dialog changes of token `t`'s conditions: only the
   *  conditions whose fields differ from what it showed (an untouched
   *  date stays the token's exact time, another owner's change of a
   *  condition not touched here stays). */
  function changedConditions(t, conditions) {
    const patch = {};
    const shownDate = typeof t.notBeforeTime === "string" ? t.notBeforeTime.slice(0, 10) : "";
    if ($("edit-not-before").value !== shownDate) patch.notBeforeTime = conditions.notBeforeTime;
    const same = (a, b) => JSON.stringify(a || null) === JSON.stringify(b || null);
    const addresses = (a) => (a ? { allow: a.allow || undefined, except: a.except || undefined } : null);
    if (!same(addresses(conditions.clientAddresses), addresses(t.clientAddresses))) {
      patch.clientAddresses = conditions.clientAddresses;
    }
    const rate = (l) => (l ? { requests: l.requests, per: l.per, burst: l.burst || l.requests } : null);
    if (!same(rate(conditions.rateLimit), rate(t.rateLimit))) patch.rateLimit = conditions.rateLimit;
    return patch;
  }

  /** Shows an API error about a condition next to its box in the fieldset
   *  of `p`; false if it is about something else. */
  function showConditionsError(p, err) {
    const field = err.status === 400 ? err.field : null;
    if (field === "notBeforeTime") {
      fieldError(
        `${p}-not-before`,
        /before the token's expiry/.test(err.detail)
          ? "The token must become valid before it expires: choose an earlier date, or a later expiry."
          : "This is not a valid date: choose a date, or leave the field empty.",
      );
      $(`${p}-not-before`).focus();
    } else if (field && /^rateLimit/.test(field)) {
      const box = field === "rateLimit.burst" ? `${p}-burst` : `${p}-rate`;
      const problem = err.detail.startsWith(`${field}: `) ? err.detail.slice(field.length + 2) : err.detail;
      const what = field === "rateLimit.burst" ? "The burst" : "The rate";
      fieldError(box, `${what} ${problem || "is not valid"}.`);
      $(box).focus();
    } else if (field && /^clientAddresses\.(allow|except)/.test(field)) {
      // `clientAddresses.allow[2]`: the third line of that box.
      const [, list, index] = /^clientAddresses\.(allow|except)(?:\[(\d+)\])?/.exec(field);
      const box = `${p}-${list}`;
      const line = index === undefined ? undefined : sentLines[list][Number(index)];
      const where = line === undefined ? "This list" : `Line ${line}`;
      // The API says "field: problem"; the box is the field.
      const problem = err.detail.startsWith(`${field}: `) ? err.detail.slice(field.length + 2) : err.detail;
      fieldError(box, `${where}: ${problem || "not a valid address range"}.`);
      $(box).focus();
    } else {
      return false;
    }
    return true;
  }

  // The edit dialog's fields, cleared together.
  const EDIT_FIELDS = ["edit-not-before", "edit-allow", "edit-except", "edit-rate", "edit-burst"];

  /** The token the edit dialog edits, as the list showed it. */
  let editing = null;

  function openEdit(t) {
    editing = t;
    for (const f of EDIT_FIELDS) fieldError(f, "");
    setText("edit-error", "");
    setText("edit-token", shortId(t.name));
    fillConditions("edit", t);
    busy($("edit-form"), false);
    $("edit-dialog").showModal();
    $("edit-not-before").focus();
  }

  async function saveEdit(event) {
    event.preventDefault();
    const ns = current;
    const t = editing;
    const id = shortId(t.name);
    const form = $("edit-form");
    for (const f of EDIT_FIELDS) fieldError(f, "");
    setText("edit-error", "");
    const conditions = readConditions("edit");
    if (!conditions) return;
    busy(form, true);
    try {
      await call(ns, sessions.get(ns), "PATCH", `/${encodeURIComponent(id)}`, changedConditions(t, conditions));
    } catch (err) {
      busy(form, false);
      if (handleUnauthorized(err, ns)) return;
      if (showConditionsError("edit", err)) return;
      if (err.status === 404 || err.status === 409) {
        // Gone, or changed by someone else: the list is read again, and the
        // dialog closed (opened again, it shows the token as it is now).
        $("edit-dialog").close();
        await refresh();
        setText("tokens-error", describe(err, "update", ns, id));
        $("tokens-title").focus();
        return;
      }
      setText("edit-error", describe(err, "update", ns, id));
      return;
    }
    busy(form, false);
    $("edit-dialog").close();
    await refresh();
    setText("tokens-status", `The conditions of token “${id}” were changed.`);
    focusRowButton("Conditions", id)();
  }

  /** The create form's conditions fieldset, copied into the edit dialog
   *  with its ids (and the labels' and descriptions' references to them)
   *  renamed. */
  function buildEditFieldset() {
    const copy = document.querySelector("#create-form fieldset.conditions").cloneNode(true);
    const rename = (v) => v.replace(/\bcreate-/g, "edit-");
    for (const el of [copy, ...copy.querySelectorAll("*")]) {
      for (const attr of ["id", "for", "aria-describedby"]) {
        if (el.hasAttribute(attr)) el.setAttribute(attr, rename(el.getAttribute(attr)));
      }
    }
    copy.querySelector("legend").textContent = "Conditions";
    $("edit-conditions").replaceWith(copy);
  }

  // One range per line, blank lines dropped; each range's line number
  // (from 1), so that the API's `clientAddresses.allow[2]` names its line.
  function ranges(text) {
    const lines = text.split("\n").map((l, i) => [l.trim(), i + 1]).filter(([l]) => l.length > 0);
    return { values: lines.map(([l]) => l), lines: lines.map(([, n]) => n) };
  }

  // The lines of the last create's boxes, by box.
  let sentLines = { allow: [], except: [] };

  // A token's conditions in a few words: from when, how much, from where.
  function conditionsCell(t, now) {
    const cell = document.createElement("td");
    const parts = [];
    if (t.notBeforeTime) {
      const pending = new Date(t.notBeforeTime).getTime() > now;
      const from = document.createElement("span");
      from.append(pending ? "Not before " : "Valid since ", formatTime(t.notBeforeTime));
      if (pending) from.className = "pending";
      parts.push(from);
    }
    const limit = t.rateLimit;
    if (limit && Number.isInteger(limit.requests) && (limit.per === "second" || limit.per === "minute")) {
      const burst = Number.isInteger(limit.burst) && limit.burst !== limit.requests ? `, ${limit.burst} at once` : "";
      parts.push(`At most ${limit.requests} a ${limit.per}${burst}`);
    }
    const addresses = t.clientAddresses;
    if (addresses && Array.isArray(addresses.allow) && addresses.allow.length) {
      parts.push(`Only from ${addresses.allow.map(String).join(", ")}`);
    }
    if (addresses && Array.isArray(addresses.except) && addresses.except.length) {
      parts.push(`Not from ${addresses.except.map(String).join(", ")}`);
    }
    if (!parts.length) {
      cell.textContent = "None";
      return cell;
    }
    parts.forEach((p, i) => {
      if (i > 0) cell.append(document.createElement("br"));
      cell.append(p);
    });
    return cell;
  }

  function showCreateError(err, ns, id) {
    const field = err.status === 409 ? "name" : err.status === 400 ? err.field : null;
    if (showConditionsError("create", err)) {
      // (Shown next to its box.)
    } else if (field === "name") {
      const message =
        err.status === 409 ? describe(err, "create", ns, id) : `“${id}” is not a valid token name. ${NAME_RULE}`;
      fieldError("create-name", message);
      $("create-name").focus();
    } else if (field === "role") {
      fieldError("create-role", "Choose one of the roles: viewer, editor or owner.");
      $("create-role").focus();
    } else if (field === "expireTime") {
      fieldError(
        "create-expiry",
        /future/.test(err.detail)
          ? "The expiry date must be in the future: choose a later date, or leave the field empty."
          : "This is not a valid expiry date: choose a date, or leave the field empty.",
      );
      $("create-expiry").focus();
    } else {
      setText("create-error", describe(err, "create", ns, id));
    }
  }

  // ---------------------------------------------------------------------
  // The one-time secret

  let focusAfterSecret = null;

  function showSecret(title, token, returnFocus) {
    setText("secret-title", title);
    setText("secret-name", token ? String(token.name) : "");
    setText("secret-role", token ? String(token.role) : "");
    setText("secret-copy-status", "");
    $("secret-value").value = token && typeof token.secret === "string" ? token.secret : "";
    focusAfterSecret = returnFocus;
    $("secret-dialog").showModal();
  }

  async function copySecret() {
    const input = $("secret-value");
    try {
      await navigator.clipboard.writeText(input.value);
      setText("secret-copy-status", "Copied to the clipboard.");
      return;
    } catch {
      // No clipboard API (an insecure origin) or no permission: select the text.
    }
    input.focus();
    input.select();
    let copied = false;
    try {
      copied = document.execCommand("copy");
    } catch {
      copied = false;
    }
    setText(
      "secret-copy-status",
      copied
        ? "Copied to the clipboard."
        : "The browser did not allow copying. The secret is selected: press Ctrl+C (⌘C on a Mac) to copy it.",
    );
  }

  function forgetSecret() {
    $("secret-value").value = "";
    setText("secret-copy-status", "");
  }

  function closeSecret() {
    forgetSecret();
    $("secret-dialog").close();
  }

  function secretClosed() {
    // A late close event (queued behind input) must not wipe a secret shown
    // since: only a dialog that is still closed is cleaned up.
    if ($("secret-dialog").open) return;
    // Gone from the page once the dialog is closed, however it was closed.
    forgetSecret();
    setText("secret-name", "");
    const target = focusAfterSecret;
    focusAfterSecret = null;
    if (typeof target === "function") target();
    else if (target && target.isConnected) target.focus();
  }

  // ---------------------------------------------------------------------
  // Regenerate and revoke, after confirmation

  function confirm(title, text, okLabel, action, danger = true) {
    setText("confirm-title", title);
    setText("confirm-text", text);
    setText("confirm-ok", okLabel);
    // Red for what takes access away; an enable gives it back.
    $("confirm-ok").className = danger ? "danger" : "primary";
    $("confirm-ok").disabled = false;
    pending = action;
    $("confirm-dialog").showModal();
    $("confirm-cancel").focus();
  }

  function confirmRegenerate(id) {
    confirm(
      `Regenerate ${id}?`,
      `Token “${id}” gets a new secret, shown once. Its current secret stops working at once: every client still using it is refused until it is given the new secret.`,
      "Regenerate",
      () => regenerate(id),
    );
  }

  function confirmDisable(id) {
    confirm(
      `Disable ${id}?`,
      `Token “${id}” stops working at once: every client using it is refused until it is enabled again. Nothing else changes: it keeps its secret, role and expiry.`,
      "Disable",
      () => setState(id, "disable"),
    );
  }

  function confirmEnable(id) {
    confirm(
      `Enable ${id}?`,
      `Token “${id}” works again at once, with the secret it had: every client that still has it is let in again.`,
      "Enable",
      () => setState(id, "enable"),
      false,
    );
  }

  function confirmRevoke(id) {
    confirm(
      `Revoke ${id}?`,
      `Token “${id}” stops working at once and is deleted. This cannot be undone.`,
      "Revoke",
      () => revoke(id),
    );
  }

  async function confirmed() {
    const action = pending;
    pending = null;
    if (!action) return;
    $("confirm-ok").disabled = true;
    await action();
  }

  function focusRowButton(label, id) {
    return () => {
      const b = [...document.querySelectorAll("#tokens-body button")].find(
        (x) => x.getAttribute("aria-label") === `${label} ${id}`,
      );
      (b || $("tokens-title")).focus();
    };
  }

  /** A confirmed row action: the API call, then the confirmation closed.
   *  Resolves to { data } on success, null once a failure has been shown. */
  async function rowAction(id, what, method, path, body) {
    const ns = current;
    clearMessages();
    let data;
    try {
      data = await call(ns, sessions.get(ns), method, path, body);
    } catch (err) {
      $("confirm-dialog").close();
      if (!handleUnauthorized(err, ns)) await actionFailed(err, what, ns, id);
      return null;
    }
    $("confirm-dialog").close();
    return { data };
  }

  async function regenerate(id) {
    const done = await rowAction(id, "regenerate", "POST", `/${encodeURIComponent(id)}:regenerate`, {});
    if (!done) return;
    showSecret(`New secret for ${id}`, done.data && done.data.apiToken, focusRowButton("Regenerate", id));
    refresh();
  }

  /** Disable or enable, then the row's other button (Enable after a
   *  disable, Disable after an enable) has the focus. */
  async function setState(id, action) {
    if (!(await rowAction(id, action, "POST", `/${encodeURIComponent(id)}:${action}`, {}))) return;
    await refresh();
    setText(
      "tokens-status",
      action === "disable"
        ? `Token “${id}” was disabled: its secret is refused until it is enabled again.`
        : `Token “${id}” was enabled: its secret works again.`,
    );
    focusRowButton(action === "disable" ? "Enable" : "Disable", id)();
  }

  async function revoke(id) {
    if (!(await rowAction(id, "revoke", "DELETE", `/${encodeURIComponent(id)}`))) return;
    await refresh();
    setText("tokens-status", `Token “${id}” was revoked: its secret no longer works.`);
    $("tokens-title").focus();
  }

  async function actionFailed(err, what, ns, id) {
    const message = describe(err, what, ns, id);
    if (err.status === 404) await refresh();
    setText("tokens-error", message);
    $("tokens-title").focus();
  }

  // ---------------------------------------------------------------------
  // Wiring

  function start() {
    $("signin-form").addEventListener("submit", signIn);
    $("signin-cancel").addEventListener("click", () => switchTo(current).then(() => $("tokens-title").focus()));
    $("ns-select").addEventListener("change", (e) => switchTo(e.target.value));
    $("ns-add").addEventListener("click", () => showSignIn("", ""));
    $("ns-sign-out").addEventListener("click", signOut);
    $("create-open").addEventListener("click", openCreate);
    $("create-form").addEventListener("submit", create);
    $("create-cancel").addEventListener("click", () => $("create-dialog").close());
    $("create-name").addEventListener("input", updateFullName);
    buildEditFieldset();
    $("edit-form").addEventListener("submit", saveEdit);
    $("edit-cancel").addEventListener("click", () => $("edit-dialog").close());
    $("secret-copy").addEventListener("click", copySecret);
    $("secret-done").addEventListener("click", closeSecret);
    $("secret-dialog").addEventListener("cancel", forgetSecret);
    $("secret-dialog").addEventListener("close", secretClosed);
    $("confirm-cancel").addEventListener("click", () => $("confirm-dialog").close());
    $("confirm-ok").addEventListener("click", confirmed);
    $("confirm-dialog").addEventListener("close", () => {
      // The close event is queued, and the browser runs input first: a quick
      // Escape, Enter can reopen the dialog before this runs. Forget the
      // action only if the dialog is still closed, not the new one's.
      if (!$("confirm-dialog").open) pending = null;
    });
    showSignIn("", "");
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
