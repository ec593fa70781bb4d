// Small DOM helpers shared by the dashboard's modules: elements, number formats, toasts, confirmations.

import { ApiError } from "./api.js";

const $ = (id) => document.getElementById(id);

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value == null) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    // Through the CSSOM: the page's Content Security Policy refuses style attributes.
    else if (key === "style") Object.assign(node.style, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

export const fmt = {
  pct: (x) => (x == null ? "–" : `${(x * 100).toFixed(2)}%`),
  ms: (x) => (x == null ? "–" : `${x.toFixed(1)} ms`),
  rps: (x) => (x == null ? "–" : `${x.toFixed(1)}/s`),
  weight: (x) => (x == null ? "–" : `${x}%`),
  time: (t) => new Date(t * 1000).toLocaleTimeString([], { hour12: false }),
};

export function toast(message, bad = false) {
  const box = $("toast");
  box.textContent = message;
  box.className = bad ? "bad" : "";
  box.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (box.hidden = true), 6000);
}

export function confirmThen(text, action) {
  const modal = $("confirm");
  $("confirm-text").textContent = text;
  modal.hidden = false;
  const close = () => { modal.hidden = true; ok.onclick = cancel.onclick = null; };
  const ok = $("confirm-ok"), cancel = $("confirm-cancel");
  cancel.onclick = close;
  ok.onclick = async () => {
    close();
    try {
      const answer = await action();
      toast(answer);
    } catch (error) {
      toast(error instanceof ApiError ? error.message : String(error), true);
    }
    window.dispatchEvent(new Event("gateway-acted"));
  };
}

