// Mission Control: the page. It shows only what the Worker verified; on the first frame
// that fails it freezes (no update is applied again) and says which seq and why.
// Everything the daemon sends is data: written with textContent, never as HTML.
import { chart } from "./chart.js";

const ACTIVE = new Set(["detected", "open", "awaiting_approval", "approved", "executing",
  "verifying", "interrupted"]);
const FEED_TOPICS = ["mission.", "executor.", "learning."];
const FEED_MAX = 100;
const PIN = "grace.pinned_key";
const SESSION = "grace.session";

const state = {
  frozen: false, failure: null, kid: null, keyHow: null, hello: null, lastSeq: null,
  verified: 0, lastEventAt: null, interval: 5, subscribedAt: null, anchor: null, lastBeat: null,
  missions: new Map(), feed: [],
  components: {}, knowledge: null, status: null, detail: null, arming: null, message: null,
  shownAt: {}, closed: null,
};
// For tests and bench/web.py: what the page has verified and shown.
window.grace = state;

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const n = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined) continue;
    if (k === "class") n.className = v;
    else if (k.startsWith("on")) n.addEventListener(k.slice(2), v);
    else n.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    n.append(c instanceof Node ? c : String(c));
  }
  return n;
}

// A time as graced sends it: seconds since the epoch in its answers, the ISO 8601 form
// of an event's ts in the payloads of new events (opened_at in mission.*).
function secs(t) {
  return typeof t === "string" ? Date.parse(t) / 1000 : t;
}

function age(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m`;
  if (s < 86400) return `${Math.floor(s / 3600)}h`;
  return `${Math.floor(s / 86400)}d`;
}

// -- the Worker ------------------------------------------------------------------

const worker = new Worker("worker.js", { type: "module" });
const waiting = new Map();
let nextReq = 1;

function request(method, params = {}) {
  const id = nextReq++;
  return new Promise((resolve) => {
    waiting.set(id, resolve);
    worker.postMessage({ type: "request", id, method, params });
  });
}

worker.onmessage = (e) => {
  const msg = e.data;
  if (state.frozen && msg.type !== "response") return;
  switch (msg.type) {
    case "key":
      state.kid = msg.kid;
      state.keyHow = msg.how;
      if (msg.how !== "pinned") localStorage.setItem(PIN, msg.publicKey);
      break;
    case "session":
      sessionStorage.setItem(SESSION, msg.session);
      break;
    case "ready":
      state.closed = null;
      state.retry = null;
      if (msg.resumed) state.reconnects = (state.reconnects || 0) + 1;
      state.hello = msg.hello;
      state.subscribedAt = msg.subscribed;
      state.anchor = msg.anchor;
      // The pace the daemon announced: the stale clock runs before any heartbeat came.
      if (typeof msg.hello.heartbeat_interval === "number") {
        state.interval = msg.hello.heartbeat_interval;
      }
      refresh();
      break;
    case "events":
      state.lastSeq = msg.lastSeq;
      state.verified = msg.verified;
      state.lastEventAt = msg.at;
      if (typeof msg.interval === "number") state.interval = msg.interval;
      for (const ev of msg.events) {
        if (ev.topic === "daemon.heartbeat") state.lastBeat = Date.parse(ev.ts) / 1000;
        apply(ev);
      }
      break;
    case "response": {
      const resolve = waiting.get(msg.id);
      waiting.delete(msg.id);
      if (resolve) resolve(msg);
      return;
    }
    case "notice":
      state.message = `graced: ${msg.notice.message || msg.notice.reason || "notice"}`;
      break;
    case "fail":
      state.frozen = true;
      state.failure = { seq: msg.seq, reason: msg.reason };
      break;
    case "closed":
      state.closed = msg.reason;
      state.retry = msg.retry;
      break;
    default:
      return;
  }
  schedule();
};

function start() {
  // The relay serves no service worker: one that controls this origin was planted by
  // another server that had this address before, and could read and answer anything.
  if (navigator.serviceWorker && navigator.serviceWorker.controller) {
    navigator.serviceWorker.getRegistrations()
      .then((all) => all.forEach((r) => r.unregister())).catch(() => {});
    state.frozen = true;
    state.failure = { seq: null, reason: "a service worker the relay did not serve controls "
      + "this page's origin; nothing was sent to the relay and the worker is unregistered. "
      + "Start gracectl web again and open its new URL" };
    return;
  }
  const params = new URLSearchParams(location.hash.slice(1));
  const token = params.get("token") || "";
  // A reload of this tab: the session the relay gave it (the token is spent at first use).
  const session = token ? null : sessionStorage.getItem(SESSION);
  let given = params.get("key");
  if (given) given = given.replace(/-/g, "+").replace(/_/g, "/").padEnd(44, "=");
  // The token and key leave the address bar. The browser's history (and a session
  // restore file) keep the URL as it was opened: harmless, the token is spent by now.
  if (location.hash) history.replaceState(null, "", location.pathname);
  worker.postMessage({
    type: "start", url: `ws://${location.host}/ws`, token, session,
    pinned: localStorage.getItem(PIN), given,
  });
}

