// The detector's recent samples as an SVG line, with the threshold and the mission's
// opening and closing marked. Drawn here: no chart library.

const NS = "http://www.w3.org/2000/svg";

function node(tag, attrs, text) {
  const n = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, String(v));
  if (text !== undefined) n.textContent = text;
  return n;
}

// points: [[ts, value], ...]; marks: [{ts, label, cls}]; threshold: number or null.
// window: [t0, t1] the time span drawn (either null: from the points and marks).
export function chart(points, { threshold = null, marks = [], window = [null, null],
  width = 560, height = 160 } = {}) {
  const svg = node("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart",
    role: "img", "aria-label": "recent samples" });
  const pad = { l: 48, r: 8, t: 8, b: 30 };
  const good = points.filter(([t, v]) => Number.isFinite(t) && Number.isFinite(v));
  if (good.length === 0) {
    svg.appendChild(node("text", { x: width / 2, y: height / 2, class: "empty",
      "text-anchor": "middle" }, "no samples"));
    return svg;
  }
  const ts = good.map(([t]) => t).concat(marks.map((m) => m.ts).filter(Number.isFinite));
  let t0 = Number.isFinite(window[0]) ? window[0] : Math.min(...ts);
  let t1 = Number.isFinite(window[1]) ? window[1] : Math.max(...ts);
  if (t1 - t0 < 1) t1 = t0 + 1;
  svg.dataset.t0 = String(t0);
  svg.dataset.t1 = String(t1);
  const vs = good.map(([, v]) => v).concat(threshold === null ? [] : [threshold]);
  let v0 = Math.min(0, ...vs);
  let v1 = Math.max(...vs);
  if (v1 - v0 < 1e-9) v1 = v0 + 1;
  v1 += (v1 - v0) * 0.05;
  const x = (t) => pad.l + ((t - t0) / (t1 - t0)) * (width - pad.l - pad.r);
  const y = (v) => height - pad.b - ((v - v0) / (v1 - v0)) * (height - pad.t - pad.b);
  svg.appendChild(node("line", { x1: pad.l, y1: y(v0), x2: width - pad.r, y2: y(v0),
    class: "axis" }));
  for (const v of [v0, (v0 + v1) / 2, v1]) {
    svg.appendChild(node("text", { x: pad.l - 4, y: y(v) + 4, "text-anchor": "end",
      class: "tick" }, Number(v.toPrecision(3)).toString()));
  }
  if (threshold !== null) {
    svg.appendChild(node("line", { x1: pad.l, y1: y(threshold), x2: width - pad.r,
      y2: y(threshold), class: "threshold" }));
    svg.appendChild(node("text", { x: width - pad.r, y: y(threshold) - 3, "text-anchor": "end",
      class: "tick" }, `threshold ${threshold}`));
  }
  // The time axis: its ends and middle, as the daemon's UTC clock reads.
  const hms = (t) => new Date(t * 1000).toISOString().slice(11, 19);
  for (const [t, anchor] of [[t0, "start"], [(t0 + t1) / 2, "middle"], [t1, "end"]]) {
    svg.appendChild(node("text", { x: x(t), y: height - 6, "text-anchor": anchor,
      class: "tick time" }, hms(t)));
  }
  // Marker labels step down a line when one would overlap the previous one.
  let lastX = -Infinity;
  let row = 0;
  for (const m of marks.slice().sort((a, b) => a.ts - b.ts)) {
    if (!Number.isFinite(m.ts)) continue;
    const mx = x(m.ts);
    row = mx - lastX < 6 * (m.label.length + 2) ? row + 1 : 0;
    lastX = mx;
    svg.appendChild(node("line", { x1: mx, y1: pad.t, x2: mx, y2: height - pad.b,
      class: `mark ${m.cls}` }));
    svg.appendChild(node("text", { x: mx + 3, y: pad.t + 10 + 12 * row, class: `tick ${m.cls}` },
      m.label));
  }
  const d = good.map(([t, v], i) => `${i ? "L" : "M"}${x(t).toFixed(1)},${y(v).toFixed(1)}`);
  svg.appendChild(node("path", { d: d.join(""), class: "line" }));
  return svg;
}
