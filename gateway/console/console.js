// The lpgw console: reads /console/api/state every 2 s and draws it; actions POST JSON
// with the session's CSRF token. No framework, nothing from elsewhere (the appliance has
// no internet, and the Content-Security-Policy allows only this origin).
"use strict";
let csrf = null;
let page = 0;
let search = "";
const $ = (id) => document.getElementById(id);

function text(tag, value, cls) {
  const el = document.createElement(tag);
  el.textContent = value === null || value === undefined ? "—" : String(value);
  if (cls) el.className = cls;
  return el;
}

function ago(seconds) {
  if (seconds < 90) return `${Math.round(seconds)} s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 172800) return `${Math.round(seconds / 3600)} h ago`;
  return `${Math.round(seconds / 86400)} days ago`;
}

function fact(list, name, value) {
  list.append(text("dt", name), text("dd", value));
}

function draw(state) {
  csrf = state.csrf;
  const g = state.gateway;
  $("name").textContent = g.name || "";
  const ok = g.storage ? g.storage.ok : true;
  $("health").textContent = ok ? "healthy" : "storage failing";
  $("health").className = "badge " + (ok ? "ok" : "bad");
  const facts = $("facts");
  facts.replaceChildren();
  fact(facts, "Version", g.version);
  fact(facts, "Gateway id", g.gateway_id);
  fact(facts, "Up for", ago(g.uptime).replace(" ago", ""));
  fact(facts, "Pin", g.pin);
  if (g.listen) fact(facts, "Devices on", `${g.listen.host} port ${g.listen.port} (${g.listen.transports.join(", ")})`);
  const net = g.network || {};
  fact(facts, "Bonjour", net.advertising ? `advertising on ${(net.addresses || []).join(", ")}` : `not advertising: ${net.reason || "off"}`);
  if (g.storage) fact(facts, "Disk", g.storage.free_mib !== undefined ? `${g.storage.free_mib} MiB free` : "unknown");
  if (g.clock) fact(facts, "Clock steps", g.clock.steps);
  const c = g.devices.connected;
  $("connected").textContent = `${c.quic + c.tls} connected (QUIC ${c.quic}, TLS ${c.tls}); ${state.devices.total} known`;
  const rows = $("device-rows");
  rows.replaceChildren();
  for (const d of state.devices.items) {
    const tr = document.createElement("tr");
    tr.dataset.token = d.token;
    tr.append(text("td", d.token.slice(0, 12) + "…", "token"), text("td", d.topic),
              text("td", d.user), text("td", d.transport || "no"),
              text("td", ago(state.now - d.last_seen)), text("td", d.queued));
    const actions = document.createElement("td");
    const push = text("button", "Test push");
    push.type = "button";
    push.className = "test-push";
    push.addEventListener("click", () => act("/console/api/push", { token: d.token }, "test push"));
    actions.append(push);
    tr.append(actions);
    rows.append(tr);
  }
  const pages = Math.max(1, Math.ceil(state.devices.total / state.devices.page_size));
  $("page").textContent = `page ${state.devices.page + 1} of ${pages}`;
  $("prev").disabled = state.devices.page === 0;
  $("next").disabled = state.devices.page + 1 >= pages;
  $("updated").textContent = new Date(state.now * 1000).toLocaleTimeString();
}

async function refresh() {
  const query = new URLSearchParams({ q: search, page: String(page) });
  try {
    const answer = await fetch(`/console/api/state?${query}`, { credentials: "same-origin" });
    if (answer.status === 401) { window.location = "/console/sign-in"; return; }
    draw(await answer.json());
  } catch (err) {
    $("message").textContent = `The gateway does not answer: ${err}`;
  }
}

async function act(path, body, what) {
  const answer = await fetch(path, {
    method: "POST", credentials: "same-origin",
    headers: { "content-type": "application/json", "x-csrf-token": csrf || "" },
    body: JSON.stringify(body),
  });
  const reply = await answer.json();
  $("message").textContent = answer.ok ? `${what}: done (${reply.push_id || "ok"})`
                                       : `${what}: refused, ${reply.reason}: ${reply.message}`;
  refresh();
  return reply;
}

document.addEventListener("DOMContentLoaded", () => {
  $("search").addEventListener("input", (e) => { search = e.target.value; page = 0; refresh(); });
  $("prev").addEventListener("click", () => { page = Math.max(0, page - 1); refresh(); });
  $("next").addEventListener("click", () => { page += 1; refresh(); });
  $("sign-out").addEventListener("click", async () => {
    await act("/console/api/sign-out", {}, "sign out");
    window.location = "/console/sign-in";
  });
  refresh();
  setInterval(refresh, 2000);
});
