// infinichat web page: sessions, streaming chat with role-play actions, settings, a token-probability
// debug view and the live cache map. Plain ES modules, no build step, no network beyond this server.
import { api, ApiError, authHeaders, onAuthNeeded, stream } from "./api.js";
import { renderCacheMap } from "./cachemap.js";
import { attachTip, h, hideTip } from "./tooltip.js";

const $ = (id) => document.getElementById(id);
const GEN_PARAMS = { top_logprobs: 5 };
const PLACEHOLDER = matchMedia("(max-width: 600px)").matches ? "Message…"
  : "Message…  (Enter sends · Shift+Enter new line · Ctrl+Enter retries)";
const INT_FIELDS = new Set([
  "top_k", "seed", "max_tokens", "budget", "n_sink", "narrations_kept", "dry_allowed_length", "dry_penalty_last_n",
  "lore_ttl", "suggest_max_tokens", "narrate_max_tokens",
]);
const FLOAT_FIELDS = new Set([
  "temperature", "top_p", "min_p", "repetition_penalty", "dry_multiplier", "dry_base", "xtc_probability",
  "xtc_threshold",
]);
const LIST_FIELDS = new Set(["dry_sequence_breakers"]); // shown and entered as JSON lists of strings

const state = {
  info: null,
  sessions: [],
  cur: null,       // the current session's history
  kv: null,        // its last cache map
  live: null,      // the generation in progress: {mode, kind, turn, text, toks, el, userText}
  ctrl: null,      // AbortController of the running stream
  tokens: new Map(), // "uid:alt" -> {text, toks}: per-token data of replies (streamed here, or stored: /tokens)
  avatars: {},     // "char" / "user" -> object URL of the current session's avatar images
  debug: localStorage.getItem("infinichat.debug") === "1",
  zoom: localStorage.getItem("infinichat.zoom") === "1", // cache map scaled to the used tokens
};
window.__infinichat = state; // handy for debugging in the console

// ------------------------------------------------------------------ small helpers
let finished = 0; // actions completed (generations, edits, loads): body[data-done], for tests and automation
function markDone() { document.body.dataset.done = String(++finished); }
function setStatus(text, kind = "") {
  const s = $("status");
  s.textContent = text;
  s.className = `status ${kind}`;
}
function showError(e) {
  console.error(e);
  setStatus(e instanceof ApiError || e instanceof Error ? e.message : String(e), "error");
}
const sid = () => state.cur && state.cur.id;
const enc = encodeURIComponent;
const path = (suffix = "") => `/api/sessions/${enc(sid())}${suffix}`;
const prob = (lp) => (lp === null || lp === undefined ? null : Math.exp(lp));
const pct = (p) => (p >= 0.995 ? "100%" : p < 0.001 ? "<0.1%" : `${(100 * p).toFixed(p < 0.1 ? 1 : 0)}%`);
const visible = (t) => (t === "" ? "∅" : t.replace(/ /g, "␣").replace(/\n/g, "↵").replace(/\t/g, "⇥"));
function probColor(p, alpha) {
  const hue = Math.round(120 * Math.pow(p, 0.6)); // red (unlikely) -> amber -> green (likely)
  return `hsla(${hue}, 75%, 50%, ${alpha})`;
}

// ------------------------------------------------------------------ API key
let keyAsked = null; // one prompt, however many requests got a 401 meanwhile
onAuthNeeded((why) => keyAsked || (keyAsked = new Promise((resolve) => {
  const dlg = $("dlg-key");
  $("key-input").value = "";
  $("key-msg").textContent = why === "wrong"
    ? "Wrong key: the server refused it. Enter the API key again."
    : "This server needs an API key.";
  $("key-msg").classList.toggle("error", why === "wrong");
  dlg.onclose = () => { keyAsked = null; resolve($("key-input").value.trim() || null); };
  dlg.showModal();
})));

// ------------------------------------------------------------------ sessions
async function loadSessions() {
  const { sessions } = await api("GET", "/api/sessions");
  state.sessions = sessions.sort((a, b) => (b.updated || 0) - (a.updated || 0));
  renderSessionList();
}

function ago(t) {
  const d = Math.max(0, Date.now() / 1000 - t);
  if (d < 45) return "just now";
  if (d < 3600) return `${Math.round(d / 60)} min ago`;
  if (d < 86400) return `${Math.round(d / 3600)} h ago`;
  return new Date(t * 1000).toLocaleDateString();
}

function renderSessionList() {
  const ul = $("session-list");
  ul.replaceChildren(...state.sessions.map((s) => {
    const when = s.updated ? ago(s.updated) : null;
    return h("li", { class: s.id === sid() ? "active" : "", "data-id": s.id },
      h("button", { class: "s-open", onclick: () => { openSession(s.id); closeSidebar(); } },
        h("span", { class: "s-name" }, s.name || "New chat"),
        h("span", { class: "s-meta" },
          h("span", { class: s.resident ? "res on" : "res", title: s.resident ? "cache in memory" : "cache on disk" }),
          `${s.messages} msg${s.messages === 1 ? "" : "s"}`, when ? ` · ${when}` : "")),
      h("button", { class: "s-del icon-btn", title: "Delete this chat", "aria-label": "Delete chat",
        onclick: (e) => { e.stopPropagation(); deleteSession(s.id, s.name); } }, "✕"));
  }));
}

async function deleteSession(id, name) {
  if (!confirm(`Delete the chat "${name || "New chat"}"? This cannot be undone.`)) return;
  try {
    await api("DELETE", `/api/sessions/${enc(id)}`);
    if (id === sid()) { state.cur = null; state.kv = null; location.hash = ""; render(); }
    await loadSessions();
  } catch (e) { showError(e); }
}