// -- applying verified events -------------------------------------------------------

function apply(ev) {
  const t = ev.topic;
  if (t.startsWith("mission.") && ev.payload && typeof ev.payload.id === "number") {
    const old = state.missions.get(ev.payload.id) || {};
    state.missions.set(ev.payload.id, { ...old, ...ev.payload, _seq: ev.seq });
    if (state.detail && state.detail.id === ev.payload.id) loadDetail(ev.payload.id);
  } else if (t === "integration.summary" && ev.payload && ev.payload.components) {
    state.components = { ...ev.payload.components };
    dirty.components = true;
  } else if (t === "integration.changed" && ev.payload) {
    if (ev.payload.state === "removed") delete state.components[ev.payload.component];
    else state.components[ev.payload.component] = ev.payload;
    dirty.components = true;
  }
  if (FEED_TOPICS.some((p) => t.startsWith(p))) {
    dirty.feed = true;
    state.feed.unshift(ev);
    if (state.feed.length > FEED_MAX) state.feed.length = FEED_MAX;
  }
  if (t.startsWith("learning.") || t === "mission.resolved" || t === "mission.failed") {
    refreshKnowledge();
  }
}

async function refresh() {
  const [list, status] = await Promise.all([
    request("missions.list", { all: true, limit: 50 }), request("status")]);
  if (state.frozen) return;
  if (list.ok) {
    for (const m of list.result.missions.slice().reverse()) {
      if (!state.missions.has(m.id)) state.missions.set(m.id, m);
    }
  }
  if (status.ok) {
    state.status = status.result;
    if (status.result.integration && Object.keys(state.components).length === 0) {
      state.components = { ...status.result.integration };
      dirty.components = true;
    }
  }
  await refreshKnowledge();
  schedule();
}

let knowledgeBusy = false;
async function refreshKnowledge() {
  if (knowledgeBusy) return;
  knowledgeBusy = true;
  const k = await request("knowledge.stats");
  knowledgeBusy = false;
  if (k.ok && !state.frozen) {
    state.knowledge = k.result;
    dirty.components = true;
    schedule();
  }
}

// -- approvals --------------------------------------------------------------------

function planOf(m) {
  return m.plan_sha256 || (m.plan && m.plan.sha256) || null;
}

async function decide(m, approve) {
  const plan = planOf(m);
  const params = { id: m.id, opened: m.opened_at,
    comment: approve ? "approved in the browser" : "rejected in the browser" };
  if (approve) params.plan = plan;
  state.arming = null;
  state.message = `${approve ? "approving" : "rejecting"} mission #${m.id}…`;
  schedule();
  const res = await request(approve ? "missions.approve" : "missions.reject", params);
  if (state.frozen) return;
  state.message = res.ok
    ? `mission #${m.id} ${approve ? "approved" : "rejected"}`
      + (res.result.warning ? ` (${res.result.warning})` : "")
    : `refused: ${res.error.code}: ${res.error.message}`;
  schedule();
}

