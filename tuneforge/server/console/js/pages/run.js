// One training run: live per-step curves from the server's metric stream, and its checkpoints.

import { del, download, get, stream } from "../api.js";
import { h, clear, fmt, bytes, when, table, banner, LineChart } from "../ui.js";

export function render(main, [runId]) {
  const enc = encodeURIComponent(runId);
  const info = h("div", { class: "panel", id: "run-info" }, "loading…");
  const state = h("span", { id: "stream-state", class: "muted small" });
  const grid = h("div", { class: "grid" });
  const ckpts = h("div", { id: "checkpoints" });
  main.append(h("h1", {}, "Run ", h("code", {}, runId), " ", state), info, grid,
    h("h2", {}, "Checkpoints"), ckpts);

  const charts = {
    loss: new LineChart(grid, { title: "loss per token", series: [{ label: "loss" }] }),
    lr: new LineChart(grid, { title: "learning rate", series: [{ label: "lr" }],
      smoothing: false }),
    tokens: new LineChart(grid, { title: "tokens per step", series: [{ label: "tokens" }],
      smoothing: false }),
    time: new LineChart(grid, { title: "step time (s)", series: [{ label: "seconds" }] }),
    tps: new LineChart(grid, { title: "tokens / s", series: [{ label: "tokens/s" }] }),
  };
  let last = null;

  function onMetric(ev) {
    if (ev.event !== "metric") return;
    const m = JSON.parse(ev.data);
    last = m;
    charts.loss.push(m.step, [m.loss]);
    charts.lr.push(m.step, [m.lr]);
    charts.tokens.push(m.step, [m.tokens]);
    charts.time.push(m.step, [m.step_seconds]);
    charts.tps.push(m.step, [m.tokens_per_second]);
    showInfo();
  }

  let run = null;
  function showInfo() {
    if (!run) return;
    clear(info, h("div", { class: "cards" },
      card("base model", run.base_model), card("LoRA rank", run.lora_rank),
      card("steps", last ? last.step : run.steps, "run-steps"),
      card("loss / token", fmt(last ? last.loss : run.last_loss)),
      card("learning rate", fmt(last ? last.lr : run.last_lr, 3)),
      card("Adam β1 / β2 / eps", last ? `${fmt(last.beta1)} / ${fmt(last.beta2)} / ${fmt(last.eps, 2)}` : "–"),
      card("weight decay / clip", last ? `${fmt(last.weight_decay)} / ${fmt(last.grad_clip_norm)}` : "–"),
      card("loaded", run.loaded ? "yes" : "no"),
      run.job_id ? card("job", h("a", { href: `#/jobs/${encodeURIComponent(run.job_id)}` },
        run.job_id)) : null,
      card("created", when(run.created_at))));
  }

  async function loadRun() {
    try { run = await get(`/api/runs/${enc}`); showInfo(); } catch (e) {
      clear(info, banner("error", e.message));
    }
  }

  async function loadCheckpoints() {
    try {
      const data = await get(`/api/runs/${enc}/checkpoints`);
      clear(ckpts, table([
        { label: "checkpoint", render: (c) => h("code", {}, c.checkpoint_id) },
        { label: "type", key: "checkpoint_type" },
        { label: "size", render: (c) => bytes(c.size_bytes), num: true },
        { label: "saved", render: (c) => when(c.time) },
        { label: "", render: (c) => actions(c) },
      ], data.checkpoints, { empty: "No checkpoints saved yet." }));
    } catch (e) { clear(ckpts, banner("error", e.message)); }
  }

  let chosenFormat = "merged";
  function actions(c) {
    const [kind, name] = c.checkpoint_id.split("/");
    const base = `/api/runs/${enc}/checkpoints/${encodeURIComponent(kind)}/${encodeURIComponent(name)}`;
    const file = `${runId.replace(/[^\w.-]+/g, "_")}-${name}`;
    const msg = h("span", { class: "small muted" });
    // the formats of `tuneforge export --format` (export/formats.py); each a .tar.gz
    // the table is redrawn every few seconds: the choice is kept across redraws
    const exportFormat = h("select", { "aria-label": "export format",
      onchange: (e) => { chosenFormat = e.target.value; } },
      [["merged", "merged HF model"], ["gguf-lora", "GGUF LoRA (llama.cpp)"],
        ["gguf-merged", "GGUF merged"], ["ollama", "Ollama folder"]].map(([v, label]) =>
        h("option", { value: v, selected: v === chosenFormat }, label)));
    const act = (label, fn, cls = "secondary") => h("button", { class: cls, onclick: async () => {
      msg.textContent = "working…";
      try { await fn(); msg.textContent = ""; } catch (e) { msg.textContent = e.message; }
    } }, label);
    return h("span", { class: "row" },
      act("Download", () => download(`${base}/archive`, `${file}.tar.gz`)),
      exportFormat,
      act("Export", () => {
        const fmt = exportFormat.value;
        return download(`${base}/archive?format=${encodeURIComponent(fmt)}`, `${file}-${fmt}.tar.gz`);
      }),
      kind === "sampler_weights" ? h("a", { class: "button secondary",
        href: `#/playground?model=${encodeURIComponent(c.tinker_path)}` }, "Playground") : null,
      act("Delete", async () => {
        if (!confirm(`Delete ${c.checkpoint_id}?`)) return;
        await del(base);
        loadCheckpoints();
      }, "danger"),
      msg);
  }

  loadRun();
  loadCheckpoints();
  const stop = stream(`/api/runs/${enc}/metrics/stream`, onMetric,
    { onState: (s) => { state.textContent = s === "live" ? "● live" : s; } });
  const timer = setInterval(() => { loadRun(); loadCheckpoints(); }, 5000);
  return () => { stop(); clearInterval(timer); Object.values(charts).forEach((c) => c.destroy()); };
}

function card(k, v, id) {
  return h("div", { class: "card" }, h("div", { class: "k" }, k),
    h("div", { class: "v", id: id || null }, v ?? "–"));
}