async function openSession(id) {
  try {
    state.cur = await api("GET", `/api/sessions/${enc(id)}`);
    await loadAvatars();
    if (location.hash !== `#s=${enc(id)}`) history.replaceState(null, "", `#s=${enc(id)}`);
    setStatus("");
    render();
    renderSessionList();
    scrollToEnd(true);
    await refreshKv();
  } catch (e) {
    showError(e);
  } finally {
    markDone();
  }
}

/** The session's avatar images as object URLs (fetched with the API key, which an <img src> cannot send). */
async function loadAvatars() {
  for (const url of Object.values(state.avatars)) URL.revokeObjectURL(url);
  state.avatars = {};
  const cur = state.cur;
  for (const who of ["char", "user"]) {
    if (!cur || !cur.avatars || !cur.avatars[who]) continue;
    try {
      const r = await fetch(`/api/sessions/${enc(cur.id)}/avatar/${who}`, { headers: authHeaders() });
      if (r.ok) state.avatars[who] = URL.createObjectURL(await r.blob());
    } catch (e) { console.warn("avatar", e); }
  }
}

async function refreshKv() {
  if (!sid()) return;
  try {
    state.kv = await api("GET", path("/kv"));
  } catch (e) {
    state.kv = null;
    console.warn("kv map", e);
  }
  drawCacheMap();
}

function drawCacheMap() {
  $("cm-zoom").textContent = state.zoom ? "⤡ whole budget" : "⤢ zoom";
  $("cm-zoom").title = state.zoom ? "Scale the bar to the whole token budget" : "Scale the bar to the tokens in use";
  $("cm-zoom").setAttribute("aria-pressed", state.zoom ? "true" : "false");
  renderCacheMap(state.kv, state.zoom, (turn) => {
    const el = document.querySelector(`.msg[data-turn="${turn}"]`);
    if (el) { el.scrollIntoView({ behavior: "smooth", block: "center" }); el.classList.add("flash"); setTimeout(() => el.classList.remove("flash"), 1200); }
  });
}

// ------------------------------------------------------------------ new session dialog
let cardPayload = null; // {card} or {card_png}

function readFile(file, how) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    if (how === "text") r.readAsText(file); else r.readAsDataURL(file);
  });
}

let lorePayload = null; // a parsed lorebook JSON
let avatarPayload = null; // a data: URL

/** Ask the server what the card (or system prompt) costs and which budget a chat with it gets. */
let inspectSeq = 0;
async function inspectCard() {
  const f = $("new-form");
  const body = cardPayload ? { ...cardPayload } : { system_prompt: f.system_prompt.value.trim() || null };
  const user = f.user_name.value.trim();
  if (user) body.user_name = user;
  const seq = ++inspectSeq;
  const hint = $("budget-hint");
  try {
    const info = await api("POST", "/api/cards/inspect", body);
    if (seq !== inspectSeq) return;
    f.budget.placeholder = `auto: ${info.budget}`;
    f.budget.max = info.max_budget;
    hint.replaceChildren(
      h("b", {}, `${info.system_tokens.toLocaleString("en-US")} tokens`), cardPayload ? " in the card" : " in the system prompt",
      ` · the budget adapts: ${info.budget.toLocaleString("en-US")} (server cap ${info.max_budget.toLocaleString("en-US")})`,
      info.lore_entries ? ` · ${info.lore_entries} lorebook ${info.lore_entries === 1 ? "entry" : "entries"}` : "",
      info.fits ? "" : h("div", { class: "error" }, "Too long for this server: the card must be under half the budget cap."));
    hint.dataset.tokens = String(info.system_tokens);
    const label = $("card-preview").querySelector("img + span");
    if (label && info.name) label.textContent = info.name; // a PNG card: its character's name
  } catch (e) {
    if (seq === inspectSeq) hint.replaceChildren(h("span", { class: "error" }, e.message));
  }
}
let inspectTimer = null;
const inspectSoon = () => { clearTimeout(inspectTimer); inspectTimer = setTimeout(inspectCard, 300); };
$("new-form").system_prompt.addEventListener("input", inspectSoon);
$("new-form").user_name.addEventListener("input", inspectSoon);

$("lore-file").addEventListener("change", async (e) => {
  lorePayload = null;
  const file = e.target.files[0];
  if (!file) return;
  try { lorePayload = JSON.parse(await readFile(file, "text")); } catch (err) {
    $("new-msg").textContent = `That file is not a lorebook (JSON): ${err.message}`;
  }
});
$("avatar-file").addEventListener("change", async (e) => {
  const file = e.target.files[0];
  avatarPayload = file ? await readFile(file, "url") : null;
});

$("card-file").addEventListener("change", async (e) => {
  const file = e.target.files[0];
  const prev = $("card-preview");
  cardPayload = null;
  $("new-msg").textContent = "";
  prev.replaceChildren();
  if (!file) { inspectSoon(); return; }
  try {
    const isPng = file.type === "image/png" || /\.png$/i.test(file.name);
    if (isPng) {
      const url = await readFile(file, "url");
      cardPayload = { card_png: url.slice(url.indexOf(",") + 1) };
      prev.replaceChildren(h("img", { src: url, alt: "" }), h("span", {}, file.name));
    } else {
      const card = JSON.parse(await readFile(file, "text"));
      cardPayload = { card };
      const d = card.data || card;
      prev.replaceChildren(h("div", {}, h("b", {}, d.name || file.name),
        h("div", { class: "muted clamp" }, (d.description || "").slice(0, 240))));
    }
    await inspectCard();
  } catch (err) {
    $("new-msg").textContent = `That file is not a character card: ${err.message}`;
  }
});