function decisionButtons(m) {
  if (m.state !== "awaiting_approval") return null;
  const plan = planOf(m);
  if (state.arming && state.arming.id === m.id) {
    const approve = state.arming.approve;
    return el("div", { class: "actions" },
      el("button", { class: approve ? "confirm approve" : "confirm reject",
        "data-action": "confirm", onclick: () => decide(m, approve) },
      approve ? `Confirm: run plan ${String(plan).slice(0, 12)}` : "Confirm rejection"),
      el("button", { onclick: () => { state.arming = null; schedule(); } }, "Cancel"));
  }
  return el("div", { class: "actions" },
    el("button", { class: "approve", "data-action": "approve", disabled: plan ? null : "",
      onclick: (e) => { e.stopPropagation(); state.arming = { id: m.id, approve: true }; schedule(); } },
    "Approve"),
    el("button", { class: "reject", "data-action": "reject",
      onclick: (e) => { e.stopPropagation(); state.arming = { id: m.id, approve: false }; schedule(); } },
    "Reject"));
}

// -- detail view -------------------------------------------------------------------

async function loadDetail(id) {
  const [got, det] = await Promise.all([
    request("missions.get", { id }), request("detectors", { history: 300, times: true })]);
  if (state.frozen) return;
  if (!got.ok) {
    state.message = `mission #${id}: ${got.error.message}`;
    schedule();
    return;
  }
  state.detail = { id, mission: got.result.mission,
    detector: det.ok ? det.result.detectors[got.result.mission.detector] : null };
  schedule();
}

function detailView() {
  const d = state.detail;
  if (!d) return null;
  const m = d.mission;
  const live = state.missions.get(m.id) || m;
  // The detector's recent samples (kept in memory by graced) and the mission's own
  // (kept with the mission, so an old mission still shows its anomaly), in time order.
  const hist = d.detector && d.detector.history && d.detector.history[m.subject];
  const recent = Array.isArray(hist) ? hist.filter((p) => Array.isArray(p)) : [];
  const firstRecent = recent.length ? recent[0][0] : Infinity;
  const own = (m.samples || []).map((x) => [x.ts, x.value]).filter(([t]) => t < firstRecent);
  // A closed mission: its own window (opened less a margin .. closed plus one), not
  // the detector's samples of today; an open one: from before its opening until now.
  const span = m.closed_at ? Math.max(0, m.closed_at - m.opened_at) : 0;
  const margin = Math.max(10, span * 0.25);
  const from = m.opened_at - margin;
  const until = m.closed_at ? m.closed_at + margin : Infinity;
  const points = own.concat(recent).filter(([t]) => t >= from && t <= until);
  const threshold = d.detector && typeof d.detector.threshold === "number"
    ? d.detector.threshold : null;
  const marks = [{ ts: m.opened_at, label: "opened", cls: "opened" }];
  if (m.closed_at) marks.push({ ts: m.closed_at, label: live.state, cls: "closed" });
  const steps = (m.steps && m.steps.length) ? m.steps : null;
  const plan = m.plan;
  return el("section", { id: "detail", class: "panel" },
    el("h2", {}, `Mission #${m.id} — ${m.detector} / ${m.subject}`,
      el("button", { class: "close", onclick: () => { state.detail = null; schedule(); } },
        "Close")),
    el("p", { class: "summary" }, `${live.state} · ${m.severity} · ${brief(m)}`),
    chart(points, { threshold, marks, window: [from, m.closed_at ? until : null] }),
    el("h3", {}, "Timeline"),
    el("ol", { class: "timeline" }, ...(m.timeline || []).map((t) => el("li", {},
      el("time", {}, new Date(t.ts * 1000).toISOString().slice(11, 19)), ` ${t.from || "—"} → ${t.to}`,
      t.reason ? el("span", { class: "dim" }, ` ${t.reason}`) : null))),
    el("h3", {}, steps ? "Steps that ran" : "Plan"),
    steps
      ? el("ol", { class: "steps" }, ...steps.map((s) => el("li", {},
        `${s.action || ""} ${(s.argv || []).join(" ")} → exit ${s.exit_code ?? "?"}`
        + ` in ${typeof s.duration_s === "number" ? s.duration_s.toFixed(2) : "?"} s`)))
      : plan
        ? el("div", {}, el("p", { class: "dim" }, `${plan.playbook} (risk ${plan.risk}), sha256 ${plan.sha256}`),
          el("ol", { class: "steps" }, ...(plan.steps || []).map((s) => el("li", {},
            `${s.action} ${(s.argv || [s.unit || s.signal || ""]).join(" ")}`))))
        : el("p", { class: "dim" }, "no playbook"),
    decisionButtons(live));
}

