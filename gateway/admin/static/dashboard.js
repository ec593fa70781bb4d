// The operator's dashboard: polls the admin API every second and draws what it says.
// Plain DOM and canvas; every value is written with textContent, never as HTML, so nothing a routes
// file or a key name holds can run as script. The token lives in this tab's sessionStorage only and
// goes out as a bearer header (no cookie, so no cross-site request can act with it).

import { drawChart, COLORS } from "./charts.js";
import { api, setToken, getToken } from "./api.js";
import { el, fmt, confirmThen } from "./dom.js";
import { renderRollout, renderTimeline, renderLineage, renderShadow } from "./sections.js";

const POLL_MS = 1000;
const HISTORY_SECONDS = 300; // what the admin API keeps for charts (/api/history)
const REGISTRY_EVERY_S = 10;
const CHOICES = ["split", "sticky", "pinned", "shadow"];

const state = {
  role: null,
  canAct: false,
  choices: new Map(), // "model/version" -> [{t, counts: {split, ...}}] for rates by how a version was chosen
  registry: new Map(), // model -> {at, data}
  cards: new Map(), // model -> elements
  timer: null,
};

const $ = (id) => document.getElementById(id);

// -- signing in ---------------------------------------------------------------------------------

function showLogin(message) {
  clearTimeout(state.timer);
  $("app").hidden = true;
  $("login").hidden = false;
  for (const id of ["who", "store", "reload", "signout"]) $(id).hidden = true;
  const error = $("login-error");
  error.hidden = !message;
  error.textContent = message || "";
}

async function signIn(token) {
  setToken(token);
  let me;
  try {
    me = await api("GET", "/api/whoami", undefined, { quiet401: true });
  } catch (error) {
    setToken(null);
    if (error.status === 401) {
      showLogin("The gateway refused this token (401): it is not one of its admin tokens. Check for a "
        + "typo, or use the token make run printed (GATEWAY_ADMIN_TOKEN or the admin-token file).");
    } else {
      showLogin(`Could not check the token: ${error.message}`);
    }
    return;
  }
  state.role = me.role;
  state.canAct = me.can_act;
  $("who").textContent = `${me.name} · ${me.role}`;
  $("who").hidden = false;
  $("signout").hidden = false;
  $("reload").hidden = !state.canAct;
  $("login").hidden = true;
  $("app").hidden = false;
  poll();
}

// -- polling ------------------------------------------------------------------------------------

export async function poll() {
  clearTimeout(state.timer);
  try {
    const [status, versions, routes, rollouts, store, audit, reloads, shadow, history] = await Promise.all([
      api("GET", "/api/status"),
      api("GET", "/api/versions"),
      api("GET", "/api/routes"),
      api("GET", "/api/rollouts").catch((e) => ({ error: e.message, rollouts: {} })),
      api("GET", "/api/store"),
      api("GET", "/api/audit?limit=60"),
      api("GET", "/api/reloads"),
      api("GET", "/api/shadow"),
      api("GET", "/api/history"),
    ]);
    const now = Date.now() / 1000;
    remember(now, status, versions);
    render(now, { status, versions, routes, rollouts, store, audit, reloads, shadow, history });
    $("banner").hidden = !rollouts.error;
    $("banner").textContent = rollouts.error ? `Rollout state unavailable: ${rollouts.error}` : "";
    $("updated").textContent = `updated ${fmt.time(now)}`;
  } catch (error) {
    if (error.status === 401) return; // api() has shown the sign-in form
    $("banner").hidden = false;
    $("banner").textContent = `The admin API did not answer: ${error.message}`;
  }
  state.timer = setTimeout(poll, POLL_MS);
}

function remember(now, status, versions) {
  for (const [model, entry] of Object.entries(status.models)) {
    for (const [version, v] of Object.entries(entry.versions)) {
      const key = `${model}/${version}`;
      const total = versions.models[model]?.[version]?.total;
      if (!total) continue;
      const counts = Object.fromEntries(CHOICES.map((c) => [c, total.by_choice[c].requests]));
      const seen = state.choices.get(key) || [];
      seen.push({ t: now, counts });
      while (seen.length > 1 && now - seen[0].t > 10.5) seen.shift();
      state.choices.set(key, seen);
    }
  }
}