function openNewDialog() {
  $("new-form").reset();
  cardPayload = null;
  lorePayload = null;
  avatarPayload = null;
  $("card-preview").replaceChildren();
  $("budget-hint").replaceChildren();
  $("new-msg").textContent = "";
  const last = localStorage.getItem("infinichat.userName");
  if (last) $("new-form").user_name.value = last;
  $("dlg-new").showModal();
  inspectCard();
}

$("btn-create").addEventListener("click", async (e) => {
  e.preventDefault();
  const f = $("new-form");
  const body = {};
  const name = f.name.value.trim();
  const sys = f.system_prompt.value.trim();
  if (name) body.name = name;
  if (cardPayload) Object.assign(body, cardPayload);
  else if (sys) body.system_prompt = sys;
  const settings = {};
  const user = f.user_name.value.trim();
  if (user) { settings.user_name = user; localStorage.setItem("infinichat.userName", user); }
  if (f.budget.value.trim()) {
    const b = Number(f.budget.value);
    if (!Number.isInteger(b)) { $("new-msg").textContent = "The budget must be a whole number of tokens"; return; }
    settings.budget = b;
  }
  if (Object.keys(settings).length) body.settings = settings;
  if (lorePayload) body.lorebook = lorePayload;
  if (avatarPayload) body.user_avatar = avatarPayload;
  try {
    const hist = await api("POST", "/api/sessions", body);
    $("dlg-new").close();
    await loadSessions();
    await openSession(hist.id);
    $("input").focus();
  } catch (err) {
    $("new-msg").textContent = err.message;
  }
});
$("btn-new").addEventListener("click", () => { closeSidebar(); openNewDialog(); });
$("btn-new-empty").addEventListener("click", openNewDialog);

// ------------------------------------------------------------------ rendering the chat
function render() {
  const cur = state.cur;
  $("empty").hidden = !!cur;
  $("composer").hidden = !cur;
  $("session-title").textContent = cur ? cur.name : "";
  if (!cur) {
    if (!$("settings").hidden) fillChatForm();
    $("messages").replaceChildren();
    $("system-box").hidden = true;
    $("cachemap").hidden = true;
    return;
  }
  const sys = cur.system_prompt || "";
  $("system-box").hidden = !sys;
  $("system-text").innerHTML = cur.system_html || ""; // rendered and sanitized on the server (nh3)
  enhanceCode($("system-text"));
  renderMessages();
  fillSettings();
  if (!$("settings").hidden) fillChatForm();
  updateButtons();
}

function whoOf(m) {
  if (m.kind === "user") return (state.cur.settings && state.cur.settings.user_name) || "You";
  if (m.kind === "narration") return "Narrator";
  if (m.kind === "rag") return "Retrieved";
  if (m.kind === "lore") return "World info";
  return state.cur.character || "Assistant";
}

/** The round picture beside a name: the card's image / the user's avatar, else the name's initial. */
function avatarEl(m) {
  const who = m.kind === "user" ? "user" : m.kind === "assistant" ? "char" : null;
  const name = whoOf(m);
  const url = who && state.avatars[who];
  if (url) return h("img", { class: `avatar av-${who}`, src: url, alt: "" });
  return h("span", { class: `avatar initial av-${who || m.kind}`, "aria-hidden": "true" }, (name.trim()[0] || "?").toUpperCase());
}

/** Code blocks of rendered Markdown get a copy button. */
function enhanceCode(root) {
  for (const pre of root.querySelectorAll("pre")) {
    if (pre.querySelector(".copy")) continue;
    const btn = h("button", { class: "copy", type: "button", title: "Copy the code" }, "Copy");
    btn.addEventListener("click", async () => {
      const code = pre.querySelector("code");
      const text = code ? code.textContent : pre.textContent;
      try { await navigator.clipboard.writeText(text); btn.textContent = "Copied"; } catch { btn.textContent = "Copy failed"; }
      setTimeout(() => { btn.textContent = "Copy"; }, 1500);
    });
    pre.append(btn);
  }
}

function tokenEntry(m) {
  const e = state.tokens.get(`${m.uid}:${m.selected}`);
  return e && e.text === m.text ? e : null;
}

/** The stored per-token data of a reply generated before this page was opened (GET .../tokens). */
const tokenLoads = new Set();
async function loadTokens(m, i) {
  const key = `${state.cur.id}:${m.uid}:${m.selected}`;
  if (tokenLoads.has(key)) return;
  tokenLoads.add(key);
  try {
    const t = await api("GET", path(`/messages/${i}/tokens?alt=${m.selected}`));
    const joined = t.tokens.map((x) => x.text).join("");
    if (t.tokens.length && t.text.endsWith(joined)) { // an edited-then-continued reply: its start is plain text
      const head = t.text.slice(0, t.text.length - joined.length);
      state.tokens.set(`${m.uid}:${m.selected}`, { text: t.text, toks: head ? [{ plain: true, text: head }, ...t.tokens] : t.tokens });
      if (!state.live) renderMessages();
    }
  } catch (e) { console.warn("tokens", e); }
}