// -- rendering ---------------------------------------------------------------------

let scheduled = false;
function schedule() {
  if (scheduled) return;
  scheduled = true;
  requestAnimationFrame(() => {
    scheduled = false;
    render();
  });
}

function banner() {
  const b = $("banner");
  if (state.failure) {
    b.className = "banner red";
    b.textContent = `VERIFICATION FAILED${state.failure.seq !== null ? ` at seq ${state.failure.seq}` : ""}: `
      + `${state.failure.reason}. The view is frozen: nothing after this is shown.`;
    return;
  }
  const staleAfter = 3 * (state.interval || 5) + 1;
  const now = Date.now() / 1000;
  // Silence, counted from the last verified frame or, before any, from the subscribe.
  const since = state.lastEventAt !== null ? state.lastEventAt / 1000 : state.subscribedAt;
  const quiet = since === null ? 0 : now - since;
  // Lag: the daemon's clock now (the hello reply's signed ts, advanced by the browser's
  // clock since the hello went out) minus the newest heartbeat's signed ts, or the
  // hello's before any: a stream passed on late, however steadily, falls behind.
  let lag = 0;
  if (state.anchor) {
    const daemonNow = state.anchor.daemon + (now - state.anchor.sent);
    lag = daemonNow - Math.max(state.lastBeat ?? -Infinity, state.anchor.daemon);
  }
  if (state.closed) {
    b.className = "banner amber";
    // 4001: the login token was spent (or wrong) and this tab has no session of its own;
    // a reload would present the same spent token.
    const refused = state.closed.startsWith("4001");
    b.textContent = `Disconnected (${state.closed}); last verified seq ${state.lastSeq ?? "—"}. `
      + (refused ? "Run gracectl web again for a new URL."
        : state.retry !== null && state.retry !== undefined
          ? `Reconnecting with this page's session in ${state.retry} s (the chain must continue).`
          : "Reload to reconnect.");
  } else if (quiet > staleAfter) {
    b.className = "banner amber";
    b.textContent = `STALE: no frame for ${Math.round(quiet)} s (heartbeat every ${state.interval} s): `
      + "the stream may be withheld.";
  } else if (lag > staleAfter) {
    b.className = "banner amber";
    b.textContent = `STALE: the newest heartbeat is ${Math.round(lag)} s behind the daemon's clock `
      + `(heartbeat every ${state.interval} s): the stream may be delayed or withheld.`;
  } else if (state.kid === null) {
    b.className = "banner amber";
    b.textContent = "Connecting…";
  } else {
    b.className = "banner green";
    b.textContent = `Verified: ${state.verified} frames checked in this browser against key `
      + `${state.kid}, head seq ${state.lastSeq ?? "—"}.`;
  }
}

// Cards are kept between renders (keyed by mission, rebuilt only when what they show
// changes), so a button is never replaced under the pointer.
const cards = new Map();

