// The parts of a model's card that explain: the rollout and its evidence, its timeline, and lineage.

import { el, fmt, confirmThen } from "./dom.js";
import { api } from "./api.js";

const PHASE_CLASS = { progressing: "warn", paused: "warn", promoted: "ok", rolled_back: "bad" };
const ACTIONS = {
  pause: { label: "Pause", when: ["progressing"], say: (m) => `Pause the rollout of ${m}? The canary keeps its weight and no step is taken until it is resumed.` },
  resume: { label: "Resume", when: ["paused"], say: (m) => `Resume the rollout of ${m}?` },
  promote: { label: "Promote", when: ["progressing", "paused"], say: (m, r) => `Promote ${r.canary} of ${m} to 100% now, without waiting for the evidence?` },
  rollback: { label: "Roll back", when: ["progressing", "paused"], danger: true, say: (m, r) => `Roll back ${r.canary} of ${m}? Its weight goes to 0 and this rollout ends.` },
};

export function renderRollout(box, model, rollout, canAct) {
  if (!rollout) {
    box.replaceChildren(el("p", { class: "muted", text: "No rollout for this model in the routes file." }));
    return;
  }
  const record = rollout.record;
  const head = el("div", { class: "rollout" });
  if (!record) {
    head.append(el("span", { class: "phase", "data-field": "phase", "data-value": "not_started", text: "not started" }),
      el("span", { text: `canary ${rollout.canary} against baseline ${rollout.baseline}, steps ${rollout.steps.join(", ")}%` }));
    box.replaceChildren(head, rollout.record_error ? el("p", { class: "event-bad", text: `The stored record is unreadable: ${rollout.record_error}` }) : "");
    return;
  }
  const { phase, step, weight } = record.state;
  head.append(
    el("span", { class: `phase pill ${PHASE_CLASS[phase] || ""}`, "data-field": "phase", "data-value": phase, text: phase.replace("_", " ") }),
    el("span", { "data-field": "step", "data-value": step, text: `step ${step + 1} of ${rollout.steps.length} (${rollout.steps.join(" → ")}%)` }),
    el("span", { "data-field": "canary_weight", "data-value": weight, text: `canary ${rollout.canary} at ${weight}%` }),
    el("span", { class: "muted", text: `baseline ${rollout.baseline}${rollout.differs_from_file ? " · the live weight differs from the file's split" : ""}` }));
  // An operator's action is the latest word when it came after the engine's last decision.
  const last = record.history[record.history.length - 1];
  const reason = last && last.by !== "controller" && !last.evidence
    ? `${last.action.replace("_", " ")} by ${last.by} at ${fmt.time(last.time)} (an operator's action; the last evidence was: ${record.evidence?.reason || "none yet"})`
    : record.evidence?.reason;
  const parts = [head, el("p", { class: "reason", "data-field": "reason", text: reason || "No decision yet: gathering evidence." })];
  const waiting = record.evidence?.waiting;
  if (Array.isArray(waiting) && waiting.length) parts.push(el("p", { class: "muted", text: `Waiting for: ${waiting.join("; ")}` }));
  const counts = record.evidence?.counts;
  if (counts) {
    const one = (name, c) => `${name} ${c.requests} requests, ${c.failures} failed`;
    parts.push(el("p", { class: "muted", text: `This step so far: ${one("baseline", counts.baseline)}; ${one("canary", counts.canary)}.` }));
  }
  if (canAct) {
    const buttons = Object.entries(ACTIONS).filter(([, a]) => a.when.includes(phase)).map(([action, a]) =>
      el("button", { class: a.danger ? "danger" : "act", "data-action": action, text: a.label, onclick: () =>
        confirmThen(a.say(model, rollout), async () => {
          await api("POST", `/api/rollouts/${encodeURIComponent(model)}/${action}`);
          return `${a.label}: accepted for ${model}; the controller applies it within a second`;
        }) }));
    if (buttons.length) parts.push(el("div", { class: "actions" }, ...buttons));
  }
  box.replaceChildren(...parts);
}

