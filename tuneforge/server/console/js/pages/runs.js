// Runs: every training run of this key (any SDK script, cookbook recipe or job), live.

import { get } from "../api.js";
import { h, clear, fmt, when, table, banner, pickColumn, poll } from "../ui.js";

const REFRESH_MS = 3000;

export function render(main) {
  const selected = new Set();
  const body = h("div", { id: "runs-table" });
  const compareBtn = h("button", { id: "compare-runs", disabled: true, onclick: () => {
    location.hash = `#/compare?runs=${[...selected].map(encodeURIComponent).join(",")}`;
  } }, "Compare selected");
  main.append(h("div", { class: "row" }, h("h1", { class: "grow" }, "Training runs"), compareBtn),
    h("p", { class: "muted small" }, "Every training client of this key appears here with the ",
      "per-step metrics the server records (loss per token, learning rate, tokens, step time)."),
    body);

  return poll(async (alive) => {
    try {
      const data = await get("/api/runs?limit=200");
      if (!alive()) return;
      clear(body, table([
        pickColumn(selected, compareBtn),
        { label: "run", render: (r) => h("a", { href: `#/runs/${encodeURIComponent(r.id)}` },
          r.id) },
        { label: "base model", key: "base_model" },
        { label: "rank", key: "lora_rank", num: true },
        { label: "job", render: (r) => r.job_id
          ? h("a", { href: `#/jobs/${encodeURIComponent(r.job_id)}` }, r.job_id) : "–" },
        { label: "steps", key: "steps", num: true },
        { label: "loss / token", render: (r) => fmt(r.last_loss), num: true },
        { label: "lr", render: (r) => fmt(r.last_lr, 3), num: true },
        { label: "loaded", render: (r) => (r.loaded ? "yes" : "no") },
        { label: "last request", render: (r) => when(r.last_request_time) },
      ], data.runs, {
        onRow: (r) => { location.hash = `#/runs/${encodeURIComponent(r.id)}`; },
        empty: "No training runs yet: start one from the SDK or the New job page.",
      }));
    } catch (e) {
      if (alive()) clear(body, banner("error", e.message));
    }
  }, REFRESH_MS);
}