function card(m, now) {
  if (!(m.id in state.shownAt)) state.shownAt[m.id] = Date.now(); // when it was first drawn
  const selected = !!(state.detail && state.detail.id === m.id);
  const arming = state.arming && state.arming.id === m.id ? state.arming.approve : null;
  const sig = JSON.stringify([m.state, m.severity, m.summary, m.playbook, m.risk, planOf(m),
    selected, arming]);
  let c = cards.get(m.id);
  if (!c || c.sig !== sig) {
    const ageSpan = el("span", { class: "age" });
    const node = el("article", { class: `card sev-${m.severity} state-${m.state}${selected ? " selected" : ""}`,
      "data-mission": m.id, "data-state": m.state,
      onclick: () => loadDetail(m.id) },
    el("header", {}, el("span", { class: "sev" }, m.severity), el("span", { class: "id" }, `#${m.id}`),
      el("span", { class: "st" }, m.state)),
    el("div", { class: "what" }, `${m.detector} / ${m.subject}`),
    el("div", { class: "dim" }, ageSpan, ` · playbook ${m.playbook || "none"}`
      + (m.risk ? ` (${m.risk})` : "")),
    el("div", { class: "summary" }, brief(m)),
    decisionButtons(m));
    c = { sig, node, ageSpan };
    cards.set(m.id, c);
  }
  const text = `${age(now - (secs(m.opened_at) || now))} ago`;
  if (c.ageSpan.textContent !== text) c.ageSpan.textContent = text;
  return c.node;
}

function place(parent, nodes) {
  const old = parent.children;
  if (old.length === nodes.length && nodes.every((n, i) => old[i] === n)) return;
  parent.replaceChildren(...nodes);
}

let detailNode = null;
let detailSig = null;

const dirty = { feed: true, components: true };

function render() {
  banner();
  $("message").textContent = state.message || "";
  if (state.frozen && $("missions").dataset.frozen) return;
  if (state.frozen) $("missions").dataset.frozen = "1";
  const now = Date.now() / 1000;
  const all = [...state.missions.values()].sort((a, b) => b.id - a.id);
  const waitingCards = all.filter((m) => m.state === "awaiting_approval");
  const active = all.filter((m) => ACTIVE.has(m.state) && m.state !== "awaiting_approval");
  const closed = all.filter((m) => !ACTIVE.has(m.state) && m.state !== "awaiting_approval").slice(0, 20);
  place($("col-waiting"), waitingCards.map((m) => card(m, now)));
  place($("col-active"), active.map((m) => card(m, now)));
  place($("col-closed"), closed.map((m) => card(m, now)));
  $("count-waiting").textContent = waitingCards.length;
  $("count-active").textContent = active.length;
  const live = state.detail ? state.missions.get(state.detail.id) : null;
  const sig = state.detail ? [state.detail, live && live.state, state.arming && state.arming.id,
    state.arming && state.arming.approve] : null;
  if (!sig || !detailSig || sig.some((v, i) => v !== detailSig[i])) {
    detailSig = sig;
    detailNode = detailView();
  }
  place($("detail-slot"), detailNode ? [detailNode] : []);
  const k = state.knowledge;
  $("knowledge").textContent = k ? knowledgeText(k) : "—";
  $("key").textContent = state.kid ? `${state.kid} (${KEY_HOW[state.keyHow] || state.keyHow})`
    : "—";
  $("daemon").textContent = state.hello ? `${state.hello.host} · ${state.hello.daemon_id}` : "—";
  if (!dirty.feed && !dirty.components) return;
  dirty.feed = false;
  dirty.components = false;
  $("feed").replaceChildren(...state.feed.slice(0, 50).map((ev) => el("li", {},
    el("time", {}, ev.ts.slice(11, 19)), " ", el("span", { class: "topic" }, ev.topic), " ",
    el("span", {}, describe(ev)))));
  const comps = Object.entries(state.components).sort(([a], [b]) => a.localeCompare(b));
  $("components").replaceChildren(...comps.map(([name, c]) => el("li", {
    class: `comp comp-${c.state}`, "data-component": name, "data-state": c.state },
  el("strong", {}, name), " ", el("span", { class: "st" }, c.state),
  c.latency_ms != null ? el("span", { class: "dim" }, ` ${c.latency_ms} ms`) : null,
  c.last_error ? el("div", { class: "err" }, c.last_error) : null)));
}