/** The debug view of a reply: one span per token, coloured by exp(logprob); hover/tap for the top 5. */
function tokenView(toks) {
  const wrap = h("div", { class: "tokens" });
  for (const t of toks) {
    if (t.plain) { wrap.append(h("span", { class: "tok plain" }, t.text)); continue; }
    const p = prob(t.logprob);
    const el = h("span", {
      class: "tok", "data-p": p === null ? "" : p.toFixed(4),
      style: p === null ? "" : `background:${probColor(p, 0.28)};box-shadow:inset 0 -2px 0 ${probColor(p, 0.9)}`,
    }, t.text === "" ? "·" : t.text);
    attachTip(el, () => topView(t));
    wrap.append(el);
  }
  return wrap;
}

function topView(t) {
  const p = prob(t.logprob);
  const top = (t.top || []).slice(0, 5);
  return h("div", { class: "tip-tok" },
    h("div", { class: "tip-title" }, "Sampled ", h("code", {}, visible(t.text)),
      p === null ? "" : h("span", { class: "p" }, pct(p)), t.token !== null && t.token !== undefined ? h("span", { class: "muted" }, ` id ${t.token}`) : ""),
    top.length ? h("table", {}, top.map((a) => {
      const q = Math.exp(a.logprob);
      return h("tr", { class: a.token === t.token ? "chosen" : "" },
        h("td", {}, h("code", {}, visible(a.text))),
        h("td", { class: "bar" }, h("span", { style: `width:${Math.max(2, 100 * q)}%;background:${probColor(q, 0.85)}` })),
        h("td", { class: "num" }, pct(q)));
    })) : h("div", { class: "muted" }, "no alternatives recorded"));
}

/** A message body: the debug token view; the server's sanitized HTML for a finished message; plain text while
 * a reply streams (replaced by the rendered HTML at "done"). */
function bodyFor(text, toks, kind, html) {
  const body = h("div", { class: "msg-body" });
  if (state.debug && toks && kind !== "user") body.append(tokenView(toks));
  else if (typeof html === "string") { body.classList.add("md"); body.innerHTML = html; enhanceCode(body); }
  else { body.classList.add("plain"); body.textContent = text; }
  return body;
}

function cacheBadge(m) {
  if (!m.in_context) return h("span", { class: "badge gone", title: "Left the context on purpose" }, "out of context");
  if (m.tokens_in_cache === undefined || !m.n_tokens) return null;
  if (m.tokens_in_cache === 0) return h("span", { class: "badge gone", title: "Evicted: the model no longer sees this message" }, "forgotten");
  if (m.evicted_tokens) return h("span", { class: "badge part", title: `${m.evicted_tokens} of its tokens were evicted` }, `${m.tokens_in_cache}/${m.n_tokens} remembered`);
  return h("span", { class: "badge", title: "Tokens this message holds in the cache" }, `${m.n_tokens} tok`);
}

function loreEl(m, i) {
  const inCache = m.in_context && m.tokens_in_cache !== 0;
  const el = h("div", { class: `msg k-lore lore-chip${inCache ? "" : " forgotten"}`, "data-turn": i, "data-uid": m.uid },
    h("span", { class: "lore-icon", "aria-hidden": "true" }, "§"),
    h("b", { class: "lore-name" }, (m.meta && m.meta.name) || "World info"),
    h("span", { class: "muted" }, inCache ? ` entered the model's memory · ${m.n_tokens} tok` : " left the model's memory"),
    h("span", { class: "turn" }, `#${i}`));
  attachTip(el, () => h("div", { class: "tip-seg" }, h("div", { class: "tip-title k-lore" }, h("span", { class: "sw" }), "Lorebook entry"),
    h("div", { class: "lore-text" }, m.text.slice(0, 400))));
  return el;
}

function msgEl(m, i, last) {
  if (m.kind === "lore") return loreEl(m, i);
  const n = m.alternatives ? m.alternatives.length : 1;
  const gen = m.kind === "assistant" || m.kind === "narration";
  const entry = tokenEntry(m);
  const el = h("div", {
    class: `msg k-${m.kind}${m.tokens_in_cache === 0 && m.n_tokens ? " forgotten" : ""}${!m.in_context ? " forgotten" : ""}`,
    "data-turn": i, "data-uid": m.uid,
  });
  const alts = gen && (n > 1 || last) ? h("span", { class: "alts" },
    h("button", { class: "alt-prev", title: "Previous alternative", "aria-label": "Previous alternative",
      disabled: m.selected <= 0 || !!state.live, onclick: () => select(i, m.selected - 1) }, "‹"),
    h("span", { class: "alt-pos" }, `${m.selected + 1}/${n}`),
    h("button", { class: "alt-next", title: m.selected + 1 < n ? "Next alternative" : "Generate another alternative",
      "aria-label": "Next alternative", disabled: (m.selected + 1 >= n && !last) || !!state.live,
      onclick: () => (m.selected + 1 < n ? select(i, m.selected + 1) : retry()) }, "›")) : null;
  const alt = m.alternatives && m.alternatives[m.selected];
  const finish = alt && alt.finish_reason;
  if (state.debug && gen && !entry && alt && alt.has_steps && typeof m.uid === "number") loadTokens(m, i);
  el.append(...[
    h("div", { class: "msg-head" },
      avatarEl(m),
      h("span", { class: "who" }, whoOf(m)),
      h("span", { class: "turn" }, `#${i}`),
      cacheBadge(m),
      finish && finish !== "stop" && finish !== "eos" ? h("span", { class: "badge fin", title: "finish reason" }, finish) : null,
      h("span", { class: "spacer" }),
      alts,
      typeof m.uid === "number" ? h("span", { class: "msg-actions" },
        h("button", { class: "act-revert", title: "Revert to here: drop every message after this one", "aria-label": "Revert to here",
          disabled: last || !!state.live, onclick: () => revert(i + 1) }, "⤺", h("span", { class: "lbl" }, " Revert")),
        h("button", { class: "act-edit", title: "Edit this message", "aria-label": "Edit", disabled: !!state.live,
          onclick: () => startEdit(el, m, i) }, "✎", h("span", { class: "lbl" }, " Edit")),
        h("button", { class: "act-delete", title: "Delete this message", "aria-label": "Delete", disabled: !!state.live,
          onclick: () => del(i) }, "✕", h("span", { class: "lbl" }, " Delete"))) : null),
    bodyFor(m.text, entry && entry.toks, m.kind, m.html),
    entry && state.debug ? debugFoot(entry.toks) : null].filter(Boolean));
  return el;
}

