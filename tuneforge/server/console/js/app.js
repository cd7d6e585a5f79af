// The console's shell: log in, hash routes, one page mounted at a time.
// Each page module exports `render(main, params, query)` and may return a cleanup function
// (closing its streams and timers) that runs when the page is left.

import { apiKey, clearKey, get, setKey, ApiError } from "./api.js";
import { h, clear, banner } from "./ui.js";
import * as runs from "./pages/runs.js";
import * as run from "./pages/run.js";
import * as jobs from "./pages/jobs.js";
import * as job from "./pages/job.js";
import * as newjob from "./pages/newjob.js";
import * as playground from "./pages/playground.js";
import * as tokens from "./pages/tokens.js";
import * as system from "./pages/system.js";
import * as compare from "./pages/compare.js";

const ROUTES = [
  [/^#\/runs$/, runs, "runs"],
  [/^#\/runs\/(.+)$/, run, "runs"],
  [/^#\/jobs$/, jobs, "jobs"],
  [/^#\/jobs\/([^/]+)\/tasks\/(.+)$/, job, "jobs"],
  [/^#\/jobs\/([^/]+)$/, job, "jobs"],
  [/^#\/new$/, newjob, "new"],
  [/^#\/playground$/, playground, "playground"],
  [/^#\/tokens$/, tokens, "tokens"],
  [/^#\/system$/, system, "system"],
  [/^#\/compare$/, compare, "compare"],
];

const main = document.getElementById("main");
let cleanup = null;

function loginPage() {
  const input = h("input", { type: "password", id: "api-key", placeholder: "tml-...",
    autocomplete: "off" });
  const msg = h("div");
  const form = h("form", { id: "login-box", class: "panel" },
    h("h1", {}, "tuneforge"),
    h("p", { class: "muted" }, "Log in with an API key of this server (`make serve` prints one; ",
      "`tuneforge keys create` makes more). It stays in this tab's session storage."),
    input, h("button", { type: "submit", id: "login" }, "Log in"), msg);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    setKey(input.value.trim());
    try {
      await get("/api/runs?limit=1", { noAuthRedirect: true });
      location.hash = "#/runs";
    } catch (e) {
      clearKey();
      clear(msg, banner("error", e instanceof ApiError && e.status === 401
        ? "That key is not valid on this server." : e.message));
    }
  });
  clear(main, form);
  input.focus();
}

async function route() {
  if (cleanup) { try { cleanup(); } catch { /* a page's cleanup must not block the next */ } }
  cleanup = null;
  const hash = location.hash || "#/runs";
  const [path, queryString] = hash.split("?");
  const query = new URLSearchParams(queryString || "");
  document.getElementById("logout").hidden = !apiKey();
  if (!apiKey() || path === "#/login") {
    setActive(null);
    loginPage();
    return;
  }
  for (const [re, page, nav] of ROUTES) {
    const m = path.match(re);
    if (!m) continue;
    setActive(nav);
    clear(main);
    try {
      cleanup = (await page.render(main, m.slice(1).map(decodeURIComponent), query)) || null;
    } catch (e) {
      main.append(banner("error", e.message));
    }
    return;
  }
  location.hash = "#/runs";
}

function setActive(name) {
  for (const a of document.querySelectorAll("#nav a")) {
    a.classList.toggle("active", a.dataset.page === name);
  }
}

document.getElementById("logout").addEventListener("click", () => {
  clearKey();
  location.hash = "#/login";
});
window.addEventListener("hashchange", route);
route();
