// New job: one form per job type, built from the server's own job spec (/api/jobs/schema):
// every option with its default and help text, nothing copied into the page. Data comes from
// uploaded JSONL files; "From a SKILL.md" makes a distillation job from a skill file alone.
// A refused config shows the server's message beside the field it names.

import { ApiError, get, post } from "../api.js";
import { h, clear, banner, readFile, parseJsonl } from "../ui.js";

const SKILL = "skill";
// Options the SKILL.md form fills itself.
const SKILL_FILLED = new Set(["type", "data", "teacher.model", "teacher.system_prompt",
  "teacher.skill_file"]);

export async function render(main, _params, query) {
  const schema = await get("/api/jobs/schema");
  const caps = await get("/api/v1/get_server_capabilities").catch(() => ({ supported_models: [] }));
  const models = h("datalist", { id: "base-models" },
    caps.supported_models.map((m) => h("option", { value: m.model_name })));
  const types = Object.keys(schema.types);
  let current = query.get("type") || types[0];
  const tabs = h("div", { class: "tabs", id: "job-types" });
  const formBox = h("div");
  main.append(h("h1", {}, "New job"), models, tabs, formBox);

  function showTabs() {
    clear(tabs, [...types, SKILL].map((t) => h("button", {
      type: "button", class: t === current ? "on" : null, dataset: { type: t },
      onclick: () => { current = t; showTabs(); showForm(); },
    }, t === SKILL ? "From a SKILL.md" : t)));
  }

  function showForm() {
    const type = current === SKILL ? "distill" : current;
    const spec = schema.types[type];
    const general = h("div", { id: "form-error" });
    const inputs = [];  // {option, path, read() -> value | undefined}
    const grid = h("div", { class: "form-grid" });
    const extra = h("div");

    if (current === SKILL) {
      const skill = h("input", { type: "file", id: "skill-file", accept: ".md,.txt,text/*" });
      const prompts = h("input", { type: "file", id: "skill-prompts", accept: ".jsonl,.json" });
      extra.append(h("div", { class: "panel" },
        h("p", { class: "small muted" }, "Upload a SKILL.md: the teacher (the base model with ",
          "the skill as its context) first writes the user requests the skill covers, then ",
          "answers them; the student learns those answers without the skill. Prompts ",
          "(JSONL rows with a 'prompt' field) may be uploaded too."),
        h("div", { class: "row" },
          fieldBox("teacher.system_prompt", "SKILL.md", skill, true),
          fieldBox("data", "prompts (optional)", prompts, false))));
      inputs.push({ path: ["teacher", "system_prompt"], async read() {
        return skill.files[0] ? readFile(skill.files[0]) : undefined;
      } });
      inputs.push({ path: ["data"], async read() {
        return prompts.files[0] ? parseJsonl(await readFile(prompts.files[0]),
          prompts.files[0].name) : undefined;
      } });
      inputs.push({ path: ["teacher", "model"], async read() {
        const base = grid.querySelector('[data-field="base_model"] input');
        return base && base.value.trim() ? base.value.trim() : undefined;
      } });
    }

    // required options first (base model, data), then the rest in the spec's order
    const options = flatten(spec.options);
    options.sort((a, b) => Number(Boolean(b.required)) - Number(Boolean(a.required)));
    for (const opt of options) {
      if (opt.name === "type") continue;
      if (current === SKILL && SKILL_FILLED.has(opt.name)) continue;
      const made = optionInput(opt, type);
      grid.append(made.box);
      inputs.push(made);
    }

    const start = h("button", { type: "submit", id: "start-job" }, "Start");
    // the server validates (novalidate): its message, not the browser's, goes beside a field
    const form = h("form", { id: "job-form", novalidate: true, dataset: { type: current } },
      spec.description ? h("p", { class: "muted" }, spec.description) : null,
      extra, grid, h("p", {}, start), general);
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      for (const el of form.querySelectorAll(".field-error")) el.textContent = "";
      clear(general);
      start.disabled = true;
      try {
        const config = { type };
        for (const input of inputs) {
          const value = await input.read();
          if (value !== undefined) setPath(config, input.path, value);
        }
        const created = await post("/api/jobs", config);
        location.hash = `#/jobs/${encodeURIComponent(created.id)}`;
      } catch (e) {
        showErrors(form, general, e);
      } finally {
        start.disabled = false;
      }
    });
    clear(formBox, form);
  }

  showTabs();
  showForm();
}

