// Token viewer: a job's data, or an uploaded JSONL, as the model sees it — each token coloured
// by its loss weight (0: prompt, 1: trained), id and weight on hover, trained-token counts, and
// where max_length cuts an example.

import { get, post } from "../api.js";
import { h, clear, banner, readFile, parseJsonl } from "../ui.js";

export async function render(main, _params, query) {
  const out = h("div", { id: "token-view" });
  const jobs = await get("/api/jobs?limit=200").catch(() => ({ jobs: [] }));
  const caps = await get("/api/v1/get_server_capabilities").catch(() => ({ supported_models: [] }));

  const jobSelect = h("select", { id: "token-job" }, h("option", { value: "" }, "(choose a job)"),
    jobs.jobs.map((j) => h("option", { value: j.id, selected: j.id === query.get("job") },
      `${j.name || j.id} (${j.type})`)));
  const limit = h("input", { type: "number", id: "token-limit", value: 20, min: 1, max: 200,
    style: { width: "80px" } });
  const showJob = h("button", { type: "button", id: "show-job-tokens", onclick: async () => {
    if (!jobSelect.value) return;
    await show(() => get(`/api/jobs/${encodeURIComponent(jobSelect.value)}/preview?limit=${limit.value}`));
  } }, "Show");

  const file = h("input", { type: "file", id: "token-file", accept: ".jsonl,.json" });
  const base = h("input", { id: "token-base", list: "token-models",
    value: caps.supported_models[0] ? caps.supported_models[0].model_name : "" });
  const kind = h("select", { id: "token-type" }, ["sft", "dpo", "rl", "distill"].map((t) =>
    h("option", { value: t }, t)));
  const maxLength = h("input", { type: "number", id: "token-max-length", value: 1024, min: 8,
    style: { width: "90px" } });
  const trainOn = h("select", { id: "token-train-on" }, ["last_assistant_message",
    "all_assistant_messages", "all_messages"].map((t) => h("option", { value: t }, t)));
  const showFile = h("button", { type: "button", id: "show-file-tokens", onclick: async () => {
    if (!file.files[0]) return;
    await show(async () => {
      const rows = parseJsonl(await readFile(file.files[0]), file.files[0].name);
      const config = { type: kind.value, base_model: base.value.trim(), data: rows,
        max_length: Number(maxLength.value) };
      if (kind.value === "sft") config.train_on = trainOn.value;
      if (kind.value === "distill") config.teacher = { model: base.value.trim() };
      return post("/api/jobs/preview", { config, limit: Number(limit.value) });
    });
  } }, "Show");

  main.append(h("h1", {}, "Token viewer"),
    h("datalist", { id: "token-models" }, caps.supported_models.map((m) =>
      h("option", { value: m.model_name }))),
    h("div", { class: "panel" },
      h("div", { class: "row" }, h("b", {}, "A job's data"), jobSelect, "examples", limit,
        showJob),
      h("div", { class: "row", style: { marginTop: "10px" } }, h("b", {}, "Or a JSONL file"),
        file, "base model", base, "type", kind, "train_on", trainOn, "max_length", maxLength,
        showFile)),
    h("p", { class: "legend small" }, h("span", { class: "tok w0" }, "weight 0 (prompt)"),
      h("span", { class: "tok w1" }, "weight 1 (trained)"),
      h("span", { class: "tok wneg" }, "negative weight"),
      h("span", { class: "truncmark" }, "cut at max_length")),
    out);

  async function show(load) {
    clear(out, h("p", { class: "muted" }, "tokenizing…"));
    try { clear(out, view(await load())); } catch (e) { clear(out, banner("error", e.message)); }
  }
  if (query.get("job")) showJob.click();
}

function view(data) {
  const examples = data.examples || [];
  const trained = examples.reduce((s, e) => s + e.n_trained, 0);
  const total = examples.reduce((s, e) => s + e.n_tokens, 0);
  return h("div", {},
    h("p", { id: "token-summary" }, `${examples.length} of ${data.total_examples ?? examples.length}`
      + ` examples · ${total} tokens · ${trained} trained`),
    examples.map((ex, i) => h("div", { class: "panel" },
      h("div", { class: "small muted" }, `#${i + 1} · `
        + `${ex.n_tokens} tokens · ${ex.n_trained} trained`
        + (ex.truncated ? ` · cut at max_length ${ex.max_length}` : "")),
      ex.pair !== undefined ? h("div", { class: "small muted" }, `pair ${ex.pair + 1}, ${ex.side}`)
        : null,
      ex.task ? h("div", { class: "small muted" }, `task ${ex.task}`) : null,
      h("div", { class: "tokens" }, tokensOf(ex)))));
}

function tokensOf(ex) {
  const out = ex.tokens.map((t) => {
    const w = t.weight;
    const cls = w === 0 ? "w0" : w === 1 ? "w1" : w < 0 ? "wneg" : "wpart";
    return h("span", { class: `tok ${cls}`, dataset: { weight: w, id: t.id },
      title: `id ${t.id} · weight ${w}` }, t.text);
  });
  if (ex.truncated) {  // the server keeps the tokens before the cut and counts the rest
    out.push(h("span", { class: "truncmark", title: `${ex.cut_tokens} tokens dropped` },
      `✂ max_length ${ex.max_length}: ${ex.cut_tokens} more tokens not trained`));
  }
  return out;
}