function debugFoot(toks) {
  const ps = toks.filter((t) => !t.plain && t.logprob !== null && t.logprob !== undefined).map((t) => Math.exp(t.logprob));
  if (!ps.length) return null;
  const mean = ps.reduce((a, b) => a + b, 0) / ps.length;
  const low = ps.filter((p) => p < 0.2).length;
  return h("div", { class: "debug-foot" }, `${ps.length} tokens · mean p ${pct(mean)} · ${low} below 20%`);
}

function liveEl() {
  const L = state.live;
  const m = { kind: L.kind, uid: "live", in_context: true };
  const el = h("div", { class: `msg k-${L.kind} live`, "data-turn": L.turn ?? "" },
    h("div", { class: "msg-head" },
      avatarEl(m),
      h("span", { class: "who" }, whoOf(m)),
      L.turn !== null && L.turn !== undefined ? h("span", { class: "turn" }, `#${L.turn}`) : null,
      h("span", { class: "badge gen" }, h("span", { class: "pulse" }), L.mode === "continue" ? "continuing" : "generating")));
  const body = h("div", { class: "msg-body" });
  el.append(body);
  L.el = el;
  L.body = body;
  paintLive();
  return el;
}

function paintLive() {
  const L = state.live;
  if (!L || !L.body) return;
  if (L.text) L.paints = (L.paints || 0) + 1;
  const fresh = bodyFor(L.text, L.toks, L.kind);
  const tokens = fresh.querySelector(".tokens") || (fresh.classList.contains("plain") ? fresh : null);
  if (tokens) tokens.append(h("span", { class: "caret" }));
  L.body.replaceWith(fresh);
  L.body = fresh;
  scrollToEnd();
}

function renderMessages() {
  const cur = state.cur;
  const L = state.live;
  const list = [];
  const msgs = cur.messages;
  msgs.forEach((m, i) => {
    const isLast = i === msgs.length - 1;
    if (L && (L.mode === "retry" || L.mode === "continue") && isLast) list.push(liveEl());
    else list.push(msgEl(m, i, isLast && !L));
  });
  if (L && L.mode === "send") {
    list.push(msgEl({ kind: "user", uid: "pending", text: L.userText, in_context: true, alternatives: [{ text: L.userText }], selected: 0 }, msgs.length, false));
    list.push(liveEl());
  }
  if (L && L.mode === "narrate") list.push(liveEl());
  $("messages").replaceChildren(...list);
}

function scrollToEnd(force) {
  const chat = $("chat");
  const near = chat.scrollHeight - chat.scrollTop - chat.clientHeight < 160;
  if (force || near) chat.scrollTop = chat.scrollHeight;
}

function updateButtons() {
  const busy = !!state.live;
  const msgs = state.cur ? state.cur.messages : [];
  const last = msgs[msgs.length - 1];
  const gen = last && (last.kind === "assistant" || last.kind === "narration");
  $("btn-send").hidden = busy;
  $("btn-stop").hidden = !busy;
  $("btn-retry").disabled = busy || !last;
  $("btn-continue").disabled = busy || !gen;
  $("btn-narrate").disabled = busy;
  $("btn-suggest").disabled = busy;
  $("btn-reset").disabled = busy;
  document.body.classList.toggle("busy", busy);
}

// ------------------------------------------------------------------ generation
let paintQueued = false;
function queuePaint() {
  if (paintQueued) return;
  paintQueued = true;
  requestAnimationFrame(() => { paintQueued = false; if (state.live && state.live.mode !== "suggest") paintLive(); drawCacheMap(); });
}

/** Grow the cache map by one token between the server's kv events, so the bar moves with every token. */
function bumpKv(turn, kind) {
  const kv = state.kv;
  if (!kv || !kv.segments) return;
  let seg = kv.segments[kv.segments.length - 1];
  if (!seg || (turn !== null && turn !== undefined && seg.turn !== turn && seg.kind !== "scratch")) {
    seg = { id: -1, kind, name: "live", start: kv.length, tokens: 0, pinned: false, turn, evicted: 0, live: true };
    kv.segments.push(seg);
  }
  seg.tokens += 1;
  kv.length += 1;
  kv.free = kv.budget - kv.length;
}