function choiceRates(key) {
  const seen = state.choices.get(key) || [];
  if (seen.length < 2) return null;
  const first = seen[0], last = seen[seen.length - 1], dt = last.t - first.t;
  return Object.fromEntries(CHOICES.map((c) => [c, dt > 0 ? (last.counts[c] - first.counts[c]) / dt : 0]));
}

// -- drawing ------------------------------------------------------------------------------------

function render(now, data) {
  const { status, routes, store } = data;
  $("revision").textContent = status.revision
    ? `revision ${status.revision.slice(0, 12)}${status.in_sync ? "" : " (workers not in sync)"}`
    : "routes file does not validate";
  renderStore(store);
  const names = Object.keys(status.models).sort();
  for (const name of names) renderModel(now, name, data);
  for (const [name, card] of state.cards) if (!names.includes(name)) { card.root.remove(); state.cards.delete(name); }
  renderEvents(data.audit.entries, data.reloads.events);
  renderWorkers(status, store, routes);
}

function renderStore(store) {
  const live = Object.values(store).filter((w) => w.alive);
  const down = live.filter((w) => !w.store_up);
  const open = live.some((w) => w.fail_open > 0 && !w.store_up);
  const pill = $("store");
  pill.hidden = live.length === 0;
  const url = live[0]?.store_url || "";
  pill.textContent = down.length ? `store DOWN (${down.length}/${live.length} workers)${open ? ", failing open" : ""}`
    : `store up · ${url}`;
  pill.className = `pill ${down.length ? "bad" : "ok"}`;
  pill.dataset.field = "store";
  pill.dataset.value = down.length ? "down" : "up";
}

function card(name) {
  let c = state.cards.get(name);
  if (c) return c;
  const canvases = ["rps", "errors", "latency"].map((k) => el("canvas", { class: "chart", width: 360, height: 160, "data-chart": k, style: { width: "360px", height: "160px" } }));
  c = {
    root: el("section", { class: "model", "data-model": name }),
    title: el("h2", { text: name }),
    sub: el("p", { class: "muted" }),
    rollout: el("div", { class: "rollout-box" }),
    rows: el("tbody"),
    canvases,
    legend: el("div", { class: "legend" }),
    timeline: el("ol", { class: "timeline" }),
    lineage: el("div", { class: "lineage" }),
    shadow: el("div", { class: "shadow" }),
    override: el("div", { class: "override" }),
    versionsKey: "",
  };
  const head = el("tr", {}, ...["version", "weight in file", "weight live", "requests/s", "error rate", "p50", "p95", "p99",
    "split/s", "sticky/s", "pinned/s", "shadow/s", "requests (total)", "ready"].map((h, i) => el("th", { class: i > 0 && i < 13 ? "num" : null, text: h })));
  c.root.append(c.title, c.sub, c.rollout,
    el("h3", { text: "Versions (last minute)" }), el("table", { class: "versions" }, el("thead", {}, head), c.rows),
    el("h3", { text: "Last five minutes" }), el("div", { class: "charts" }, ...canvases), c.legend,
    el("h3", { text: "Shadow comparison: mirrored answers against the primary's (since start)" }), c.shadow,
    el("h3", { text: "Rollout timeline" }), c.timeline,
    el("h3", { text: "Versions: metadata and lineage" }), c.lineage, c.override);
  $("models").append(c.root);
  state.cards.set(name, c);
  return c;
}

function cell(field, value, text, num = true) {
  return el("td", { class: num ? "num" : null, "data-field": field, "data-value": value == null ? "" : String(value), text });
}

