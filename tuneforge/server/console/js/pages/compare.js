// Compare: runs' and jobs' curves overlaid, and the jobs' evaluation reports side by side.

import { get } from "../api.js";
import { h, clear, fmt, banner, table, LineChart, shortRun } from "../ui.js";

const REPORT_KEYS = ["loss", "perplexity", "exact_match", "bleu", "rouge1", "rougeL", "reward",
  "accuracy", "margin"];

export async function render(main, _params, query) {
  const runIds = (query.get("runs") || "").split(",").filter(Boolean);
  const jobIds = (query.get("jobs") || "").split(",").filter(Boolean);
  const picker = await pickerPanel(runIds, jobIds);
  main.append(h("h1", {}, "Compare"), picker);
  if (!runIds.length && !jobIds.length) {
    main.append(h("p", { class: "muted" }, "Pick runs or jobs above (or tick them on the Runs ",
      "and Jobs pages)."));
    return;
  }
  const grid = h("div", { class: "grid", id: "compare-charts" });
  const reports = h("div", { id: "compare-reports" });
  main.append(grid, reports);

  // Each curve: a name and (step, value) pairs, merged onto one x axis.
  const curves = { loss: [], eval: [], lr: [] };
  for (const id of runIds) {
    try {
      const data = await get(`/api/runs/${encodeURIComponent(id)}/metrics`);
      const name = shortRun(id);
      curves.loss.push({ name, points: data.metrics.map((m) => [m.step, m.loss]) });
      curves.lr.push({ name, points: data.metrics.map((m) => [m.step, m.lr]) });
    } catch (e) { main.append(banner("error", `${id}: ${e.message}`)); }
  }
  const jobs = [];
  for (const id of jobIds) {
    try {
      const [job, data] = await Promise.all([get(`/api/jobs/${encodeURIComponent(id)}`),
        get(`/api/jobs/${encodeURIComponent(id)}/metrics`)]);
      jobs.push(job);
      const name = job.name || job.id;
      const rows = data.metrics || [];
      const pick = (key) => rows.filter((r) => typeof r[key] === "number").map((r) => [r.step, r[key]]);
      curves.loss.push({ name, points: pick("loss") });
      curves.eval.push({ name, points: pick("eval_loss") });
      curves.lr.push({ name, points: pick("lr") });
    } catch (e) { main.append(banner("error", `${id}: ${e.message}`)); }
  }
  const charts = [];
  for (const [key, title] of [["loss", "train loss"], ["eval", "held-out loss"],
    ["lr", "learning rate"]]) {
    const list = curves[key].filter((c) => c.points.length);
    if (!list.length) continue;
    const xs = [...new Set(list.flatMap((c) => c.points.map((p) => p[0])))].sort((a, b) => a - b);
    const ys = list.map((c) => {
      const m = new Map(c.points);
      return xs.map((x) => (m.has(x) ? m.get(x) : null));
    });
    const chart = new LineChart(grid, { title, series: list.map((c) => ({ label: c.name })),
      smoothing: key === "loss" });
    chart.set(xs, ys);
    charts.push(chart);
  }
  if (jobs.length) {
    const rows = REPORT_KEYS.map((k) => ({ metric: k, ...Object.fromEntries(jobs.map((j) =>
      [j.id, j.result && j.result.eval ? j.result.eval[k] : undefined])) }))
      .filter((r) => jobs.some((j) => typeof r[j.id] === "number"));
    clear(reports, h("h2", {}, "Evaluation reports"), table([{ label: "metric", key: "metric" },
      ...jobs.map((j) => ({ label: j.name || j.id, render: (r) => fmt(r[j.id]), num: true }))],
    rows, { empty: "None of these jobs has an evaluation report yet." }));
  }
  return () => charts.forEach((c) => c.destroy());
}

async function pickerPanel(runIds, jobIds) {
  const [runs, jobs] = await Promise.all([get("/api/runs?limit=200"), get("/api/jobs?limit=200")]);
  const runBoxes = runs.runs.map((r) => h("label", { class: "small" }, h("input", {
    type: "checkbox", value: r.id, checked: runIds.includes(r.id), class: "pick-run" }),
  ` ${r.id}`));
  const jobBoxes = jobs.jobs.map((j) => h("label", { class: "small" }, h("input", {
    type: "checkbox", value: j.id, checked: jobIds.includes(j.id), class: "pick-job" }),
  ` ${j.name || j.id} (${j.type})`));
  const go = h("button", { type: "button", id: "compare-go", onclick: () => {
    const r = runBoxes.map((l) => l.firstChild).filter((i) => i.checked).map((i) => i.value);
    const j = jobBoxes.map((l) => l.firstChild).filter((i) => i.checked).map((i) => i.value);
    location.hash = `#/compare?runs=${r.map(encodeURIComponent).join(",")}`
      + `&jobs=${j.map(encodeURIComponent).join(",")}`;
  } }, "Compare");
  return h("details", { class: "panel", open: !runIds.length && !jobIds.length },
    h("summary", {}, "Choose runs and jobs"),
    h("div", { class: "row" },
      h("div", { class: "grow" }, h("b", {}, "Runs"), runBoxes.length ? runBoxes : " none"),
      h("div", { class: "grow" }, h("b", {}, "Jobs"), jobBoxes.length ? jobBoxes : " none")),
    go);
}