function describe(ev) {
  const p = ev.payload || {};
  if (ev.topic.startsWith("mission.")) return `#${p.id} ${p.detector}/${p.subject}: ${p.state} — ${brief(p)}`;
  if (ev.topic.startsWith("executor.")) {
    return [p.mission !== undefined ? `#${p.mission}` : "", p.playbook || "", p.step !== undefined ? `step ${p.step}` : "",
      p.exit_code !== undefined ? `exit ${p.exit_code}` : ""].filter(Boolean).join(" ");
  }
  if (ev.topic.startsWith("learning.")) return learned(ev.topic, p);
  return JSON.stringify(p).slice(0, 160);
}

// A mission's summary without the "detector subject: " it starts with (the card and the
// feed name both already), nor the subject once more when the probe's message repeats it.
function brief(m) {
  let text = String(m.summary || "");
  for (const prefix of [`${m.detector} ${m.subject}: `, `${m.subject}: `]) {
    if (m.subject && text.startsWith(prefix)) text = text.slice(prefix.length);
  }
  return text;
}

const pct = (x) => (typeof x === "number" ? `${Math.round(x * 100)} %` : "—");

// learning.* events in words, not raw JSON.
function learned(topic, p) {
  const mission = typeof p.mission === "number" ? `#${p.mission} ` : "";
  const tally = typeof p.successes === "number"
    ? `${p.successes} of ${p.successes + (p.failures || 0)} runs fixed it` : "";
  switch (topic) {
    case "learning.consulted": {
      const sim = p.similar || {};
      const past = `${sim.found ?? 0} similar past missions (${sim.resolved ?? 0} resolved)`;
      const choice = p.chosen ? `chose ${p.chosen}` : p.escalate ? "escalates" : "no playbook to choose";
      return `${mission}memory consulted: ${past}; ${choice}${p.strategy ? ` (${p.strategy})` : ""}`;
    }
    case "learning.pattern_learned":
    case "learning.pattern_updated":
      return `${mission}${p.playbook} on ${p.pattern}: ${p.success ? "worked" : "did not work"}; `
        + `${tally}, expected success ${pct(p.posterior_mean)}`
        + (typeof p.mttr_s === "number" ? `, mean time to resolve ${p.mttr_s.toFixed(1)} s` : "");
    case "learning.demoted":
      return `${p.playbook} on ${p.pattern} demoted: ${p.reason || tally}`;
    default:
      return Object.entries(p).filter(([, v]) => v === null || typeof v !== "object")
        .map(([k, v]) => `${k.replace(/_/g, " ")} ${v}`).join(", ").slice(0, 160);
  }
}

// The knowledge.stats answer as labels and percentages.
function knowledgeText(k) {
  const parts = [`strategy ${k.strategy}`, `${k.patterns} patterns learned`,
    `${k.outcomes} outcomes`, `${k.playbook_runs} playbook runs, ${k.successes} fixed`];
  if (typeof k.success_rate === "number") parts.push(`success ${pct(k.success_rate)}`);
  if (typeof k.success_rate_7d === "number") parts.push(`last 7 days ${pct(k.success_rate_7d)}`);
  if (typeof k.consulted_share === "number") {
    parts.push(`memory consulted for ${pct(k.consulted_share)} of missions`);
  }
  return parts.join(" · ");
}

// How the key shown came to be trusted.
const KEY_HOW = {
  pinned: "pinned: this browser trusted it before and keeps it",
  given: "given: passed in the URL by gracectl web, from gracectl's own trust",
  "first-use": "first use: taken from the daemon itself, nothing to check it against",
};

// A new URL from another run of gracectl web, opened in this tab, only changes the
// fragment: start again with its token.
window.addEventListener("hashchange", () => location.reload());
setInterval(() => { if (!state.frozen) schedule(); }, 1000);
start();
render();