function renderModel(now, name, data) {
  const c = card(name);
  const entry = data.status.models[name];
  const route = data.routes.models[name];
  const rollout = data.rollouts.rollouts[name];
  const parts = [];
  if (route?.sticky_header) parts.push(`sticky on ${route.sticky_header}`);
  if (route?.mirror) parts.push(`mirror ${route.mirror.percent}% to ${route.mirror.to}`);
  if (entry.override?.active) parts.push(`weight override by ${entry.override.set_by}${entry.override.reason ? `: ${entry.override.reason}` : ""}`);
  if (!entry.live_split_agrees) parts.push("workers route differently");
  c.sub.textContent = parts.join(" · ");
  const versions = Object.keys(entry.versions);
  c.rows.replaceChildren(...versions.map((version, i) => {
    const v = entry.versions[version];
    const rates = choiceRates(`${name}/${version}`);
    const total = data.versions.models[name]?.[version]?.total;
    const role = rollout ? (version === rollout.canary ? " (canary)" : version === rollout.baseline ? " (baseline)" : "") : "";
    const swatch = el("span", { style: { color: COLORS[i % COLORS.length] }, text: "■ " });
    return el("tr", { "data-version": version },
      el("td", {}, swatch, `${version}${role}`),
      cell("weight_in_file", v.weight_in_file, fmt.weight(v.weight_in_file)),
      cell("weight_live", v.weight_live, v.weight_live == null && !entry.live_split_agrees ? "workers differ" : fmt.weight(v.weight_live)),
      cell("rps", v.rps, fmt.rps(v.rps)),
      cell("error_rate", v.error_rate, fmt.pct(v.error_rate)),
      ...["p50", "p95", "p99"].map((q) => cell(q, v.latency_ms[q], fmt.ms(v.latency_ms[q]))),
      ...CHOICES.map((k) => cell(`${k}_rps`, rates?.[k], fmt.rps(rates?.[k]))),
      cell("requests_total", total?.requests, total ? String(total.requests) : "–"),
      cell("ready", v.ready, v.ready == null ? "not checked" : v.ready ? "ready" : `no: ${v.not_ready_reason}`, false));
  }));
  renderCharts(now, c, versions, data.history.models[name] || {}, data.history.window_seconds);
  renderRollout(c.rollout, name, rollout, state.canAct);
  renderTimeline(c.timeline, rollout);
  renderShadow(c.shadow, route, data.shadow.pairs.filter((p) => p.model === name));
  renderLineage(c.lineage, name, route, state.registry.get(name)?.data);
  if (!state.registry.has(name) || now - state.registry.get(name).at > REGISTRY_EVERY_S) {
    state.registry.set(name, { at: now, data: state.registry.get(name)?.data });
    api("GET", `/api/versions/${encodeURIComponent(name)}`).then(
      (answer) => state.registry.set(name, { at: now, data: answer }),
      (error) => state.registry.set(name, { at: now, data: { error: error.message } }));
  }
  renderOverride(c, name, versions, entry);
}

function renderCharts(now, c, versions, history, windowSeconds) {
  const series = (field, extra = {}) => versions.map((version, i) => ({
    label: version, color: COLORS[i % COLORS.length], ...extra,
    points: (history[version] || []).map((p) => [p.t, p[field]]),
  }));
  const options = { windowSeconds: HISTORY_SECONDS, now };
  drawChart(c.canvases[0], "requests/s", series("rps"), { ...options, format: (x) => String(+x.toFixed(1)) });
  drawChart(c.canvases[1], "error rate", series("error_rate"), { ...options, format: (x) => `${+(x * 100).toFixed(2)}%` });
  drawChart(c.canvases[2], "latency p50 · p95 (dashed) · p99 (dotted), ms",
    [...series("p50"), ...series("p95", { dash: [6, 3] }), ...series("p99", { dash: [2, 3] })],
    { ...options, format: (x) => String(+x.toFixed(1)) });
  c.legend.replaceChildren(...versions.map((v, i) => el("span", { style: { color: COLORS[i % COLORS.length] }, text: `■ ${v}` })),
    el("span", { class: "muted", text: `each point covers ${windowSeconds} s` }));
}