async function generate(mode, url, body, kind) {
  if (!state.cur || state.live) return;
  const msgs = state.cur.messages;
  const L = { mode, kind, text: "", toks: [], turn: null, started: performance.now(), n: 0 };
  if (mode === "send") { L.userText = body.text; L.turn = msgs.length + 1; }
  if (mode === "narrate") L.turn = msgs.length;
  if (mode === "retry" || mode === "continue") {
    const last = msgs[msgs.length - 1];
    L.turn = msgs.length - 1;
    L.kind = kind = last.kind === "user" ? "assistant" : last.kind;
    if (last.kind === "user") { L.mode = "send"; L.userText = last.text; L.turn = msgs.length; L.resend = true; }
    if (mode === "continue") {
      L.text = last.text;
      const prev = tokenEntry(last);
      L.toks = prev ? [...prev.toks] : (last.text ? [{ plain: true, text: last.text }] : []);
    }
  }
  if (L.resend) { state.cur.messages = msgs.slice(0, -1); }
  state.live = L;
  state.ctrl = new AbortController();
  if (mode === "suggest") { L.before = $("input").value; $("input").placeholder = "Suggesting…"; }
  render();
  if (L.resend) state.cur.messages = msgs;
  scrollToEnd(true);
  setStatus(mode === "suggest" ? "Suggesting…" : "Generating…", "busy");
  let done = null;
  let failed = null;
  try {
    await stream(url, body, {
      token: (ev) => {
        if (ev.token !== null && ev.token !== undefined) L.n += 1;
        L.text += ev.text || "";
        L.toks.push({ text: ev.text || "", token: ev.token, logprob: ev.logprob, top: ev.top || [] });
        if (ev.turn !== null && ev.turn !== undefined) L.turn = ev.turn;
        if (mode === "suggest") { $("input").value = L.text; autosize(); }
        else bumpKv(L.turn, L.kind);
        const secs = (performance.now() - L.started) / 1000;
        setStatus(`${L.n} token${L.n === 1 ? "" : "s"} · ${(L.n / Math.max(secs, 1e-3)).toFixed(1)} tok/s`, "busy");
        queuePaint();
      },
      kv: (kv) => { state.kv = kv; queuePaint(); },
      done: (d) => { done = d; },
      error: (d) => { failed = new ApiError((d.error && d.error.message) || "generation failed", 500, d.error && d.error.type); },
    }, state.ctrl.signal);
  } catch (e) {
    if (e.name !== "AbortError") failed = e;
  }
  // keep the per-token data of the finished reply for the debug view
  if (done && done.message && mode !== "suggest") {
    const m = done.message;
    state.tokens.set(`${m.uid}:${m.selected}`, { text: m.text, toks: L.toks });
  }
  state.live = null;
  state.ctrl = null;
  if (mode === "suggest") {
    $("input").placeholder = PLACEHOLDER;
    if (done && typeof done.text === "string") {
      $("input").value = done.text;
      state.suggestion = { before: L.before, text: done.text };
      $("suggest-bar").hidden = false;
    } else if (failed) $("input").value = L.before;
    autosize();
    $("input").focus();
  }
  try {
    state.cur = await api("GET", path());
  } catch (e) { failed = failed || e; }
  render();
  scrollToEnd();
  await refreshKv();
  loadSessions().catch(() => {});
  if (failed) showError(failed);
  else {
    const secs = ((performance.now() - L.started) / 1000).toFixed(1);
    const why = done && done.finish_reason ? ` · ${done.finish_reason}` : "";
    setStatus(`${L.n} token${L.n === 1 ? "" : "s"} in ${secs}s${why}`);
  }
  state.lastRun = { mode, tokens: L.n, paints: L.paints || 0, finish: done && done.finish_reason };
  markDone();
  return done;
}

function endSuggestion() { state.suggestion = null; $("suggest-bar").hidden = true; }
$("btn-sug-send").addEventListener("click", () => send());
$("btn-sug-edit").addEventListener("click", () => {
  const ta = $("input");
  ta.focus();
  ta.setSelectionRange(ta.value.length, ta.value.length);
  $("suggest-bar").hidden = true; // still in the box, now the user's own draft
});
$("btn-sug-discard").addEventListener("click", () => {
  $("input").value = state.suggestion ? state.suggestion.before : "";
  endSuggestion();
  autosize();
  $("input").focus();
});

function send() {
  endSuggestion();
  const input = $("input");
  const text = input.value;
  if (!text.trim() || state.live || !state.cur) return;
  input.value = "";
  autosize();
  return generate("send", path("/messages"), { text, params: GEN_PARAMS }, "assistant");
}
const retry = () => generate("retry", path("/retry"), { params: GEN_PARAMS }, "assistant");
const cont = () => generate("continue", path("/continue"), { params: GEN_PARAMS }, "assistant");
const narrate = () => generate("narrate", path("/narrate"), { params: GEN_PARAMS }, "narration");
const suggest = () => generate("suggest", path("/suggest"), { params: GEN_PARAMS }, "user");

async function stop() {
  if (!state.live) return;
  const ctrl = state.ctrl;
  setStatus("Stopping…", "busy");
  try { await api("POST", path("/stop")); } catch (e) { console.warn(e); }
  setTimeout(() => { if (state.ctrl === ctrl && ctrl) ctrl.abort(); }, 3000); // the stream should end by itself
}

// ------------------------------------------------------------------ edits
async function mutate(method, suffix, body, what) {
  if (state.live) return;
  try {
    state.cur = await api(method, path(suffix), body);
    render();
    await refreshKv();
    loadSessions().catch(() => {});
    setStatus(what);
  } catch (e) { showError(e); } finally { markDone(); }
}
const select = (turn, index) => mutate("POST", "/select", { turn, index }, `Showing alternative ${index + 1} of message #${turn}`);
const revert = (turn) => mutate("POST", "/revert", { turn }, `Reverted: messages after #${turn - 1} dropped`);
const del = (turn) => mutate("DELETE", `/messages/${turn}`, undefined, `Deleted message #${turn}`);
function reset() {
  if (!confirm("Reset this chat to its start (system prompt and card greeting)? All messages are dropped.")) return;
  mutate("POST", "/reset", {}, "Reset to the start");
}

