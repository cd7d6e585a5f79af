// DOM helpers, number formatting, line charts (uPlot) and sparklines (inline SVG).

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "style" && typeof v === "object") Object.assign(el.style, v);
    else if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, v);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

export function clear(el, ...children) { el.replaceChildren(); append(el, children); return el; }

export function fmt(v, digits = 4) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v) && Math.abs(v) < 1e7) return String(v);
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(2);
  return Number(v.toPrecision(digits)).toString();
}

export function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function duration(s) {
  if (s === null || s === undefined) return "–";
  s = Math.round(s);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}

export function when(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return d.toLocaleString();
}

// A run id shortened for legends: its session's first characters and the model's part.
export function shortRun(id) {
  const m = /^(s-[0-9a-f]{6})[0-9a-f]*(:.*)$/.exec(id);
  return m ? `${m[1]}…${m[2]}` : id;
}

export function statusBadge(status) { return h("span", { class: `status ${status}` }, status); }

export function progressBar(frac) {
  const pct = Math.max(0, Math.min(1, frac || 0)) * 100;
  return h("span", { class: "bar", title: `${pct.toFixed(1)}%` },
    h("span", { style: { width: `${pct}%` } }));
}

export function banner(kind, text) { return h("div", { class: `banner ${kind}` }, text); }

export function table(columns, rows, { onRow, empty = "nothing yet" } = {}) {
  const head = h("tr", {}, columns.map((c) => h("th", { class: c.num ? "num" : null }, c.label)));
  const body = rows.map((r) => h("tr", {
    class: onRow ? "clickable" : null,
    onclick: onRow ? (ev) => { if (!ev.target.closest("button,input,a")) onRow(r); } : null,
  }, columns.map((c) => h("td", { class: c.num ? "num" : null },
    c.render ? c.render(r) : fmt(r[c.key])))));
  if (!rows.length) {
    body.push(h("tr", {}, h("td", { colspan: columns.length, class: "muted" }, empty)));
  }
  return h("table", {}, h("thead", {}, head), h("tbody", {}, body));
}

// A checkbox column that keeps a selection across refreshes and enables `button` when any
// row is picked.
export function pickColumn(selected, button) {
  return { label: "", render: (r) => h("input", { type: "checkbox", class: "pick",
    checked: selected.has(r.id), onchange: (ev) => {
      if (ev.target.checked) selected.add(r.id); else selected.delete(r.id);
      button.disabled = selected.size < 1;
    } }) };
}

// Call `load` now and every `ms` after it finishes, until the returned stop function runs.
export function poll(load, ms) {
  let alive = true, timer = null;
  (async function tick() {
    await load(() => alive);
    if (alive) timer = setTimeout(tick, ms);
  })();
  return () => { alive = false; clearTimeout(timer); };
}

// Debiased exponential moving average (as W&B and TensorBoard smooth), skipping nulls.
export function ema(values, alpha) {
  const out = [];
  let acc = 0, weight = 0;
  for (const v of values) {
    if (v === null || v === undefined || Number.isNaN(v)) { out.push(null); continue; }
    acc = alpha * acc + (1 - alpha) * v;
    weight = alpha * weight + (1 - alpha);
    out.push(acc / weight);
  }
  return out;
}

// x-axis tick spacings: steps and seconds are whole numbers.
const INTEGER_STEPS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000,
  50000, 100000, 200000, 500000, 1000000];
const COLORS = ["#2f6fdf", "#e0542e", "#2e9d5b", "#9b4fd0", "#c99a06", "#1aa3b8", "#d6456f",
  "#6b7a8f"];
export const color = (i) => COLORS[i % COLORS.length];

