// System: CPU, memory, GPUs, engine busy share, engine workers, queues, adapters and base models
// — live, from
// the server's own metrics (/api/system), polled while the page is open and visible.

import { get } from "../api.js";
import { h, clear, fmt, bytes, table, banner, LineChart } from "../ui.js";

const POLL_MS = 2000;
const KEEP = 300;  // points kept in the charts (10 minutes at one a 2 s)

export function render(main) {
  const cards = h("div", { class: "cards", id: "system-cards" });
  const grid = h("div", { class: "grid" });
  const details = h("div", { id: "system-details" });
  main.append(h("h1", {}, "System"), cards, h("h2", {}, "Over time"), grid, details);
  const load = new LineChart(grid, { title: "CPU and engine busy (%)", xLabel: "seconds",
    series: [{ label: "cpu" }, { label: "engine busy" }], smoothing: false });
  const mem = new LineChart(grid, { title: "memory (GiB)", xLabel: "seconds",
    series: [{ label: "used" }, { label: "server RSS" }], smoothing: false });
  const xs = [], cpu = [], busy = [], used = [], rss = [];
  const t0 = Date.now();
  let alive = true, timer = null;

  async function poll() {
    if (!document.hidden) {
      try {
        const s = await get("/api/system");
        if (!alive) return;
        xs.push(Math.round((Date.now() - t0) / 1000));
        cpu.push(s.cpu_percent);
        busy.push((s.engine_busy_share ?? 0) * 100);
        used.push(s.memory_used / 2 ** 30);
        rss.push(s.process_rss / 2 ** 30);
        for (const a of [xs, cpu, busy, used, rss]) if (a.length > KEEP) a.shift();
        load.set(xs.slice(), [cpu.slice(), busy.slice()]);
        mem.set(xs.slice(), [used.slice(), rss.slice()]);
        show(s);
      } catch (e) {
        if (alive) clear(cards, banner("error", e.message));
      }
    }
    if (alive) timer = setTimeout(poll, POLL_MS);
  }

  function show(s) {
    const adapters = s.adapters || {};
    clear(cards,
      card("CPU", `${fmt(s.cpu_percent, 3)}% of ${s.cpu_count} cores`),
      card("memory", `${bytes(s.memory_used)} / ${bytes(s.memory_total)}`),
      card("server RSS", bytes(s.process_rss)),
      card("engine busy", `${fmt((s.engine_busy_share ?? 0) * 100, 3)}%`, "engine-busy"),
      card("queued requests", Object.values(s.queues || {}).reduce((a, b) => a + b, 0)),
      Object.entries(adapters).filter(([k]) => !k.endsWith("_bytes"))
        .map(([k, v]) => card(k.replace(/_/g, " "), fmt(v))),
      adapters.memory_bytes !== undefined ? card("adapter memory",
        `${bytes(adapters.memory_bytes)} / ${bytes(adapters.memory_limit_bytes)}`) : null,
      (s.gpus || []).map((g) => card(`GPU ${g.index}`,
        `${fmt(g.utilization)}% · ${bytes(g.memory_used)} / ${bytes(g.memory_total)}`)));
    clear(details,
      h("h2", {}, "GPUs"),
      table([{ label: "#", key: "index" }, { label: "name", key: "name" },
        { label: "utilisation %", key: "utilization", num: true },
        { label: "memory used", render: (g) => bytes(g.memory_used), num: true },
        { label: "memory total", render: (g) => bytes(g.memory_total), num: true }],
      s.gpus || [], { empty: "No CUDA device on this server." }),
      h("h2", {}, `Base models loaded · compute dtype ${s.dtype || "?"}`),
      table([{ label: "model", key: "name" },
        { label: "weights", render: (m) => m.quantization || "full precision" },
        { label: "parameter memory", render: (m) => bytes(m.bytes), num: true }],
      s.base_models || [], { empty: "None loaded." }),
      h("h2", {}, "Engine workers"),
      h("div", { id: "system-workers" }, table([{ label: "worker", key: "name" },
        { label: "kind", render: (w) => w.kind === "data-parallel"
          ? `data-parallel: ${(w.members || []).join(" + ")} (${w.base_model})` : w.kind },
        { label: "state", render: (w) => (w.alive ? "up" : "lost") +
          (w.losses ? ` · lost ${w.losses}×` : "") },
        { label: "process", render: (w) => w.pid ? `${w.pid}${w.node ? " @ " + w.node : ""}`
          : "–" },
        { label: "training runs", key: "models_placed", num: true },
        { label: "queued", key: "queue_depth", num: true },
        { label: "busy s", render: (w) => fmt(w.busy_seconds, 3), num: true },
        { label: "passes", key: "passes", num: true },
        { label: "samples", key: "sample_requests", num: true },
        { label: "adapter memory", render: (w) => w.memory_bytes === undefined ? "–"
          : bytes(w.memory_bytes), num: true }],
      s.workers || [], { empty: "No worker." })),
      h("h2", {}, "Queues"),
      table([{ label: "queue", key: "queue" }, { label: "waiting", key: "depth", num: true }],
        Object.entries(s.queues || {}).map(([queue, depth]) => ({ queue: queue || "(control)",
          depth })), { empty: "No queue." }));
  }

  poll();
  return () => { alive = false; clearTimeout(timer); load.destroy(); mem.destroy(); };
}

function card(k, v, id) {
  return h("div", { class: "card" }, h("div", { class: "k" }, k),
    h("div", { class: "v", id: id || null }, v ?? "–"));
}
