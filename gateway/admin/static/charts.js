// Line charts on a canvas, no library: a few series over the last minutes, y from 0 to a round maximum.

export const COLORS = ["#2b6cb0", "#dd6b20", "#38a169", "#805ad5", "#d53f8c", "#319795"];

function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5, 10]) if (step * power >= value) return step * power;
  return 10 * power;
}

// series: [{label, color, dash, points: [[unixSeconds, value|null], ...]}]
export function drawChart(canvas, title, series, { windowSeconds = 300, format = String, now } = {}) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 360, height = canvas.clientHeight || 160;
  if (canvas.width !== width * ratio) { canvas.width = width * ratio; canvas.height = height * ratio; }
  const g = canvas.getContext("2d");
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.clearRect(0, 0, width, height);
  const left = 52, right = 8, top = 20, bottom = 18;
  const plotW = width - left - right, plotH = height - top - bottom;
  const end = now ?? Date.now() / 1000, start = end - windowSeconds;
  let max = 0;
  for (const s of series) for (const [t, v] of s.points) if (t >= start && v != null) max = Math.max(max, v);
  max = niceMax(max);
  g.font = "11px system-ui, sans-serif";
  g.fillStyle = "#1a202c";
  g.fillText(title, left, 12);
  g.strokeStyle = "#e2e8f0";
  g.fillStyle = "#718096";
  g.lineWidth = 1;
  for (let i = 0; i <= 5; i++) { // five divisions of 1, 2, 5 or 10 times a power of ten: round labels
    const y = top + plotH - (plotH * i) / 5;
    g.beginPath(); g.moveTo(left, y); g.lineTo(left + plotW, y); g.stroke();
    g.fillText(format((max * i) / 5), 2, y + 4);
  }
  const minutes = windowSeconds / 60;
  for (let m = 0; m <= minutes; m++) {
    const x = left + (plotW * (minutes - m)) / minutes;
    g.fillText(m === 0 ? "now" : `-${m}m`, Math.min(x - 8, width - 24), height - 4);
  }
  for (const s of series) {
    g.strokeStyle = s.color;
    g.lineWidth = 1.8;
    g.setLineDash(s.dash || []);
    g.beginPath();
    let drawing = false;
    for (const [t, v] of s.points) {
      if (t < start || v == null) { drawing = false; continue; }
      const x = left + ((t - start) / windowSeconds) * plotW;
      const y = top + plotH - (v / max) * plotH;
      if (drawing) g.lineTo(x, y); else g.moveTo(x, y);
      drawing = true;
    }
    g.stroke();
  }
  g.setLineDash([]);
}