function startEdit(el, m, i) {
  const body = el.querySelector(".msg-body");
  const ta = h("textarea", { class: "edit-box", rows: Math.min(12, Math.max(3, m.text.split("\n").length + 1)) });
  ta.value = m.text;
  const save = async () => mutate("PATCH", `/messages/${i}`, { text: ta.value }, `Edited message #${i}`);
  const box = h("div", { class: "edit" }, ta, h("div", { class: "edit-actions" },
    h("button", { onclick: () => renderMessages() }, "Cancel"),
    h("button", { class: "primary act-save", onclick: save }, "Save")));
  ta.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); save(); }
    if (e.key === "Escape") renderMessages();
  });
  body.replaceWith(box);
  ta.focus();
}

// ------------------------------------------------------------------ settings
function fillSettings() {
  const s = state.cur && state.cur.settings;
  if (!s) return;
  const f = $("settings-form");
  const pol = f.policy;
  const policies = (state.info && state.info.policies) || [s.policy];
  if (pol.options.length !== policies.length) pol.replaceChildren(...policies.map((p) => h("option", { value: p }, p)));
  for (const [k, v] of Object.entries(s)) {
    const el = f.elements.namedItem(k);
    if (el && document.activeElement !== el) el.value = v === null || v === undefined ? "" : LIST_FIELDS.has(k) ? JSON.stringify(v) : v;
  }
}

$("settings-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  if (!state.cur) return;
  const f = e.target;
  const cur = state.cur.settings;
  const changes = {};
  for (const el of f.elements) {
    if (!el.name) continue;
    let v = el.value.trim();
    if (INT_FIELDS.has(el.name)) v = v === "" ? null : Number(v);
    else if (FLOAT_FIELDS.has(el.name)) v = v === "" ? null : Number(v);
    else if (LIST_FIELDS.has(el.name)) {
      try { v = JSON.parse(v === "" ? "[]" : v); } catch { v = undefined; }
      if (!Array.isArray(v) || !v.every((x) => typeof x === "string")) {
        $("settings-msg").textContent = `${el.name}: a JSON list of strings, e.g. ["\\n", ":"]`;
        return;
      }
      if (JSON.stringify(v) !== JSON.stringify(cur[el.name])) changes[el.name] = v;
      continue;
    }
    if (typeof v === "number" && !Number.isFinite(v)) { $("settings-msg").textContent = `${el.name}: not a number`; return; }
    if (INT_FIELDS.has(el.name) && v !== null && !Number.isInteger(v)) { $("settings-msg").textContent = `${el.name} must be a whole number`; return; }
    if (v === null && el.name !== "seed") continue;
    if (v !== cur[el.name]) changes[el.name] = v;
  }
  const msg = $("settings-msg");
  if (!Object.keys(changes).length) { msg.textContent = "Nothing changed"; msg.className = "form-msg"; return; }
  try {
    const res = await api("PATCH", path("/settings"), changes);
    state.cur = res && res.messages ? res : await api("GET", path());
    msg.textContent = `Applied: ${Object.keys(changes).join(", ")}`;
    msg.className = "form-msg ok";
    render();
    await refreshKv();
  } catch (err) {
    msg.textContent = err.message;
    msg.className = "form-msg error";
  } finally {
    markDone();
  }
});

function fillChatForm() {
  const cur = state.cur;
  $("settings-empty").hidden = !!cur;
  $("chat-form").hidden = !cur;
  $("settings-form").hidden = !cur;
  if (!cur) {
    const info = state.info || {};
    const d = info.defaults || {};
    $("server-info").replaceChildren(...[["Model", info.label || info.model], ["Backend", info.backend],
      ["Default budget", d.budget && `${d.budget} tokens`], ["Default policy", d.policy]]
      .filter(([, v]) => v).flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, String(v))]));
    return;
  }
  const f = $("chat-form");
  if (document.activeElement !== f.chat_name) f.chat_name.value = cur.name || "";
  if (document.activeElement !== f.chat_system) f.chat_system.value = cur.system_prompt || "";
  const lb = cur.lorebook;
  const n = lb ? lb.entries.length : 0;
  $("lore-info").textContent = lb ? `· ${lb.name || "attached"}: ${n} ${n === 1 ? "entry" : "entries"}, ${lb.entries.filter((e) => e.active).length} in memory` : "· none";
  $("btn-lore-detach").disabled = !lb;
}

function toggleSettings(open) {
  const panel = $("settings");
  panel.hidden = open === undefined ? !panel.hidden : !open;
  document.body.classList.toggle("settings-open", !panel.hidden);
  if (!panel.hidden) { fillChatForm(); fillSettings(); $("settings-msg").textContent = ""; $("chat-msg").textContent = ""; }
}
$("btn-new-settings").addEventListener("click", () => { toggleSettings(false); openNewDialog(); });

async function chatChange(method, suffix, body, okText) {
  const msg = $("chat-msg");
  try {
    state.cur = await api(method, path(suffix), body);
    await loadAvatars();
    msg.textContent = okText;
    msg.className = "form-msg ok";
    render();
    fillChatForm();
    await refreshKv();
    loadSessions().catch(() => {});
  } catch (err) {
    msg.textContent = err.message;
    msg.className = "form-msg error";
  } finally { markDone(); }
}

