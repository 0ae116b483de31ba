// What the pages that sign in the browser (/ops, /audit) share; the server inlines it into
// each (issuer/app.py), so a page stays one document that loads nothing. Every call is
// signed with WebCrypto (API.md "Authentication") by a key whose secret stays in this
// tab's sessionStorage and is only ever the HMAC key: it is never sent.
"use strict";
const issuerConsole = (() => {
  const enc = new TextEncoder();
  let session = null;                // {id, hmac: CryptoKey}
  let clockOffset = 0;               // server time minus browser time, seconds

  // ------------------------------------------------------------ the key
  async function signIn(store, id, secret) {
    const hmac = await crypto.subtle.importKey(
      "raw", enc.encode(secret), { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
    session = { id, hmac };
    sessionStorage.setItem(store, JSON.stringify({ id, secret }));
  }

  function signOut(store) {
    session = null;
    sessionStorage.removeItem(store);
  }

  function savedKey(store) {
    try {
      const saved = JSON.parse(sessionStorage.getItem(store) || "null");
      return saved && saved.id && saved.secret ? saved : null;
    } catch (_) {
      return null;
    }
  }

  const canSign = () => !!(window.crypto && crypto.subtle);
  const NO_SECURE_CONTEXT = "此页面需要安全上下文 (https 或 127.0.0.1) 才能签名 " +
    "this page needs a secure context (https or localhost) to sign requests";

  // ------------------------------------------------------------ the sign-in form
  // Built here for every signed page, into its empty <section id="login">, naming the role
  // its key needs; the secret leaves the field as soon as the form is sent.
  const byId = (id) => document.getElementById(id);

  function loginForm(role, login) {
    const form = h("form", { id: "login-form", autocomplete: "off" },
      h("label", { for: "key-id" }, "密钥 ID · API key id"),
      h("input", { id: "key-id", name: "key-id", required: true, spellcheck: "false",
                   autocapitalize: "off" }),
      h("label", { for: "key-secret" }, "密钥 · secret"),
      h("input", { id: "key-secret", name: "key-secret", type: "password", required: true,
                   spellcheck: "false", autocomplete: "off" }),
      h("div", { class: "actions" },
        h("button", { type: "submit", id: "login-submit", class: "primary", disabled: !canSign() },
          "登录 log in")),
      h("p", { class: "note muted" },
        `需要角色为 ${role} 的密钥。密钥只保存在本浏览器会话中，用于签名，从不发送。 Needs a key with role `,
        h("code", null, role),
        "; the secret stays in this browser session and only signs requests, it is never sent."));
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const id = byId("key-id").value.trim();
      const secret = byId("key-secret").value;
      byId("key-secret").value = "";
      if (id && secret) login(id, secret);
    });
    const section = byId("login");
    section.setAttribute("aria-labelledby", "login-title");
    section.replaceChildren(
      h("h2", { id: "login-title" }, "登录 Log in"),
      h("div", { id: "login-error", class: "banner error hidden", role: "alert" }),
      form);
  }

  // The form shown with `message` ("" for none), the secret field emptied.
  function showLoginForm(message) {
    byId("login").classList.remove("hidden");
    const error = byId("login-error");
    error.textContent = message || "";
    error.classList.toggle("hidden", !message);
    byId("key-secret").value = "";
    byId(message ? "key-secret" : "key-id").focus();
  }

  function hideLoginForm() {
    byId("login").classList.add("hidden");
    byId("login-error").classList.add("hidden");
  }

  // A page's start: its form (for a key of `role`), its log-out button (#logout), then
  // `login` with the key given (or saved in `store`), or the form; the form with the reason
  // where nothing can be signed.
  function startSignIn(role, store, login, showLogin, given = null) {
    loginForm(role, login);
    byId("logout").addEventListener("click", () => showLogin(""));
    if (!canSign()) {
      showLogin(NO_SECURE_CONTEXT);
      return;
    }
    const saved = given || savedKey(store);
    if (saved) login(saved.id, saved.secret); else showLogin("");
  }

  // ------------------------------------------------------------ signing and calls
  const hex = (buf) => Array.from(new Uint8Array(buf), (b) => b.toString(16).padStart(2, "0")).join("");

  function nonce() {
    const bytes = crypto.getRandomValues(new Uint8Array(18));
    return btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  async function signedHeaders(method, pathQs, body) {
    const ts = String(Math.floor(Date.now() / 1000 + clockOffset));
    const n = nonce();
    const bodyHash = hex(await crypto.subtle.digest("SHA-256", body));
    const message = [method.toUpperCase(), pathQs, ts, n, bodyHash].join("\n");
    const sig = hex(await crypto.subtle.sign("HMAC", session.hmac, enc.encode(message)));
    return { "X-Api-Key": session.id, "X-Timestamp": ts, "X-Nonce": n, "X-Signature": sig };
  }

  class CallError extends Error {
    constructor(status, code, message) { super(message); this.status = status; this.code = code; }
  }

  // A signed call: the decoded JSON answer (or, with {blob: true}, the body as a Blob);
  // CallError with the contract's code otherwise.
  async function call(method, pathQs, payload, { blob = false, timeoutMs = 5000 } = {}, retried = false) {
    const body = payload === undefined ? new Uint8Array(0) : enc.encode(JSON.stringify(payload));
    const headers = await signedHeaders(method, pathQs, body);
    if (payload !== undefined) headers["Content-Type"] = "application/json";
    const ctl = new AbortController();
    const abort = setTimeout(() => ctl.abort(), timeoutMs);
    let resp, answer;
    try {
      resp = await fetch(pathQs, { method, headers, body: payload === undefined ? undefined : body,
                                   cache: "no-store", credentials: "omit", signal: ctl.signal });
      answer = resp.ok && blob ? await resp.blob() : await resp.text();
    } catch (err) {
      throw new CallError(0, "NETWORK", err.name === "AbortError"
        ? `请求超时 request timed out after ${timeoutMs / 1000} s` : `网络错误 network error: ${err.message}`);
    } finally {
      clearTimeout(abort);
    }
    if (resp.ok && blob) return answer;
    let data = null;
    try { data = answer ? JSON.parse(answer) : null; } catch (_) { data = null; }
    if (resp.ok) return data;
    const error = (data && data.error) || {};
    // the browser clock may be off by more than the 300 s window: retry once on server time
    const served = Date.parse(resp.headers.get("Date") || "");
    if (resp.status === 401 && !retried && /Timestamp/.test(error.message || "") && !isNaN(served)) {
      clockOffset = (served - Date.now()) / 1000;
      return call(method, pathQs, payload, { blob, timeoutMs }, true);
    }
    throw new CallError(resp.status, error.code || `HTTP_${resp.status}`,
                        error.message || `HTTP ${resp.status}`);
  }

  // ------------------------------------------------------------ formatting
  const group = (digits) => digits.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  function cny(fen) {
    const n = Math.round(Number(fen) || 0);
    const abs = Math.abs(n);
    return `${n < 0 ? "-" : ""}¥${group(String(Math.floor(abs / 100)))}.${String(abs % 100).padStart(2, "0")}`;
  }
  const count = (n) => group(String(Math.round(Number(n) || 0)));
  const pct = (ratio) => `${(Math.max(0, Math.min(1, ratio)) * 100).toFixed(2)}%`;
  function stamp(iso) {
    const d = new Date(iso);
    if (isNaN(d)) return String(iso);
    const p = (x) => String(x).padStart(2, "0");
    return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
  }

  // ------------------------------------------------------------ DOM
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v; else el.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  return { signIn, signOut, startSignIn, showLoginForm, hideLoginForm, CallError, call, cny, count,
           pct, stamp, h };
})();