// A line chart of several series over one x axis, with smoothing, a log scale and hover values
// (uPlot's legend shows the values under the cursor).
export class LineChart {
  constructor(parent, { title, xLabel = "step", series, smoothing = true, height = 220 }) {
    this.series = series;  // [{label, color?}]
    this.xLabel = xLabel;
    this.height = height;
    this.smooth = smoothing ? 0.6 : 0;
    this.log = false;
    this.xs = [];
    this.ys = series.map(() => []);
    const smoothBox = h("input", { type: "checkbox", checked: smoothing });
    const logBox = h("input", { type: "checkbox" });
    smoothBox.addEventListener("change", () => { this.smooth = smoothBox.checked ? 0.6 : 0;
      this.rebuild(); });
    logBox.addEventListener("change", () => { this.log = logBox.checked; this.rebuild(); });
    this.plotEl = h("div", { class: "plot" });
    this.el = h("div", { class: "chart", dataset: { title } },
      h("div", { class: "chart-head" }, h("b", {}, title),
        h("label", { class: "small" }, smoothBox, " smoothed"),
        h("label", { class: "small" }, logBox, " log")),
      this.plotEl);
    parent.append(this.el);
    this.observer = new ResizeObserver(() => this.resize());
    this.observer.observe(this.el);
    this.rebuild();
  }

  get points() { return this.xs.length; }

  set(xs, ys) { this.xs = xs; this.ys = ys; this.redraw(); }

  push(x, values) {
    this.xs.push(x);
    values.forEach((v, i) => this.ys[i].push(v ?? null));
    this.redraw();
  }

  data() {
    const cols = [this.xs];
    this.ys.forEach((ys) => {
      const raw = this.log ? ys.map((v) => (v !== null && v > 0 ? v : null)) : ys;
      cols.push(raw);
      if (this.smooth) cols.push(ema(raw, this.smooth));
    });
    return cols;
  }

  rebuild() {
    if (this.plot) { this.plot.destroy(); this.plot = null; }
    const series = [{ label: this.xLabel }];
    this.series.forEach((s, i) => {
      const c = s.color || color(i);
      series.push({ label: this.smooth ? `${s.label} (raw)` : s.label, stroke: c,
        width: this.smooth ? 1 : 1.6, alpha: this.smooth ? 0.35 : 1, spanGaps: true,
        value: (_u, v) => fmt(v) });
      if (this.smooth) {
        series.push({ label: s.label, stroke: c, width: 2, spanGaps: true,
          value: (_u, v) => fmt(v) });
      }
    });
    const width = Math.max(240, this.el.clientWidth - 18);
    const opts = {
      width, height: this.height, series,
      scales: { x: { time: false }, y: this.log ? { distr: 3 } : {} },
      axes: [{ label: this.xLabel, size: 36, incrs: INTEGER_STEPS },
        { size: 56, values: (_u, t) => t.map((v) => fmt(v, 3)) }],
      cursor: { drag: { x: true, y: false } },
      legend: { live: true },
    };
    this.plot = new uPlot(opts, this.data(), this.plotEl);
    this.redraw();
  }

  redraw() {
    if (!this.plot) return;
    this.plot.setData(this.data());
    this.el.dataset.points = String(this.xs.length);
  }

  resize() {
    if (!this.plot) return;
    const width = Math.max(240, this.el.clientWidth - 18);
    if (Math.abs(width - this.plot.width) > 4) this.plot.setSize({ width, height: this.height });
  }

  destroy() { this.observer.disconnect(); if (this.plot) this.plot.destroy(); }
}

// A tiny SVG polyline of a series (hundreds of these stay cheap).
export function sparkline(values, { width = 120, height = 26, stroke = "#2f6fdf" } = {}) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("class", "spark");
  const vs = values.filter((v) => typeof v === "number" && Number.isFinite(v));
  if (vs.length < 2) return svg;
  const lo = Math.min(...vs), hi = Math.max(...vs);
  const span = hi - lo || 1;
  const pts = vs.map((v, i) => `${(i / (vs.length - 1)) * (width - 2) + 1},` +
    `${height - 1 - ((v - lo) / span) * (height - 2)}`);
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", pts.join(" "));
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", stroke);
  line.setAttribute("stroke-width", "1.5");
  svg.append(line);
  return svg;
}

// Read a File as text.
export function readFile(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(String(r.result));
    r.onerror = () => reject(r.error);
    r.readAsText(file);
  });
}

// JSONL text -> rows, with the line number of a bad line in the error.
export function parseJsonl(text, name = "file") {
  const rows = [];
  text.split(/\r?\n/).forEach((line, i) => {
    if (!line.trim()) return;
    try { rows.push(JSON.parse(line)); } catch (e) {
      throw new Error(`${name}:${i + 1}: not valid JSON (${e.message})`);
    }
  });
  return rows;
}
