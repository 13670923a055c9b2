// edgefleet dashboard: live refresh of [data-live] sections, and the
// buttons and forms that call the fleet API with the session's CSRF token.
// No framework, no build step; everything works without it but live data
// and actions.
(() => {
  "use strict";
  const csrf = document.querySelector('meta[name="csrf-token"]')?.content;
  const main = document.getElementById("main");
  const toast = document.getElementById("toast");
  const updated = document.getElementById("updated");

  function say(message, bad) {
    if (!toast) return;
    toast.textContent = message;
    toast.className = bad ? "show bad" : "show";
    toast.setAttribute("role", bad ? "alert" : "status");
    clearTimeout(say.timer);
    say.timer = setTimeout(() => { toast.className = ""; }, bad ? 8000 : 4000);
  }

  // Fetches this page again and swaps every [data-live] element by id,
  // except one holding the keyboard focus (so typing is never lost).
  async function refresh() {
    const response = await fetch(location.href, {
      credentials: "same-origin",
      headers: { "X-Edgefleet-Refresh": "1" },
    });
    if (response.redirected && new URL(response.url).pathname === "/ui/login") {
      location.href = response.url; // the session ended
      return;
    }
    if (!response.ok) throw new Error(`refresh: HTTP ${response.status}`);
    const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
    for (const old of document.querySelectorAll("[data-live][id]")) {
      const next = fresh.getElementById(old.id);
      if (!next) continue;
      if (old.contains(document.activeElement) && document.activeElement !== document.body) continue;
      old.replaceWith(document.importNode(next, true));
    }
    if (updated) updated.textContent = `Live: updated ${new Date().toLocaleTimeString()}`;
    document.dispatchEvent(new CustomEvent("edgefleet:refreshed"));
  }

  const every = Number(main?.dataset.refresh || 0);
  if (every > 0) {
    let busy = false;
    setInterval(async () => {
      if (document.hidden || busy) return;
      busy = true;
      try { await refresh(); } catch (e) { if (updated) updated.textContent = `Live: ${e.message}`; }
      finally { busy = false; }
    }, every * 1000);
  }

  async function call(url, body) {
    const response = await fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf || "" },
      body: JSON.stringify(body || {}),
    });
    const answer = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
    return answer;
  }

  // Buttons: <button data-api="/api/v1/..." data-confirm="..." data-done="...">
  document.addEventListener("click", async (event) => {
    const button = event.target.closest("button[data-api]");
    if (!button) return;
    if (button.dataset.confirm && !window.confirm(button.dataset.confirm)) return;
    button.disabled = true;
    try {
      await call(button.dataset.api);
      say(button.dataset.done || "Done");
      await refresh();
    } catch (e) {
      say(e.message, true);
    } finally {
      button.disabled = false;
    }
  });

  // The new-rollout form, turned into the API's JSON.
  const form = document.getElementById("new-rollout");
  form?.addEventListener("submit", async (event) => {
    event.preventDefault();
    const data = new FormData(form);
    const [model, version] = String(data.get("model")).split("@");
    const request = { id: String(data.get("id")).trim(), model, version: Number(version) };
    const target = String(data.get("target"));
    const tags = {};
    for (const pair of String(data.get("tags") || "").split(",").map((s) => s.trim()).filter(Boolean)) {
      const at = pair.indexOf("=");
      if (at < 1) { say(`tag "${pair}" is not key=value`, true); return; }
      tags[pair.slice(0, at).trim()] = pair.slice(at + 1).trim();
    }
    if (target.startsWith("hardware:")) request.hardware = target.slice(9);
    if (Object.keys(tags).length) request.tags = tags;
    if (!request.hardware && !request.tags) request.all = true;
    try {
      request.waves = String(data.get("waves")).split(",").map((s) => s.trim()).filter(Boolean).map((w) => {
        const n = Number(w.replace("%", ""));
        if (!Number.isFinite(n) || n <= 0) throw new Error(`wave "${w}" is not a count or a percentage`);
        return w.endsWith("%") ? { percent: n } : { count: n };
      });
      request.gates = { soak_secs: Number(data.get("soak") || 0), manual_approval: data.get("approval") === "on" };
      const made = await call("/api/v1/rollouts", request);
      location.href = `/ui/rollouts/${encodeURIComponent(made.id || request.id)}`;
    } catch (e) {
      say(e.message, true);
    }
  });
})();
