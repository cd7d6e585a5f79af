// Playground: chat with a base model or a sampler checkpoint (its chat template applied by the
// server's OpenAI-compatible endpoint), two panes side by side on the same prompt; hovering a
// token of an answer shows its log-probability.

import { post, get } from "../api.js";
import { h, clear, banner, fmt } from "../ui.js";

export async function render(main, _params, query) {
  const list = await get("/oai/api/v1/models");
  const ids = list.data.map((m) => m.id);
  const first = query.get("model");
  const panes = [pane(0, ids, first || ids[0]), pane(1, ids, ids.find((m) => m !== first
    && !m.startsWith("tinker://")) || ids[0])];
  const params = {
    temperature: numberInput("temperature", 0, 0, 2, 0.1),
    top_p: numberInput("top_p", 1, 0, 1, 0.05),
    max_tokens: numberInput("max_tokens", 64, 1, 4096, 1),
    seed: numberInput("seed", 0, 0, 2 ** 31 - 1, 1),
  };
  const system = h("input", { id: "system-prompt", placeholder: "system prompt (optional)",
    style: { width: "100%" } });
  const prompt = h("textarea", { id: "prompt", placeholder: "Write a message…" });
  const send = h("button", { id: "send", type: "submit" }, "Send to both");
  const clearBtn = h("button", { type: "button", class: "secondary", onclick: () => {
    panes.forEach((p) => p.reset());
  } }, "Clear");
  const form = h("form", { class: "panel" },
    h("div", { class: "row" }, Object.entries(params).map(([k, el]) =>
      h("label", {}, h("span", { class: "small muted" }, k), el))),
    h("p", {}, system), prompt, h("p", { class: "row" }, send, clearBtn));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const text = prompt.value.trim();
    if (!text) return;
    send.disabled = true;
    const settings = Object.fromEntries(Object.entries(params).map(([k, el]) =>
      [k, Number(el.value)]));
    await Promise.all(panes.map((p) => p.ask(text, system.value.trim(), settings)));
    prompt.value = "";
    send.disabled = false;
  });
  main.append(h("h1", {}, "Playground"), form,
    h("div", { class: "panes" }, panes.map((p) => p.el)));
}

function numberInput(id, value, min, max, step) {
  return h("input", { type: "number", id: `param-${id}`, value, min, max, step,
    style: { width: "110px" } });
}

function pane(index, ids, selected) {
  const select = h("select", { class: "model", id: `model-${index}` },
    ids.map((m) => h("option", { value: m, selected: m === selected }, m)));
  const chat = h("div", { class: "chat", id: `chat-${index}` });
  const el = h("div", { class: "panel" }, h("label", {}, h("span", { class: "small muted" },
    "model"), select), chat);
  let messages = [];
  select.addEventListener("change", () => { messages = []; clear(chat); });
  return {
    el,
    reset() { messages = []; clear(chat); },
    async ask(text, systemPrompt, settings) {
      messages.push({ role: "user", content: text });
      chat.append(h("div", { class: "msg user" }, text));
      const waiting = h("div", { class: "msg assistant muted" }, "…");
      chat.append(waiting);
      const body = { model: select.value, messages: systemPrompt
        ? [{ role: "system", content: systemPrompt }, ...messages] : messages,
      max_tokens: settings.max_tokens, temperature: settings.temperature,
      top_p: settings.top_p, seed: settings.seed, logprobs: true, top_logprobs: 3 };
      try {
        const out = await post("/oai/api/v1/chat/completions", body);
        const choice = out.choices[0];
        messages.push({ role: "assistant", content: choice.message.content });
        waiting.replaceWith(answer(choice));
      } catch (e) {
        messages.pop();
        waiting.replaceWith(banner("error", e.message));
      }
      chat.scrollTop = chat.scrollHeight;
    },
  };
}

function answer(choice) {
  const tokens = choice.logprobs && choice.logprobs.content;
  const box = h("div", { class: "msg assistant answer",
    dataset: { finish: choice.finish_reason } });
  if (!tokens || !tokens.length) {
    box.textContent = choice.message.content;
    return box;
  }
  for (const t of tokens) {
    const alts = (t.top_logprobs || []).map((a) => `${JSON.stringify(a.token)} ${fmt(a.logprob)}`);
    box.append(h("span", { class: "lp", dataset: { logprob: t.logprob },
      title: [`logprob ${fmt(t.logprob)} (p=${fmt(Math.exp(t.logprob), 3)})`, ...alts]
        .join("\n") }, t.token));
  }
  return box;
}