function renderOverride(c, name, versions, entry) {
  const live = versions.map((v) => entry.versions[v].weight_live).join(",");
  const key = `${state.canAct}|${versions.join(",")}|${live}|${entry.override?.active ? "on" : "off"}`;
  if (c.versionsKey === key || c.override.contains(document.activeElement)) return; // keep what is being typed
  c.versionsKey = key;
  if (!state.canAct) { c.override.replaceChildren(); return; }
  const inputs = versions.map((version) => el("input", { type: "number", min: 0, max: 100, step: 1, "data-version": version,
    value: entry.versions[version].weight_live ?? entry.versions[version].weight_in_file ?? 0, "aria-label": `weight of ${version}` }));
  const reason = el("input", { type: "text", placeholder: "reason (for the audit log)", "aria-label": "reason" });
  const apply = el("button", { class: "act", text: "Override weights", onclick: () => {
    const weights = Object.fromEntries(inputs.map((i) => [i.dataset.version, Number(i.value)]));
    const said = Object.entries(weights).map(([v, w]) => `${v} ${w}%`).join(", ");
    confirmThen(`Override the weights of ${name} to ${said}? This replaces the file's split until cleared.`, async () => {
      await api("PUT", `/api/models/${encodeURIComponent(name)}/weights`, { weights, reason: reason.value });
      return `${name}: weights set to ${said}`;
    });
  } });
  const clear = entry.override ? el("button", { text: "Clear override", onclick: () =>
    confirmThen(`Clear the weight override of ${name} and go back to the file's split?`, async () => {
      await api("DELETE", `/api/models/${encodeURIComponent(name)}/weights`);
      return `${name}: weight override cleared`;
    }) }) : null;
  c.override.replaceChildren(el("h3", { text: "Weight override" }), el("div", { class: "actions" },
    ...versions.flatMap((v, i) => [el("label", { text: v }), inputs[i]]), reason, apply, clear));
}

function describe(entry) {
  const { time, who, action, ...details } = entry;
  const rest = Object.entries(details).map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" ");
  return `${who}: ${action}${rest ? ` (${rest})` : ""}`;
}

function renderEvents(audit, reloads) {
  const events = [
    ...audit.map((e) => ({ t: e.time, text: describe(e), bad: /rollback|revoke|refus/.test(e.action), kind: "audit" })),
    ...reloads.map((e) => ({ t: e.time, kind: "reload", bad: !e.ok,
      text: e.ok ? `worker ${e.pid} loaded revision ${(e.revision || "").slice(0, 12)} (${e.trigger}, ${e.duration_ms.toFixed(1)} ms)`
        : `worker ${e.pid} refused the routes file, the last good table keeps serving: ${e.errors.join("; ")}` })),
  ].sort((a, b) => b.t - a.t).slice(0, 60);
  $("events").replaceChildren(...events.map((e) =>
    el("li", { class: e.bad ? "event-bad" : null, "data-kind": e.kind }, el("span", { class: "muted", text: `${fmt.time(e.t)} ` }), e.text)));
}

function renderWorkers(status, store, routes) {
  const rows = Object.entries(status.worker_revisions).map(([pid, revision]) => {
    const s = store[pid] || {};
    return el("tr", { "data-worker": pid }, el("td", { text: pid }),
      el("td", { text: `${(revision || "none").slice(0, 12)}${revision === routes.revision ? "" : " (not the file's)"}` }),
      el("td", { class: s.store_up ? null : "event-bad", text: s.store_up ? "up" : "DOWN" }),
      el("td", { class: "num", text: String(s.fail_open ?? 0) }), el("td", { class: "num", text: String(s.fail_closed ?? 0) }));
  });
  document.querySelector("#workers tbody").replaceChildren(...rows);
  const restarts = status.worker_restarts;
  $("restarts").textContent = `${status.workers.alive} worker(s) alive; ${restarts.total} restart(s) since start`
    + (status.reload_failing.length ? `; reload failing on ${status.reload_failing.join(", ")}` : "");
}

// -- start --------------------------------------------------------------------------------------

window.addEventListener("gateway-token-refused", (event) => showLogin(event.detail));
window.addEventListener("gateway-acted", () => poll());
$("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  signIn($("token").value.trim());
});
$("signout").addEventListener("click", () => { setToken(null); showLogin(""); });
$("reload").addEventListener("click", () => confirmThen("Make every worker reload the routes file now?", async () => {
  const answer = await api("POST", "/api/reload");
  return `reloaded: ${Object.keys(answer.workers).length} worker(s) loaded the file`;
}));

// `make run` prints the dashboard's URL with #token=...: a fragment never reaches a server or its logs.
// Take it into sessionStorage and out of the address bar (and of the history entry).
const fragment = new URLSearchParams(location.hash.slice(1)).get("token");
if (fragment) history.replaceState(null, "", location.pathname + location.search);
const saved = fragment || getToken();
if (saved) signIn(saved); else showLogin("");
