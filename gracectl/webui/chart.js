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
export function chart(points, { threshold = null, marks = [], width = 560, height = 160 } = {}) {
  const svg = node("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart",
    role: "img", "aria-label": "recent samples" });
  const pad = { l: 48, r: 8, t: 8, b: 18 };
  const good = points.filter(([t, v]) => Number.isFinite(t) && Number.isFinite(v));
  if (good.length === 0) {
    svg.appendChild(node("text", { x: width / 2, y: height / 2, class: "empty",
      "text-anchor": "middle" }, "no samples"));
    return svg;
  }
  const ts = good.map(([t]) => t).concat(marks.map((m) => m.ts).filter(Number.isFinite));
  let t0 = Math.min(...ts);
  let t1 = Math.max(...ts);
  if (t1 - t0 < 1) t1 = t0 + 1;
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
  for (const m of marks) {
    if (!Number.isFinite(m.ts)) continue;
    svg.appendChild(node("line", { x1: x(m.ts), y1: pad.t, x2: x(m.ts), y2: height - pad.b,
      class: `mark ${m.cls}` }));
    svg.appendChild(node("text", { x: x(m.ts) + 3, y: pad.t + 10, class: `tick ${m.cls}` },
      m.label));
  }
  const d = good.map(([t, v], i) => `${i ? "L" : "M"}${x(t).toFixed(1)},${y(v).toFixed(1)}`);
  svg.appendChild(node("path", { d: d.join(""), class: "line" }));
  return svg;
}
