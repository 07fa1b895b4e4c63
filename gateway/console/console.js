// The lpgw console: reads /console/api/state every 2 s and draws it; actions POST JSON
// with the session's CSRF token. No framework, nothing from elsewhere (the appliance has
// no internet, and the Content-Security-Policy allows only this origin).
"use strict";
let csrf = null;
let page = 0;
let search = "";
let timer = null;
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

function button(label, cls, onClick) {
  const b = text("button", label, cls);
  b.type = "button";
  b.addEventListener("click", onClick);
  return b;
}

const ANSWERS = { 180: "ringing", 603: "603 declined", 486: "486 busy", 480: "480 unreachable",
                  487: "487 cancelled", 503: "503 site unavailable" };

let shown = null;  // the device whose page is open

async function openDevice(token) {
  shown = token;
  const answer = await fetch(`/console/api/device?token=${token}`, { credentials: "same-origin" });
  if (!answer.ok) { $("message").textContent = "that device is gone"; return; }
  const d = await answer.json();
  const facts = $("device-facts");
  facts.replaceChildren();
  fact(facts, "Token", d.token);
  fact(facts, "App", d.topic);
  fact(facts, "User", d.user);
  fact(facts, "Push types", d.push_types.join(", "));
  fact(facts, "Connected", d.transport || "no");
  fact(facts, "Known since", new Date(d.created * 1000).toLocaleString());
  fact(facts, "Last seen", new Date(d.last_seen * 1000).toLocaleString());
  fact(facts, "Queued", d.queued);
  if (d.unregistered) fact(facts, "Unregistered", new Date(d.unregistered * 1000).toLocaleString());
  const list = $("device-pushes");
  list.replaceChildren();
  for (const p of d.pushes) {
    list.append(text("li", `${new Date(p.at * 1000).toLocaleTimeString()} ${p.id}: ${p.fate}`, "fate"));
  }
  if (!d.pushes.length) list.append(text("li", "none lately", "na"));
  $("device").hidden = false;
}

function drawSelftest(test, now) {
  const list = $("checks");
  list.replaceChildren();
  const button = $("run-selftest");
  button.disabled = Boolean(test && test.running);
  if (!test || (!test.at && test.running)) {
    list.append(text("li", test && test.running ? "running…" : "none yet: run it now, or `lpgw selftest` on the box", "na"));
    return;
  }
  list.append(text("li", `${test.ok ? "passed" : "FAILED"} ${ago(now - test.at)}${test.running ? "; running again…" : ""}`,
                   test.ok ? "ok summary" : "failed summary"));
  for (const c of test.checks) {
    const li = text("li", `${c.name}: ${c.detail}`, c.ok === true ? "ok" : c.ok === false ? "failed" : "na");
    if (c.fix) li.append(text("span", c.fix, "fix"));
    list.append(li);
  }
  if (!test.checks.length && test.failed.length) list.append(text("li", `failed: ${test.failed.join(", ")}`, "failed"));
}

function drawCalls(sip, now) {
  const rows = $("call-rows");
  rows.replaceChildren();
  if (!sip) { $("ringing").textContent = "(SIP is off)"; return; }
  const ringing = sip.calls.filter((c) => c.ringing).length;
  $("ringing").textContent = `${sip.calls.length} under way (${ringing} ringing); last ${sip.recent_calls.length}`;
  for (const c of [...sip.recent_calls].reverse()) {
    const tr = document.createElement("tr");
    tr.dataset.call = c.id;
    tr.append(text("td", ago(now - c.ended)), text("td", c.user), text("td", c.from),
              text("td", ANSWERS[c.status] || c.status, "answer"),
              text("td", c.ringing_after === null ? "—" : `${c.ringing_after.toFixed(2)} s`),
              text("td", `${c.seconds.toFixed(1)} s`));
    rows.append(tr);
  }
}

