// The live page of one mcnp node: read-only, served by the daemon, talking only to the
// daemon's own REST endpoint. It polls: the tables revision every second (a new one
// reloads the matrix and the cluster status), the recent verdicts every two seconds.
"use strict";

const state = { revision: null, compiled: null, namespaces: null, chosen: new Set(), lastSeq: 0 };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

async function get(path, params) {
  const query = params ? "?" + new URLSearchParams(params).toString() : "";
  const r = await fetch(path + query, { cache: "no-store" });
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

function yesNo(v) { return el("span", { class: v ? "yes" : "no" }, v ? "yes" : "no"); }

async function refreshClusters() {
  const body = await get("/v1/clusters");
  document.getElementById("node").textContent = body.node;
  document.getElementById("local-cluster").textContent = body.local_cluster;
  const rows = body.clusters.map(c => el("tr", {},
    el("td", {}, c.name + (c.local ? " (local)" : "")), el("td", {}, c.source),
    el("td", {}, yesNo(c.synced)), el("td", {}, yesNo(c.connected)), el("td", {}, c.stale ? "stale" : "—"),
    el("td", {}, c.counts.namespaces), el("td", {}, c.counts.pods), el("td", {}, c.counts.policies),
    el("td", {}, c.rejected), el("td", { class: c.last_error ? "error" : "muted" }, c.last_error || "—")));
  document.querySelector("#clusters tbody").replaceChildren(...rows);
  const ready = await fetch("/readyz", { cache: "no-store" });
  document.getElementById("ready").replaceChildren(yesNo(ready.ok));
}

function namespaceChoices(all) {
  if (state.namespaces !== null && state.namespaces.join() === all.join()) return;
  if (state.namespaces === null) all.forEach(ns => state.chosen.add(ns));
  state.namespaces = all;
  const box = document.getElementById("matrix-namespaces");
  const labels = all.map(ns => {
    const input = el("input", { type: "checkbox", value: ns });
    input.checked = state.chosen.has(ns);
    input.addEventListener("change", () => {  // the form's change handler redraws
      if (input.checked) state.chosen.add(ns); else state.chosen.delete(ns);
    });
    return el("label", {}, input, " " + ns);
  });
  box.replaceChildren(el("legend", {}, "namespaces"), ...labels);
}

async function refreshMatrix() {
  const port = document.getElementById("matrix-port").value || "80";
  const protocol = document.getElementById("matrix-protocol").value;
  const params = { port, protocol };
  if (state.namespaces !== null) params.namespace = [...state.chosen].join(",") || "-";
  const body = await get("/v1/matrix", params);
  namespaceChoices(body.namespaces);
  const head = el("tr", {}, el("th", {}, `${body.protocol}/${body.port}`),
    ...body.pods.map(p => el("th", { class: "col" }, p)));
  const rows = body.pods.map((src, i) => el("tr", {}, el("th", {}, src),
    ...body.pods.map((dst, j) => {
      const ok = body.allowed[i][j];
      const cell = el("td", { class: "cell " + (ok ? "allow" : "deny"), "data-from": src, "data-to": dst,
                              "data-allowed": String(ok), title: `${src} → ${dst}` }, ok ? "●" : "✕");
      cell.addEventListener("click", () => explainPair(src, dst, body.port, body.protocol, cell));
      return cell;
    })));
  const table = el("table", { "data-revision": String(body.revision) }, el("thead", {}, head), el("tbody", {}, ...rows));
  document.getElementById("matrix").replaceChildren(body.pods.length ? table : el("p", { class: "muted" }, "no pods chosen"));
}

async function explainPair(src, dst, port, protocol, cell) {
  document.querySelectorAll("#matrix td.chosen").forEach(c => c.classList.remove("chosen"));
  if (cell) cell.classList.add("chosen");
  document.getElementById("explain-from").value = src;
  document.getElementById("explain-to").value = dst;
  document.getElementById("explain-port").value = port;
  document.getElementById("explain-protocol").value = protocol;
  const v = await get("/v1/explain", { from: src, to: dst, port, protocol });
  const side = (name, s) => el("div", { class: "side" },
    el("b", {}, name + " "), el("span", { class: s.allowed ? "allow" : "deny" }, s.allowed ? "allow" : "deny"),
    ` (${s.cluster ? "enforced by " + s.cluster : "not enforced"}) ${s.reason}`);
  document.getElementById("explain").replaceChildren(
    el("div", { class: "verdict " + (v.allowed ? "allow" : "deny"), id: "explain-verdict" },
      `${src} → ${dst} ${protocol}/${port}: ${v.allowed ? "ALLOWED" : "DENIED"}`),
    side("egress", v.egress), side("ingress", v.ingress));
}

function why(r) {
  if (r.policy) return `by ${r.policy} ${r.policy_rule || ""}`;
  if (r.policies && r.policies.length) return `${r.reason} (${r.policies.join(", ")})`;
  return r.reason;
}

async function refreshVerdicts() {
  const params = { limit: "50" };
  if (document.getElementById("verdicts-denied-only").checked) params.verdict = "denied,would-deny";
  const body = await get("/v1/verdicts", params);
  const note = !body.dataplane ? "(no pod ports on this node: nothing is recorded)"
    : !body.recording ? "(this dataplane keeps no verdict records)" : body.lost ? `(${body.lost} lost)` : "";
  document.getElementById("verdicts-note").textContent = note;
  const rows = body.verdicts.slice().reverse().map(r => el("tr", {},
    el("td", {}, new Date(r.time * 1000).toISOString().slice(11, 23)),
    el("td", { class: r.verdict === "allowed" ? "allow" : "deny" }, r.verdict), el("td", {}, r.direction),
    el("td", {}, (r.src_pod || r.src) + ":" + r.sport), el("td", {}, r.dst_pod || r.dst),
    el("td", {}, `${r.protocol}/${r.dport}`), el("td", {}, why(r)), el("td", {}, r.revision)));
  document.querySelector("#verdicts tbody").replaceChildren(...rows);
}

async function refreshTables() {
  const t = await get("/v1/tables");
  document.getElementById("revision").textContent = t.revision;
  document.getElementById("compiled-revision").textContent = t.compiled_revision ?? "—";
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  if (t.revision !== state.revision) {
    state.revision = t.revision;
    await Promise.all([refreshClusters(), refreshMatrix()]);
  }
}

function showError(where) {
  return e => {
    const target = document.getElementById(where);
    if (target) target.replaceChildren(el("p", { class: "error" }, String(e.message || e)));
  };
}

function every(ms, fn, where) {
  const tick = () => fn().catch(showError(where)).finally(() => setTimeout(tick, ms));
  tick();
}

document.getElementById("matrix-form").addEventListener("change", () => refreshMatrix().catch(showError("matrix")));
document.getElementById("explain-form").addEventListener("submit", ev => {
  ev.preventDefault();
  explainPair(document.getElementById("explain-from").value, document.getElementById("explain-to").value,
              document.getElementById("explain-port").value, document.getElementById("explain-protocol").value, null)
    .catch(showError("explain"));
});
every(1000, refreshTables, "matrix");
every(2000, refreshVerdicts, "verdicts-note");
