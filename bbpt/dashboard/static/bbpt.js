// bbpt dashboard: three pages (studies, study, compare), each drawn from the JSON the server sends and
// redrawn when /api/version says storage changed. No framework, no build step; plots are plotly's SVG traces.
// Loaded in <head>, before plotly.js: it asks for the page's first data at once (see EARLY), and draws the page
// when the document (plotly.js included, deferred) has been parsed.
"use strict";

const P = JSON.parse(document.documentElement.dataset.params);
const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                "#bcbd22", "#17becf"];
const $ = (sel) => document.querySelector(sel);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;",
                                                               '"': "&quot;", "'": "&#39;"}[c]));
const pct = (v) => (v === null || v === undefined) ? "-" : (100 * v).toFixed(1);
const num = (v, d = 4) => (v === null || v === undefined) ? "-" : Number(v).toFixed(d);
const studyUrl = (name) => "/study/" + name.split("/").map(encodeURIComponent).join("/");
const apiStudy = (name) => "/api/study/" + name.split("/").map(encodeURIComponent).join("/");

async function getJSON(url) {
  const r = await fetch(url, {cache: "no-store"});
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

// The first responses a page needs, requested while the browser is still parsing plotly.js (most of a drawing
// page's load time), so the server's work overlaps it. Each data URL is requested only after its page's version
// has answered, so the version a page starts from is never newer than its data (no change can be missed).
const EARLY = new Map();

function prefetch(versionUrl, urls) {
  const keep = (url, promise) => { promise.catch(() => {}); EARLY.set(url, promise); return promise; };
  const version = keep(versionUrl, getJSON(versionUrl));
  for (const url of urls) keep(url, version.then(() => getJSON(url)));
}

// A prefetched response, once; after that (or for any other URL) a fresh request.
function take(url) {
  const early = EARLY.get(url);
  EARLY.delete(url);
  return early || getJSON(url);
}

function showError(e) {
  const f = $("#error");
  f.hidden = !e;
  f.textContent = e ? String(e.message || e) : "";
  $("#live").classList.toggle("stale", !!e);
}

// Poll a version URL; call refresh() once at start and again whenever the version changes.
function live(versionUrl, refresh) {
  let last = null;
  async function tick() {
    try {
      const v = JSON.stringify(await take(versionUrl));
      if (v !== last) { last = v; await refresh(); }
      showError(null);
    } catch (e) { showError(e); }
    setTimeout(tick, P.poll);
  }
  tick();
}

function table(head, rows, leftCols = 1) {
  const th = head.map((h, i) => `<th class="${i < leftCols ? "l" : ""}">${esc(h)}</th>`).join("");
  const trs = rows.map((r) => "<tr>" + r.map((c, i) => `<td class="${i < leftCols ? "l" : ""}">${c}</td>`).join("") + "</tr>");
  return `<table><thead><tr>${th}</tr></thead><tbody>${trs.join("")}</tbody></table>`;
}

const LAYOUT = (xtitle, ytitle) => ({
  margin: {l: 60, r: 10, t: 30, b: 45}, xaxis: {title: {text: xtitle}}, yaxis: {title: {text: ytitle}},
  legend: {font: {size: 10}}, hovermode: "closest",
});
const CONFIG = {displaylogo: false, responsive: true, staticPlot: false};
const XLABEL = {calls: "calls", seconds: "seconds (scoring, backward included)", tokens: "tokens"};

function draw(id, traces, layout) {
  Plotly.react(id, traces, layout, CONFIG);
}

// ---- studies -----------------------------------------------------------------------------------------------
function studiesPage() {
  $("#crumbs").textContent = "studies";
  const main = $("#main");
  main.innerHTML = `<h2 id="count"></h2><div id="speclinks"></div>
    <div class="controls"><button id="cmp" disabled>compare selected</button></div><div id="list"></div>
    <div id="queue"></div>`;
  if (P.spec) {
    $("#speclinks").innerHTML = `spec <code>${esc(P.spec)}</code>, compare its arms on: ` +
      P.tasks.map((t) => `<a href="/compare?task=${encodeURIComponent(t)}">${esc(t)}</a>`).join(" · ");
  }
  const picked = new Set();
  $("#cmp").onclick = () => {
    location.href = "/compare?" + [...picked].map((n) => "study=" + encodeURIComponent(n)).join("&");
  };
  live("/api/version", async () => {
    const rows = await take("/api/studies");
    $("#count").textContent = `${rows.length} ${rows.length === 1 ? "study" : "studies"}`;
    const body = rows.map((s) => [
      `<input type="checkbox" data-name="${esc(s.name)}" ${picked.has(s.name) ? "checked" : ""}>`,
      `<a href="${studyUrl(s.name)}">${esc(s.name)}</a>`, esc(s.task), esc(s.optimizer),
      `<span class="state-${esc(s.state)}">${esc(s.state)}</span>`, `${s.calls} / ${s.budget}`,
      num(s.best_loss), pct(s.dev), pct(s.test)]);
    $("#list").innerHTML = table(["", "study", "task", "optimizer", "state", "calls / budget", "best train loss",
                                  "dev %", "test %"], body, 4);
    const q = await take("/api/queue");   // claims and queued work: who runs what (bbpt worker)
    const open = q.rows.filter((r) => r.state !== "done");
    $("#queue").innerHTML = !q.rows.length ? "" :
      `<h2>work: ${open.length} open, ${q.rows.length - open.length} done</h2>` + (open.length ? table(
        ["study", "spec", "state", "held by", "lease left (s)", "claims"],
        open.map((r) => [esc(r.name), esc(r.spec), esc(r.state), esc(r.worker || "-"),
                         r.lease_left === null ? "-" : r.lease_left.toFixed(0), r.runs]), 4) : "");
    document.querySelectorAll("#list input[type=checkbox]").forEach((box) => {
      box.onchange = () => {
        box.checked ? picked.add(box.dataset.name) : picked.delete(box.dataset.name);
        $("#cmp").disabled = picked.size < 1;
      };
    });
  });
}

// ---- one study ---------------------------------------------------------------------------------------------
const TRIALS_PER_PAGE = 50;
const trialsUrl = (name, offset) => `${apiStudy(name)}/trials?offset=${offset}&limit=${TRIALS_PER_PAGE}`;
const studyVersionUrl = (name) => `/api/version?study=${encodeURIComponent(name)}`;

function studyPage() {
  const name = P.study;
  $("#crumbs").textContent = "/ " + name;
  $("#main").innerHTML = `<h2>${esc(name)} <span id="state"></span></h2><div id="facts" class="note"></div>
    <div class="controls">x axis: ${["calls", "seconds", "tokens"].map((a) =>
      `<label><input type="radio" name="axis" value="${a}" ${a === "calls" ? "checked" : ""}> ${a}</label>`).join(" ")}
    </div>
    <div class="plots"><div id="plot-loss" class="plot"></div><div id="plot-dev" class="plot"></div></div>
    <div id="shown" class="note"></div>
    <h3>Selected prompt</h3><div id="card" class="card muted">-</div>
    <h3>Trials</h3><div class="controls"><button id="prev">previous</button> <span id="range"></span>
      <button id="next">next</button></div><div id="trials"></div>`;
  let axis = "calls", d = null, offset = 0, cardShown = false;
  document.querySelectorAll("input[name=axis]").forEach((r) => {
    r.onchange = () => { axis = r.value; plots(); };
  });
  function plots() {
    if (!d) return;
    const metric = d.metric === "f1" ? "macro-F1" : "accuracy";
    draw("plot-loss", [
      {x: d.raw[axis], y: d.raw.y, mode: "markers", type: "scatter", name: "each trial",
       marker: {size: 3, color: "rgba(31,119,180,0.35)"}},
      {x: d.best_loss[axis], y: d.best_loss.y, mode: "lines", type: "scatter", line: {shape: "hv", color: COLORS[0]},
       name: "best so far"},
    ], Object.assign(LAYOUT(XLABEL[axis], "train loss"), {title: {text: "train loss", font: {size: 13}}}));
    const traces = [
      {x: d.dev[axis], y: d.dev.y, mode: "markers", type: "scatter", name: "dev, each check",
       marker: {size: 5, color: COLORS[1]}},
      {x: d.dev[axis], y: d.dev.best, mode: "lines", type: "scatter", name: "dev, best so far",
       line: {shape: "hv", color: COLORS[1]}},
    ];
    if (d.test.y.length) {
      traces.push({x: d.test[axis], y: d.test.y, mode: "lines+markers", type: "scatter", line: {shape: "hv",
        color: COLORS[2], dash: "dot"}, name: "test of dev's choice (not used for selection)"});
    }
    draw("plot-dev", traces, Object.assign(LAYOUT(XLABEL[axis], metric), {title: {text: "dev " + metric,
      font: {size: 13}}}));
    $("#shown").textContent = `showing ${d.raw.shown} of ${d.raw.of} trials as points; the best-so-far line ` +
      `passes through all ${d.best_loss.y.length} of its changes`;
  }
  async function trials() {
    const t = await take(trialsUrl(name, offset));
    $("#range").textContent = t.total ? `${t.offset + 1}–${t.offset + t.rows.length} of ${t.total}` : "none yet";
    $("#prev").disabled = offset === 0;
    $("#next").disabled = offset + TRIALS_PER_PAGE >= t.total;
    $("#trials").innerHTML = table(["trial", "generation", "loss", "accuracy", "batch", "calls", "tokens", "seconds"],
      t.rows.map((r) => [r.number, r.generation, num(r.loss), pct(r.accuracy), r.batch ?? "", r.calls, r.tokens,
                         num(r.seconds, 3)]));
  }
  $("#prev").onclick = () => { offset = Math.max(0, offset - TRIALS_PER_PAGE); trials(); };
  $("#next").onclick = () => { offset += TRIALS_PER_PAGE; trials(); };
  async function card() {
    const c = await getJSON(`${apiStudy(name)}/card`);   // never prefetched: it may load a model
    if (!c.available) { $("#card").textContent = c.reason; return; }
    cardShown = true;
    const s = c.scores, m = s.metric;
    let h = `<p>dev ${esc(m)} <b>${pct((s.dev || {})[m])}</b> (selected on it) · test ${esc(m)} ` +
      `<b>${pct((s.test || {})[m])}</b> <span class="note">(${esc(s.test_note)})</span> · depth ${esc(c.depth)}</p>`;
    if (c.kind === "text") {
      h += `<p>text: <code>${esc(c.text)}</code></p>`;
    } else {
      h += table(["position", "norm", "norm percentile", "drift from P0", "nearest tokens (cosine)"],
        c.tokens.map((t) => [t.position, num(t.norm, 3), num(t.norm_percentile, 1), t.drift === undefined ? "-" :
          num(t.drift, 2), t.nearest.map((n) => `<code>${esc(JSON.stringify(n.token))}</code> ${num(n.cosine, 2)}`)
          .join(", ")]), 5);
      h += `<p>nearest-token hard prompt: <code>${esc(JSON.stringify(c.hard_prompt))}</code>
        <span class="note">(its dev score costs calls: <code>bbpt inspect ${esc(c.path)} --score-hard</code>)</span></p>`;
    }
    $("#card").innerHTML = h;
    $("#card").classList.remove("muted");
  }
  live(studyVersionUrl(name), async () => {
    d = await take(apiStudy(name));
    $("#state").innerHTML = `<span class="state-${esc(d.state)}">${esc(d.state)}</span>`;
    const c = d.config;
    $("#facts").textContent = `${c.task || c.data} · ${d.optimizer} · ${d.trials} trials · budget ${d.budget} calls · ` +
      `model ${d.model} · bbpt ${d.bbpt_version}` + (d.selected.test !== null ?
      ` · selected prompt: dev ${pct(d.selected.dev)}, test ${pct(d.selected.test)}` : "");
    plots();
    await trials();
    if (!cardShown) await card();
  });
}

// ---- compare -----------------------------------------------------------------------------------------------
const compareUrl = () => "/api/compare?" + (P.studies.length ?
  P.studies.map((n) => "study=" + encodeURIComponent(n)).join("&") : "task=" + encodeURIComponent(P.task || ""));

function comparePage() {
  $("#crumbs").textContent = "/ compare";
  $("#main").innerHTML = `<h2 id="title">compare</h2><div id="tasks"></div><div id="table"></div>
    <div class="plots" id="plots"></div><p class="note">Bands: mean over seeds (line), min to max (shaded),
    each seed faint; dashed lines are arms with no search (their mean).</p>`;
  if (!P.studies.length && P.spec) {
    $("#tasks").innerHTML = "task: " + P.tasks.map((t) => t === P.task ? `<b>${esc(t)}</b>` :
      `<a href="/compare?task=${encodeURIComponent(t)}">${esc(t)}</a>`).join(" · ");
  }
  live("/api/version", async () => {
    const d = await take(compareUrl());
    $("#title").textContent = d.kind === "spec" ? `${d.spec}: ${d.task}` : "compare studies";
    $("#table").innerHTML = table(d.head, d.rows.map((r) => r.map(esc)), d.kind === "spec" ? 2 : 3);
    const box = $("#plots");
    box.innerHTML = "";
    const panels = d.kind === "spec" ? d.panels : [{split: "dev", lines: d.lines}];
    for (const panel of panels) {
      for (const axis of d.axes) {
        const id = `plot-${panel.split}-${axis}`;
        const div = document.createElement("div");
        div.id = id; div.className = "plot";
        box.appendChild(div);
        draw(id, panel.lines ? studyTraces(panel.lines, axis) : bandTraces(panel, axis),
             Object.assign(LAYOUT(XLABEL[axis], panel.split === "dev" ? "best dev score so far" :
                                  "test of dev's choice so far"), {title: {text: `${panel.split} against ${axis}`,
                                                                           font: {size: 13}}}));
      }
    }
  });
}

function studyTraces(lines, axis) {
  return lines.map((l, i) => ({x: l[axis].x, y: l[axis].y, mode: "lines", type: "scatter", name: l.name,
                               meta: "study", line: {shape: "hv", color: COLORS[i % 10]}}));
}

function bandTraces(panel, axis) {
  const traces = [];
  const xs = [];
  panel.arms.forEach((a, i) => {
    const b = a[axis];
    if (!b) return;
    const color = COLORS[i % 10];
    xs.push(...b.x);
    for (const s of b.seeds) {
      traces.push({x: s.x, y: s.y, mode: "lines", type: "scatter", showlegend: false, hoverinfo: "skip",
                   meta: "seed", line: {shape: "hv", color, width: 1}, opacity: 0.25});
    }
    traces.push({x: b.x, y: b.lo, mode: "lines", type: "scatter", line: {shape: "hv", width: 0, color},
                 showlegend: false, hoverinfo: "skip", meta: "band-lo"});
    traces.push({x: b.x, y: b.hi, mode: "lines", type: "scatter", fill: "tonexty", line: {shape: "hv", width: 0,
                 color}, fillcolor: color + "22", showlegend: false, hoverinfo: "skip", meta: "band"});
    traces.push({x: b.x, y: b.mean, mode: "lines", type: "scatter", name: `${a.arm} (${a.seeds})`, meta: "mean",
                 line: {shape: "hv", color}});
  });
  const lo = xs.length ? Math.min(...xs) : 0, hi = xs.length ? Math.max(...xs) : 1;
  panel.levels.forEach((l, k) => {
    traces.push({x: [lo, hi], y: [l.value, l.value], mode: "lines", type: "scatter", name: `${l.arm} (mean)`,
                 meta: "level", line: {dash: "dash", width: 1, color: COLORS[(panel.arms.length + k) % 10]}});
  });
  return traces;
}

const PAGES = {
  studies: {draw: studiesPage, first: () => prefetch("/api/version", ["/api/studies", "/api/queue"])},
  // (not the prompt card: it may load a model's embedding table, and is asked for once the curves are drawn)
  study: {draw: studyPage, first: () => prefetch(studyVersionUrl(P.study), [apiStudy(P.study), trialsUrl(P.study, 0)])},
  compare: {draw: comparePage, first: () => prefetch("/api/version", [compareUrl()])},
};
PAGES[P.page].first();
document.addEventListener("DOMContentLoaded", PAGES[P.page].draw);
