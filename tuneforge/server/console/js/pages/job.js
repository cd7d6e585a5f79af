// One job (or one task of an atomic job): status, live curves, per-epoch history, the log
// tail, the evaluation report with a baseline comparison, samples, cancel and evaluate.

import { get, post, request } from "../api.js";
import {
  h, clear, fmt, duration, when, table, banner, statusBadge, progressBar, LineChart, sparkline,
} from "../ui.js";

const REFRESH_MS = 2000;
const ACTIVE = ["queued", "running"];
// Step-metric keys that are not curves of their own.
const NOT_CURVES = new Set(["step", "epoch", "time", "examples", "lr", "loss", "eval_loss",
  "reward", "eval_reward"]);

export function render(main, [jobId, taskName]) {
  const enc = encodeURIComponent(jobId);
  const head = h("div", { id: "job-head" });
  const grid = h("div", { class: "grid", id: "job-charts" });
  const history = h("div", { id: "job-history" });
  const tasks = h("div", { id: "job-tasks" });
  const evaluation = h("div", { id: "job-eval" });
  const logBox = h("pre", { class: "log", id: "job-log" });
  main.append(head, grid);
  if (!taskName) main.append(tasks);
  const historyTitle = h("h2", {}, "Per-epoch history");
  main.append(historyTitle, history, evaluation);
  if (!taskName) main.append(h("h2", {}, "Log"), logBox);

  const charts = {};
  function chart(name, title, series, smoothing = true) {
    if (!charts[name]) charts[name] = new LineChart(grid, { title, series, smoothing });
    return charts[name];
  }

  let job = null, alive = true, timer = null, logAbort = null, atomic = false;

  function showHead() {
    const buttons = h("span", { class: "row" });
    if (!taskName && ACTIVE.includes(job.status)) {
      buttons.append(h("button", { class: "danger", id: "cancel-job", onclick: async () => {
        await post(`/api/jobs/${enc}/cancel`);
        refresh();
      } }, "Cancel"));
    }
    // an atomic batch is evaluated task by task (on a task's page)
    if (job.status === "completed" && !(atomic && !taskName)) {
      buttons.append(evaluateControls());
    }
    buttons.append(h("a", { class: "button secondary",
      href: `#/tokens?job=${enc}` }, "Tokens"));
    clear(head,
      h("div", { class: "row" },
        h("h1", { class: "grow" }, taskName ? h("span", {},
          h("a", { href: `#/jobs/${enc}` }, job.name || job.id), ` / ${taskName}`)
          : (job.name || job.id), " ", statusBadge(job.status)),
        buttons),
      h("div", { class: "cards" },
        card("type", job.type), card("base model", job.base_model),
        card("progress", h("span", {}, progressBar(job.progress), " ",
          `${Math.round((job.progress || 0) * 100)}%`), "job-progress"),
        job.tasks ? card("tasks", `${job.tasks_done ?? 0} / ${job.tasks}`)
          : card("step", `${job.step ?? 0} / ${job.total_steps ?? "?"}`),
        card("epoch", job.epoch ?? "–"), card("latest loss", fmt(job.latest_loss)),
        card("time remaining", ACTIVE.includes(job.status) ? duration(job.eta_seconds) : "–"),
        card("started", when(job.started_at)), card("finished", when(job.finished_at)),
        job.restarts ? card("restarts", job.restarts) : null),
      job.error ? banner("error", job.error) : null);
  }

  function evaluateControls() {
    const choice = h("select", { id: "baseline" }, h("option", { value: "base" },
      "against the base model"), h("option", { value: "" }, "without a baseline"));
    get("/api/jobs?limit=200").then((d) => {
      for (const other of d.jobs) {
        if (other.id !== jobId && other.status === "completed" && other.type !== "atomic"
          && other.base_model === job.base_model) {
          choice.append(h("option", { value: other.id }, `against ${other.name || other.id}`));
        }
      }
    }).catch(() => {});
    const button = h("button", { id: "evaluate-job", onclick: async () => {
      button.disabled = true;
      clear(evaluation, h("p", { class: "muted" }, "evaluating…"));
      try {
        const body = choice.value ? { baseline: choice.value } : {};
        if (taskName) body.task = taskName;
        showEvaluation(await post(`/api/jobs/${enc}/evaluate`, body));
      } catch (e) { clear(evaluation, banner("error", e.message)); }
      button.disabled = false;
    } }, "Evaluate");
    return h("span", { class: "row" }, choice, button);
  }

  function showMetrics(data) {
    const rows = data.metrics || [];
    const steps = rows.filter((r) => r.loss !== undefined || r.reward !== undefined);
    const evals = rows.filter((r) => Object.keys(r).some((k) => k.startsWith("eval_")));
    const xs = [...new Set(rows.map((r) => r.step))].sort((a, b) => a - b);
    const at = (list, key) => {
      const byStep = new Map(list.filter((r) => r[key] !== undefined).map((r) => [r.step, r[key]]));
      return xs.map((x) => (byStep.has(x) ? byStep.get(x) : null));
    };
    const has = (key) => rows.some((r) => typeof r[key] === "number");
    if (has("loss") || has("eval_loss")) {
      chart("loss", "loss (train / held-out)", [{ label: "train" }, { label: "held-out" }])
        .set(xs, [at(steps, "loss"), at(evals, "eval_loss")]);
    }
    if (has("reward") || has("eval_reward")) {
      chart("reward", "reward (train / held-out)", [{ label: "train" }, { label: "held-out" }])
        .set(xs, [at(steps, "reward"), at(evals, "eval_reward")]);
    }
    if (has("lr")) chart("lr", "learning rate", [{ label: "lr" }], false).set(xs, [at(steps, "lr")]);
    const extra = new Set();
    rows.forEach((r) => Object.entries(r).forEach(([k, v]) => {
      if (typeof v === "number" && !NOT_CURVES.has(k)) extra.add(k);
    }));
    for (const key of [...extra].sort()) {
      chart(`m:${key}`, key, [{ label: key }]).set(xs, [at(rows, key)]);
    }
    const hist = data.history || [];
    const cols = hist.length ? Object.keys(hist[0]) : ["epoch"];
    clear(history, table(cols.map((k) => ({ label: k, key: k, num: k !== "epoch" })), hist,
      { empty: "No epoch finished yet." }));
  }

  function showReport(report, title = "Evaluation report") {
    if (!report) return null;
    const numbers = Object.entries(report).filter(([, v]) => typeof v === "number");
    const samples = report.samples || [];
    return h("div", { class: "panel" }, h("h2", {}, title),
      h("div", { class: "cards" }, numbers.map(([k, v]) => card(k, fmt(v)))),
      samples.length ? h("div", {}, h("h2", {}, "Sample outputs"), table(
        Object.keys(samples[0]).filter((k) => k !== "meta").map((k) => ({ label: k,
          render: (s) => h("span", { style: { whiteSpace: "pre-wrap" } }, String(s[k] ?? "")) })),
        samples)) : null);
  }

  function showEvaluation(ev) {
    clear(evaluation, showReport(ev.report, `Evaluation of ${ev.adapter || "the adapter"}`),
      ev.comparison ? h("div", { class: "panel", id: "comparison" },
        h("h2", {}, `Against ${ev.baseline ? ev.baseline.name : "the baseline"}`),
        table(Object.keys(ev.comparison[0] || { metric: 1 }).map((k) => ({ label: k,
          render: (r) => (typeof r[k] === "number" ? fmt(r[k]) : r[k]), num: k !== "metric" })),
        ev.comparison)) : null);
  }

  async function showTasks() {
    const data = await get(`/api/jobs/${enc}/tasks`);
    const filter = tasks.querySelector("input.filter");
    const q = filter ? filter.value.trim().toLowerCase() : "";
    const list = data.tasks.filter((t) => !q || t.name.toLowerCase().includes(q));
    const input = filter || h("input", { class: "filter", placeholder: "filter tasks…",
      oninput: () => showTasks() });
    const body = h("div", { id: "task-table" }, table([
      { label: "task", render: (t) => h("a", {
        href: `#/jobs/${enc}/tasks/${encodeURIComponent(t.name)}` }, t.name) },
      { label: "status", render: (t) => statusBadge(t.status) },
      { label: "epochs", key: "epochs_trained", num: true },
      { label: "early-stopped", render: (t) => (t.early_stopped ? "yes" : "–") },
      { label: "best held-out loss", render: (t) => fmt(t.best_eval_loss), num: true },
      { label: "train loss", render: (t) => sparkline(t.losses || []) },
    ], list, { onRow: (t) => {
      location.hash = `#/jobs/${enc}/tasks/${encodeURIComponent(t.name)}`;
    }, empty: "No tasks." }));
    if (!filter) clear(tasks, h("h2", {}, `Tasks (${data.tasks.length})`), input, body);
    else tasks.replaceChild(body, tasks.querySelector("#task-table"));
  }

  async function followLog() {
    logAbort = new AbortController();
    try {
      const res = await request("GET", `/api/jobs/${enc}/logs?follow=true`, undefined,
        { raw: true, signal: logAbort.signal });
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        const atBottom = logBox.scrollTop + logBox.clientHeight >= logBox.scrollHeight - 4;
        logBox.append(decoder.decode(value, { stream: true }));
        if (atBottom) logBox.scrollTop = logBox.scrollHeight;
      }
    } catch { /* left the page, or the job ended */ }
  }

  let shownResult = false;
  async function refresh() {
    try {
      job = await get(`/api/jobs/${enc}`);
      atomic = job.type === "atomic";
      showHead();
      const metrics = taskName
        ? await get(`/api/jobs/${enc}/tasks/${encodeURIComponent(taskName)}/metrics`)
        : await get(`/api/jobs/${enc}/metrics`);
      showMetrics(metrics);
      if (atomic && !taskName) {
        historyTitle.hidden = history.hidden = true;  // each task has its own
        await showTasks();
      }
      if (!shownResult && !taskName && job.result && job.result.eval) {
        shownResult = true;
        clear(evaluation, showReport(job.result.eval));
      }
      if (taskName && metrics.report && !shownResult) {
        shownResult = true;
        clear(evaluation, showReport(metrics.report));
      }
    } catch (e) {
      clear(head, banner("error", e.message));
    }
    if (alive && (!job || ACTIVE.includes(job.status))) timer = setTimeout(refresh, REFRESH_MS);
  }

  refresh();
  if (!taskName) followLog();
  return () => {
    alive = false;
    clearTimeout(timer);
    if (logAbort) logAbort.abort();
    Object.values(charts).forEach((c) => c.destroy());
  };
}

function card(k, v, id) {
  return h("div", { class: "card" }, h("div", { class: "k" }, k),
    h("div", { class: "v", id: id || null }, v ?? "–"));
}
