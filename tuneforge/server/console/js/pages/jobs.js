// Jobs: every declarative training job of this key, with progress and time remaining.

import { get } from "../api.js";
import {
  h, clear, fmt, duration, when, table, banner, statusBadge, progressBar, pickColumn, poll,
} from "../ui.js";

const REFRESH_MS = 2000;

export function render(main) {
  const selected = new Set();
  const body = h("div", { id: "jobs-table" });
  const compareBtn = h("button", { id: "compare-jobs", disabled: true, onclick: () => {
    location.hash = `#/compare?jobs=${[...selected].map(encodeURIComponent).join(",")}`;
  } }, "Compare selected");
  main.append(h("div", { class: "row" }, h("h1", { class: "grow" }, "Jobs"),
    h("a", { class: "button", href: "#/new" }, "New job"), compareBtn), body);

  return poll(async (alive) => {
    try {
      const data = await get("/api/jobs?limit=200");
      if (!alive()) return;
      clear(body, table([
        pickColumn(selected, compareBtn),
        { label: "job", render: (j) => h("a", { href: `#/jobs/${encodeURIComponent(j.id)}` },
          j.name || j.id) },
        { label: "type", key: "type" },
        { label: "base model", key: "base_model" },
        { label: "status", render: (j) => statusBadge(j.status) },
        { label: "progress", render: (j) => h("span", {}, progressBar(j.progress), " ",
          h("span", { class: "small muted" }, j.tasks ? `${j.tasks_done ?? 0}/${j.tasks} tasks`
            : `${j.step ?? 0}/${j.total_steps ?? "?"}`)) },
        { label: "loss", render: (j) => fmt(j.latest_loss), num: true },
        { label: "ETA", render: (j) => (j.status === "running" ? duration(j.eta_seconds) : "–") },
        { label: "created", render: (j) => when(j.created_at) },
      ], data.jobs, {
        onRow: (j) => { location.hash = `#/jobs/${encodeURIComponent(j.id)}`; },
        empty: "No jobs yet: start one on the New job page.",
      }));
    } catch (e) {
      if (alive()) clear(body, banner("error", e.message));
    }
  }, REFRESH_MS);
}