$("chat-form").addEventListener("submit", (e) => {
  e.preventDefault();
  if (!state.cur) return;
  const f = e.target;
  const body = {};
  if (f.chat_name.value.trim() !== (state.cur.name || "")) body.name = f.chat_name.value.trim();
  if (f.chat_system.value !== (state.cur.system_prompt || "")) body.system_prompt = f.chat_system.value || null;
  if (!Object.keys(body).length) { $("chat-msg").textContent = "Nothing changed"; $("chat-msg").className = "form-msg"; return; }
  chatChange("PATCH", "", body, `Saved: ${Object.keys(body).map((k) => k.replace("_", " ")).join(", ")}`);
});
$("lore-attach").addEventListener("change", async (e) => {
  const file = e.target.files[0];
  if (!file || !state.cur) return;
  let book;
  try { book = JSON.parse(await readFile(file, "text")); } catch (err) {
    $("chat-msg").textContent = `Not a lorebook (JSON): ${err.message}`; $("chat-msg").className = "form-msg error"; return;
  }
  e.target.value = "";
  chatChange("PUT", "/lorebook", { lorebook: book }, `Lorebook attached: ${file.name}`);
});
$("btn-lore-detach").addEventListener("click", () => chatChange("PUT", "/lorebook", { lorebook: null }, "Lorebook detached"));
$("avatar-attach").addEventListener("change", async (e) => {
  const file = e.target.files[0];
  if (!file || !state.cur) return;
  const url = await readFile(file, "url");
  e.target.value = "";
  chatChange("PUT", "/avatar/user", { image: url }, "Avatar saved");
});

async function exportChat(format) {
  try {
    const r = await fetch(path(`/export?format=${format}`), { headers: authHeaders() });
    if (!r.ok) throw new ApiError(`export failed: ${r.status}`, r.status);
    const blob = await r.blob();
    const a = h("a", { href: URL.createObjectURL(blob), download: `${(state.cur.name || "chat").replace(/[^\w .-]+/g, "_")}.${format}` });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 5000);
    $("chat-msg").textContent = `Exported as .${format}`;
    $("chat-msg").className = "form-msg ok";
  } catch (e) { $("chat-msg").textContent = e.message; $("chat-msg").className = "form-msg error"; } finally { markDone(); }
}
$("btn-export-json").addEventListener("click", () => exportChat("json"));
$("btn-export-jsonl").addEventListener("click", () => exportChat("jsonl"));

$("btn-import").addEventListener("click", () => $("import-file").click());
$("import-file").addEventListener("change", async (e) => {
  const file = e.target.files[0];
  if (!file) return;
  e.target.value = "";
  try {
    const text = await readFile(file, "text");
    const hist = await api("POST", "/api/sessions/import", { data: text });
    await loadSessions();
    closeSidebar();
    await openSession(hist.id);
    setStatus(`Imported ${file.name}: ${hist.messages.length} messages`);
  } catch (err) { showError(err); markDone(); }
});
$("btn-settings").addEventListener("click", () => toggleSettings());
$("btn-settings-close").addEventListener("click", () => toggleSettings(false));

// ------------------------------------------------------------------ layout: sidebar, debug, keyboard
function closeSidebar() { document.body.classList.remove("sidebar-open"); $("scrim").hidden = true; }
$("btn-sidebar").addEventListener("click", () => {
  const open = !document.body.classList.contains("sidebar-open");
  document.body.classList.toggle("sidebar-open", open);
  $("scrim").hidden = !open;
});
$("scrim").addEventListener("click", closeSidebar);

$("toggle-debug").checked = state.debug;
document.body.classList.toggle("debug", state.debug);
$("toggle-debug").addEventListener("change", (e) => {
  state.debug = e.target.checked;
  localStorage.setItem("infinichat.debug", state.debug ? "1" : "0");
  document.body.classList.toggle("debug", state.debug);
  hideTip();
  if (state.cur) renderMessages();
});

function autosize() {
  const ta = $("input");
  ta.style.height = "auto";
  ta.style.height = `${Math.min(ta.scrollHeight, 220)}px`;
}
$("input").addEventListener("input", autosize);
$("input").addEventListener("keydown", (e) => {
  if (e.key !== "Enter" || e.isComposing) return;
  if (e.ctrlKey || e.metaKey) { e.preventDefault(); retry(); return; }
  if (e.shiftKey || e.altKey) return;
  e.preventDefault();
  send();
});
$("btn-send").addEventListener("click", send);
$("btn-stop").addEventListener("click", stop);
$("btn-retry").addEventListener("click", retry);
$("btn-continue").addEventListener("click", cont);
$("btn-narrate").addEventListener("click", narrate);
$("btn-suggest").addEventListener("click", suggest);
$("btn-reset").addEventListener("click", reset);
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && state.live) stop();
});

$("cm-zoom").addEventListener("click", () => {
  state.zoom = !state.zoom;
  localStorage.setItem("infinichat.zoom", state.zoom ? "1" : "0");
  drawCacheMap();
});

// ------------------------------------------------------------------ start
async function start() {
  $("input").placeholder = PLACEHOLDER;
  try {
    state.info = await api("GET", "/api/info");
    $("model-name").textContent = state.info.label || state.info.model || "";
    $("model-name").title = `Model: ${state.info.model || ""} (${state.info.backend || ""})`;
  } catch (e) { showError(e); }
  try {
    await loadSessions();
  } catch (e) { showError(e); }
  const m = location.hash.match(/^#s=(.+)$/);
  const want = m ? decodeURIComponent(m[1]) : null;
  if (want && state.sessions.some((s) => s.id === want)) await openSession(want);
  else render();
  document.body.dataset.ready = "1";
}
window.addEventListener("hashchange", () => {
  const m = location.hash.match(/^#s=(.+)$/);
  if (m && decodeURIComponent(m[1]) !== sid()) openSession(decodeURIComponent(m[1]));
});
start();