// Options (with nested objects' options) as a flat list with dotted names.
function flatten(options, prefix = "") {
  const out = [];
  for (const opt of options) {
    const name = prefix + opt.name;
    if (opt.options) out.push(...flatten(opt.options, `${name}.`));
    else out.push({ ...opt, name });
  }
  return out;
}

function fieldBox(field, label, input, required, help) {
  return h("label", { class: `opt${required ? " required" : ""}`, dataset: { field } },
    h("span", { class: "name" }, label), input,
    help ? h("div", { class: "help" }, help) : null,
    h("div", { class: "field-error" }));
}

function optionInput(opt, type) {
  const path = opt.name.split(".");
  const id = `opt-${opt.name.replace(/\./g, "-")}`;
  let input, read;
  const hasDefault = opt.default !== undefined && opt.default !== null;
  if (opt.type === "data") {
    input = h("input", { type: "file", id, accept: ".jsonl,.json", multiple: opt.name === "tasks" });
    read = async () => {
      const files = [...input.files];
      if (!files.length) return undefined;
      if (type === "atomic" && opt.name === "tasks") {  // one task per file, named after it
        return Promise.all(files.map(async (f) => ({ name: f.name.replace(/\.jsonl?$/, ""),
          data: parseJsonl(await readFile(f), f.name) })));
      }
      return parseJsonl(await readFile(files[0]), files[0].name);
    };
  } else if (opt.type === "boolean") {
    input = h("input", { type: "checkbox", id, checked: opt.default === true });
    read = async () => (input.checked === (opt.default === true) ? undefined : input.checked);
  } else if (opt.type === "enum") {
    input = h("select", { id },
      opt.required || hasDefault ? null : h("option", { value: "" }, "(default)"),
      (opt.enum || []).map((v) => h("option", { value: v, selected: v === opt.default }, v)));
    read = async () => (input.value === "" || input.value === opt.default ? undefined
      : input.value);
  } else {
    const numeric = opt.type === "integer" || opt.type === "number";
    input = h("input", {
      id, type: numeric ? "number" : "text",
      step: opt.type === "integer" ? "1" : "any",
      min: opt.minimum, max: opt.maximum,
      placeholder: hasDefault ? String(opt.default) : (opt.required ? "required" : "(default)"),
      list: opt.name === "base_model" ? "base-models" : null,
    });
    read = async () => {
      const raw = input.value.trim();
      if (raw === "") return undefined;
      if (!numeric) return raw;
      const n = Number(raw);
      return Number.isNaN(n) ? raw : n;
    };
  }
  const box = fieldBox(opt.name, opt.name, input, opt.required,
    [opt.help, hasDefault && opt.type !== "data" ? `default: ${JSON.stringify(opt.default)}`
      : null].filter(Boolean).join(" · "));
  return { box, path, read };
}

function setPath(obj, path, value) {
  let o = obj;
  for (const key of path.slice(0, -1)) o = o[key] = o[key] || {};
  o[path[path.length - 1]] = value;
}

// The server's message beside each field it names; anything else above the Start button.
function showErrors(form, general, e) {
  const fields = e instanceof ApiError ? (e.body.errors || []) : [];
  const unplaced = [];
  for (const err of fields) {
    const box = findField(form, err.field);
    if (box) box.querySelector(".field-error").textContent = err.message;
    else unplaced.push(`${err.field}: ${err.message}`);
  }
  clear(general, banner("error", fields.length && !unplaced.length
    ? "The server refused this job; see the fields marked above." : e.message));
}

function findField(form, field) {
  if (!field) return null;
  const parts = field.split(".");
  // The deepest named field that exists (rows inside a data field point at the field).
  for (let n = parts.length; n > 0; n--) {
    const box = form.querySelector(`[data-field="${CSS.escape(parts.slice(0, n).join("."))}"]`);
    if (box) return box;
  }
  return null;
}