function drawChart(pushes, now) {
  // per minute over the last hour, newest on the right: three bars a minute
  const svg = $("chart");
  svg.replaceChildren();
  if (!pushes || !pushes.accepted) return;
  const series = ["accepted", "delivered", "expired"];
  const minutes = series.map(() => new Array(60).fill(0));
  pushes.at.forEach((at, i) => {
    const m = 59 - Math.floor(Math.max(0, now - at) / 60);
    if (m >= 0) series.forEach((s, k) => { minutes[k][m] += pushes[s][i]; });
  });
  const top = Math.max(1, ...minutes.flat());
  minutes.forEach((values, k) => values.forEach((v, m) => {
    if (!v) return;
    const bar = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    const h = Math.max(1, 110 * v / top);
    bar.setAttribute("class", series[k]);
    bar.setAttribute("x", String(m * 10 + k * 3));
    bar.setAttribute("y", String(115 - h));
    bar.setAttribute("width", "3");
    bar.setAttribute("height", String(h));
    svg.append(bar);
  }));
  const sum = (k) => minutes[k].reduce((a, b) => a + b, 0);
  $("push-totals").textContent = `${sum(0)} accepted, ${sum(1)} delivered, ${sum(2)} expired`;
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
  if (g.certificate) fact(facts, "Certificate expires", `${new Date(g.certificate.expires * 1000).toLocaleDateString()} (in ${Math.round((g.certificate.expires - state.now) / 86400)} days)`);
  drawSelftest(g.selftest, state.now);
  fact(facts, "Gateway id", g.gateway_id);
  fact(facts, "Up for", ago(g.uptime).replace(" ago", ""));
  fact(facts, "Pin", g.pin);
  if (g.listen) fact(facts, "Devices on", `${g.listen.host} port ${g.listen.port} (${g.listen.transports.join(", ")})`);
  const net = g.network || {};
  fact(facts, "Bonjour", net.advertising ? `advertising on ${(net.addresses || []).join(", ")}` : `not advertising: ${net.reason || "off"}`);
  if (g.storage) fact(facts, "Disk", g.storage.free_mib !== undefined ? `${g.storage.free_mib} MiB free` : "unknown");
  if (g.clock) fact(facts, "Clock", `${g.clock.synchronised === true ? "synchronised" : g.clock.synchronised === false ? "NOT synchronised" : "unknown"}; ${g.clock.steps} steps seen`);
  const pbx = g.sip && g.sip.pbx;
  if (pbx) fact(facts, "PBX", `${pbx.pbx}: ${pbx.reachable ? "answers" : "does not answer"}; ` +
    pbx.registrations.map((r) => `${r.user} ${r.state}`).join(", "));
  drawCalls(g.sip, state.now);
  drawChart(state.pushes, state.now);
  const c = g.devices.connected;
  $("connected").textContent = `${c.quic + c.tls} connected (QUIC ${c.quic}, TLS ${c.tls}); ${state.devices.total} known`;
  const rows = $("device-rows");
  rows.replaceChildren();
  for (const d of state.devices.items) {
    const tr = document.createElement("tr");
    tr.dataset.token = d.token;
    const tokenCell = text("td", "", "token");
    tokenCell.append(button(d.token.slice(0, 12) + "…", "open-device", () => openDevice(d.token)));
    tr.append(tokenCell, text("td", d.topic),
              text("td", d.user), text("td", d.transport || "no"),
              text("td", ago(state.now - d.last_seen)), text("td", d.queued),
              text("td", d.last_push ? `${d.last_push.fate}, ${ago(state.now - d.last_push.at)}` : "—", "last-push"));
    const actions = document.createElement("td");
    actions.className = "actions";
    actions.append(
      button("Test push", "test-push", () => act("/console/api/push", { token: d.token }, "test push")),
      button(d.user ? "Unbind" : "Bind user", "bind", () => {
        const user = d.user ? null : window.prompt("SIP user to bind this device to", "");
        if (d.user || user) act("/console/api/bind", { token: d.token, user }, d.user ? "unbind" : "bind");
      }));
    if (d.transport) {
      actions.append(button("Disconnect", "disconnect",
        () => act("/console/api/disconnect", { token: d.token }, "disconnect")));
    }
    tr.append(actions);
    rows.append(tr);
  }
  const pages = Math.max(1, Math.ceil(state.devices.total / state.devices.page_size));
  $("page").textContent = `page ${state.devices.page + 1} of ${pages}`;
  $("prev").disabled = state.devices.page === 0;
  $("next").disabled = state.devices.page + 1 >= pages;
  $("updated").textContent = new Date(state.now * 1000).toLocaleTimeString();
  if (shown) openDevice(shown);
}

async function refresh() {
  if (timer === null && csrf !== null) return;  // signing out
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
  $("message").textContent = answer.ok
    ? `${what}: ${reply.message || "done"}${reply.push_id ? ` (${reply.push_id})` : ""}`
    : `${what}: refused, ${reply.reason || ""}: ${reply.message}`;
  refresh();
  return reply;
}

document.addEventListener("DOMContentLoaded", () => {
  $("close-device").addEventListener("click", () => { shown = null; $("device").hidden = true; });
  $("run-selftest").addEventListener("click", () => act("/console/api/selftest", {}, "self-test"));
  $("search").addEventListener("input", (e) => { search = e.target.value; page = 0; refresh(); });
  $("prev").addEventListener("click", () => { page = Math.max(0, page - 1); refresh(); });
  $("next").addEventListener("click", () => { page += 1; refresh(); });
  $("sign-out").addEventListener("click", async () => {
    clearInterval(timer);  // no poll may race the navigation below
    timer = null;
    await fetch("/console/api/sign-out", {
      method: "POST", credentials: "same-origin",
      headers: { "content-type": "application/json", "x-csrf-token": csrf || "" }, body: "{}" });
    window.location = "/console/sign-in";
  });
  refresh();
  timer = setInterval(refresh, 2000);
});