export function renderTimeline(list, rollout) {
  const history = rollout?.record?.history || [];
  list.replaceChildren(...[...history].reverse().map((h) => el("li", { "data-action": h.action },
    el("span", { class: "muted", text: `${fmt.time(h.time)} ` }),
    el("strong", { text: h.action.replace("_", " ") }),
    ` → canary at ${h.weight}%, by ${h.by}${h.evidence?.reason ? `: ${h.evidence.reason}` : ""}`)));
  if (!history.length) list.replaceChildren(el("li", { class: "muted", text: "No decisions yet." }));
}

export function renderLineage(box, model, route, registry) {
  if (!route) { box.replaceChildren(); return; }
  box.replaceChildren(...Object.entries(route.versions).map(([version, v]) => {
    const rows = [["backend", v.backend], ["Triton target", v.target]];
    for (const [k, value] of Object.entries(v.metadata || {})) rows.push([k, typeof value === "object" ? JSON.stringify(value) : String(value)]);
    const reg = registry?.versions?.[version]?.summary;
    if (registry?.error) rows.push(["registry", registry.error]);
    else if (reg && reg.registered) {
      rows.push(["archive", reg.digest], ["registered", `${fmt.time(reg.registered_at)} by ${reg.registered_by}`]);
      if (reg.first_served) rows.push(["first served", fmt.time(reg.first_served)]);
      if (reg.rollouts.length) rows.push(["rollouts", reg.rollouts.map((r) => r.outcome || r.phase || r.action || "").join(", ")]);
    } else if (reg) rows.push(["registry", "not registered (no archive)"]);
    return el("div", { "data-version": version }, el("strong", { text: version }),
      el("dl", { class: "meta" }, ...rows.flatMap(([k, value]) => [el("dt", { text: k }), el("dd", { text: value })])));
  }));
}

const diff = (x) => (x == null ? "–" : typeof x === "string" ? "> 1e4" : x === 0 ? "0" : x.toPrecision(2));

export function renderShadow(box, route, pairs) {
  if (!route?.mirror && !pairs.length) {
    box.replaceChildren(el("p", { class: "muted", text: "No mirror for this model." }));
    return;
  }
  if (!pairs.length) {
    box.replaceChildren(el("p", { class: "muted", text: `Mirroring ${route.mirror.percent}% to ${route.mirror.to}; no answers compared yet.` }));
    return;
  }
  const head = el("tr", {}, ...["primary → shadow", "compared", "equal (within tolerance)", "same argmax",
    "largest |difference| p50", "p95", "p99", "latency difference (shadow − primary) mean", "p95", "not compared"]
    .map((h, i) => el("th", { class: i > 0 && i < 9 ? "num" : null, text: h })));
  const cell = (field, value, text) => el("td", { class: "num", "data-field": field, "data-value": value == null ? "" : String(value), text });
  const rows = pairs.map((p) => {
    const skipped = Object.entries(p.not_compared).filter(([, n]) => n).map(([r, n]) => `${r} ${n}`).join(", ");
    return el("tr", { "data-pair": `${p.primary}>${p.shadow}` }, el("td", { text: `${p.primary} → ${p.shadow}` }),
      cell("compared", p.compared, String(p.compared)),
      cell("equal_share", p.equal_share, fmt.pct(p.equal_share)),
      cell("same_argmax_share", p.same_argmax_share, p.argmax_compared ? fmt.pct(p.same_argmax_share) : "no class output"),
      ...["p50", "p95", "p99"].map((q) => cell(`diff_${q}`, p.max_abs_diff[q], diff(p.max_abs_diff[q]))),
      cell("latency_mean", p.latency_diff_ms.mean, fmt.ms(p.latency_diff_ms.mean)),
      cell("latency_p95", p.latency_diff_ms.p95, typeof p.latency_diff_ms.p95 === "string" ? "> 10 s" : fmt.ms(p.latency_diff_ms.p95)),
      el("td", { text: skipped || "none" }));
  });
  box.replaceChildren(el("table", { class: "shadow-table" }, el("thead", {}, head), el("tbody", {}, ...rows)),
    el("p", { class: "muted", text: "Shadow copies are never returned to callers, never charged to keys or limits, and never rollout evidence." }));
}
