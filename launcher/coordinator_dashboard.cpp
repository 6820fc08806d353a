// The coordinator's dashboard page (served at GET / by launcher/coordinator_http.cpp): one self-contained HTML
// document, inline CSS and JavaScript, no external resources. The script builds every element with createElement
// and textContent (never innerHTML), so no string of the status document is ever parsed as markup.
#include "launcher/coordinator_http.h"

namespace moe::launcher {
namespace {

constexpr std::string_view kPage = R"PAGE(<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>moe coordinator</title>
<style>
:root {
  --bg: #f4f5f7; --card: #ffffff; --text: #1c2230; --muted: #687083; --line: #e4e7ec; --grid: #eef0f3;
  --good: #1e9e57; --warn: #d98a06; --bad: #d4412f; --idle: #8b93a5; --info: #2f6fdb; --accent: #2f6fdb;
}
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--text);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
.mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", monospace; }
#error { display: none; padding: 9px 20px; background: #fdecea; color: #8c1d12; border-bottom: 1px solid #f3c3bc; }
body[data-state="error"] #error { display: block; }
header#job { background: var(--card); border-bottom: 1px solid var(--line); padding: 14px 20px 12px; }
.titlebar { display: flex; align-items: center; gap: 10px; flex-wrap: wrap; }
.titlebar h1 { font-size: 17px; margin: 0 6px 0 0; font-weight: 650; }
.titlebar .jobid { font-size: 15px; color: var(--muted); }
.titlebar .updated { margin-left: auto; color: var(--muted); font-size: 12px; }
.stats { display: flex; flex-wrap: wrap; gap: 8px 28px; margin-top: 10px; }
.stat .label { font-size: 11px; text-transform: uppercase; letter-spacing: .05em; color: var(--muted); }
.stat .value { font-size: 18px; font-weight: 600; font-variant-numeric: tabular-nums; white-space: nowrap; }
.stat .sub { font-size: 12px; color: var(--muted); white-space: nowrap; }
.stat .value.small { font-size: 14px; font-weight: 500; padding-top: 3px; max-width: 360px; overflow: hidden;
  text-overflow: ellipsis; }
.progress { width: 140px; height: 5px; background: var(--grid); border-radius: 3px; margin-top: 4px; overflow: hidden; }
.progress > div { height: 100%; background: var(--accent); }
main { display: grid; grid-template-columns: minmax(0, 3fr) minmax(0, 2fr); gap: 16px; padding: 16px 20px 24px; }
section.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px 14px;
  min-width: 0; }
section.wide { grid-column: 1 / -1; }
h2 { font-size: 12px; text-transform: uppercase; letter-spacing: .06em; color: var(--muted); margin: 0 0 8px;
  font-weight: 650; }
h2 .count { font-weight: 500; margin-left: 6px; letter-spacing: 0; text-transform: none; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { padding: 5px 10px; text-align: right; border-bottom: 1px solid var(--line); white-space: nowrap; }
th { font-size: 12px; font-weight: 600; color: var(--muted); border-bottom-color: #d5d9e0; }
tbody tr:last-child td { border-bottom: none; }
tbody tr:hover td { background: #f8f9fb; }
th.text, td.text { text-align: left; }
#replicas table { width: auto; min-width: 50%; }
td.wrap { white-space: normal; min-width: 220px; }
.pill { display: inline-block; min-width: 58px; text-align: center; padding: 1px 9px; border-radius: 10px;
  font-size: 12px; font-weight: 600; color: #fff; background: var(--idle); }
.pill.good { background: var(--good); } .pill.warn { background: var(--warn); } .pill.bad { background: var(--bad); }
.pill.info { background: var(--info); } .pill.idle { background: var(--idle); }
.none { color: var(--muted); font-style: italic; margin: 4px 0; }
.fail { color: var(--bad); margin: 4px 0; }
svg text { font-size: 11px; fill: var(--muted); font-variant-numeric: tabular-nums; }
svg .axis { stroke: #c3c8d1; stroke-width: 1; }
svg .gridline { stroke: var(--grid); stroke-width: 1; }
svg .loss-line { fill: none; stroke: var(--accent); stroke-width: 1.8; stroke-linejoin: round; }
svg .last { fill: var(--accent); }
svg text.strong { fill: var(--text); font-weight: 600; }
svg .cursor { stroke: #9aa3b2; stroke-dasharray: 3 3; }
svg rect.cell { shape-rendering: crispEdges; }
svg rect.cell:hover { stroke: var(--text); stroke-width: 1.5; }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
pre { margin: 0; font-size: 12px; white-space: pre-wrap; word-break: break-all; }
</style>
</head>
<body data-updated="0" data-state="loading">
<div id="error" role="alert"></div>
<header id="job"><div class="titlebar"><h1>moe coordinator</h1><span class="updated">loading&hellip;</span></div>
</header>
<main>
  <section class="card"><h2>Loss</h2><div id="loss-chart"></div></section>
  <section class="card"><h2>Expert load</h2><div id="expert-heatmap"></div></section>
  <section class="card wide"><h2>Ranks</h2><div id="ranks" class="scroll"></div></section>
  <section class="card wide"><h2>Restart events</h2><div id="events" class="scroll"></div></section>
  <section class="card wide"><h2>Replicas</h2><div id="replicas" class="scroll"></div></section>
  <section class="card wide" id="other-card" hidden><h2>Other fields</h2><div id="other"></div></section>
</main>
<script>
'use strict';
const REFRESH_MS = 1000, TIMEOUT_MS = 4000, MAX_POINTS = 1500;
const SVGNS = 'http://www.w3.org/2000/svg';
const KEY = new URLSearchParams(location.search).get('key');
const HEALTH = {ok: 'good', starting: 'idle', loading: 'idle', draining: 'warn', lost: 'bad', hung: 'bad',
                exited: 'bad', failed: 'bad', down: 'bad'};
const STATES = {starting: 'idle', running: 'good', restarting: 'warn', stopping: 'warn', finished: 'info',
                failed: 'bad'};
const KINDS = {start: 'info', failure: 'bad', resize: 'warn', checkpoint: 'idle', finish: 'good', error: 'bad'};
const HEAT = [[255, 255, 204], [255, 237, 160], [254, 217, 118], [254, 178, 76], [253, 141, 60], [252, 78, 42],
              [227, 26, 28], [177, 0, 38]];  // YlOrRd: pale = few tokens, dark red = many
let refreshes = 0, lastDoc = null, lastOkAt = 0;

// ---- building blocks ----

function node(ns, tag, attrs, children) {
  const e = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v !== undefined && v !== null) e.setAttribute(k, String(v));
  for (const c of children) if (c !== undefined && c !== null) e.append(c instanceof Node ? c : String(c));
  return e;
}
const h = (tag, attrs, ...children) => node(null, tag, attrs, children);
const s = (tag, attrs, ...children) => node(SVGNS, tag, attrs, children);
const $ = id => document.getElementById(id);
const isNum = v => typeof v === 'number' && isFinite(v);
const isObj = v => v !== null && typeof v === 'object' && !Array.isArray(v);
const none = () => h('p', {class: 'none'}, 'none yet');
const pill = (v, classes) => h('span', {class: 'pill ' + (Object.hasOwn(classes, v) ? classes[v] : 'idle')},
                               v === undefined ? 'unknown' : fmtAny(v));
const label = k => k.replace(/_/g, ' ');

// Puts `content` into the section `id`; data-count tells tests how much it shows (rows, points, cells).
function fill(id, content, count) {
  const box = $(id);
  box.replaceChildren(content);
  box.dataset.count = String(count);
}

// ---- formatting ----

const pad = n => String(n).padStart(2, '0');
function fmtNum(v, digits) {
  return isNum(v) ? v.toLocaleString('en-US', {maximumFractionDigits: digits === undefined ? 4 : digits}) : '\u2013';
}
const fmtInt = v => fmtNum(v, 0);
const fmtLoss = v => isNum(v) ? v.toFixed(4) : '\u2013';
function fmtSeconds(v) {
  if (!isNum(v)) return '\u2013';
  if (Math.abs(v) < 1) return (v * 1000).toFixed(Math.abs(v) < 0.01 ? 2 : 0) + ' ms';
  if (Math.abs(v) < 120) return v.toFixed(2) + ' s';
  return fmtDuration(v);
}
const fmtAge = v => !isNum(v) ? '\u2013' : v < 120 ? v.toFixed(1) + ' s' : fmtDuration(v);
function fmtDuration(v) {
  if (!isNum(v)) return '\u2013';
  const t = Math.max(0, Math.round(v)), d = Math.floor(t / 86400), hr = Math.floor(t / 3600) % 24;
  const m = Math.floor(t / 60) % 60, sec = t % 60;
  if (d) return d + 'd ' + pad(hr) + 'h';
  if (hr) return hr + 'h ' + pad(m) + 'm';
  return m ? m + 'm ' + pad(sec) + 's' : sec + 's';
}
function fmtTime(unix, withDate) {
  if (!isNum(unix)) return '\u2013';
  const d = new Date(unix * 1000);
  const time = pad(d.getHours()) + ':' + pad(d.getMinutes()) + ':' + pad(d.getSeconds());
  return withDate ? d.getFullYear() + '-' + pad(d.getMonth() + 1) + '-' + pad(d.getDate()) + ' ' + time : time;
}
function fmtAny(v) {
  if (v === undefined || v === null) return '\u2013';
  if (typeof v === 'number') return fmtNum(v);
  if (typeof v === 'boolean') return v ? 'yes' : 'no';
  return typeof v === 'string' ? v : JSON.stringify(v);
}

// ---- tables ----

// A table of `rows` (objects): the columns `cols` ({key, label, fmt(value, row), cls}) and then one for every other
// key found in the rows but those in `shown` (keys a column's fmt shows).
function table(cols, rows, rowClass, shown) {
  const known = new Set(cols.map(c => c.key).concat(shown || [])), extra = [];
  for (const r of rows) for (const k of Object.keys(r)) if (!known.has(k) && !extra.includes(k)) extra.push(k);
  const all = cols.concat(extra.map(k => ({key: k, label: label(k), cls: 'text'})));
  const cell = (c, r) => h('td', {class: c.cls}, (c.fmt || fmtAny)(r[c.key], r));
  return h('table', {},
           h('thead', {}, h('tr', {}, ...all.map(c => h('th', {class: c.cls}, c.label)))),
           h('tbody', {}, ...rows.map(r => h('tr', {class: rowClass}, ...all.map(c => cell(c, r))))));
}
const objects = v => Array.isArray(v) ? v.filter(isObj) : [];

function renderRanks(doc) {
  const rows = objects(doc.ranks);
  if (!rows.length) return fill('ranks', none(), 0);
  const cols = [
    {key: 'rank', label: 'rank', fmt: fmtInt}, {key: 'host', label: 'host', cls: 'text'},
    {key: 'pid', label: 'pid', fmt: v => isNum(v) ? String(v) : '\u2013'},
    {key: 'health', label: 'health', cls: 'text', fmt: v => pill(v, HEALTH)},
    {key: 'phase', label: 'phase', cls: 'text'}, {key: 'step', label: 'step', fmt: fmtInt},
    {key: 'loss', label: 'loss', fmt: fmtLoss}, {key: 'step_time_s', label: 'step time', fmt: fmtSeconds},
    {key: 'tokens_per_s', label: 'tokens/s', fmt: fmtInt},
    {key: 'heartbeat_age_s', label: 'heartbeat age', fmt: fmtAge}];
  fill('ranks', table(cols, rows, 'rank-row'), rows.length);
}

function renderEvents(doc) {
  const rows = objects(doc.events).slice().reverse();  // newest first
  if (!rows.length) return fill('events', none(), 0);
  const world = (v, r) => fmtAny(r.world_before) + ' \u2192 ' + fmtAny(r.world_after);
  const cols = [
    {key: 'time', label: 'time', cls: 'text', fmt: v => fmtTime(v, true)}, {key: 'epoch', label: 'epoch', fmt: fmtInt},
    {key: 'kind', label: 'kind', cls: 'text', fmt: v => pill(v, KINDS)},
    {key: 'cause', label: 'cause', cls: 'text wrap'},
    {key: 'detection_s', label: 'detection', fmt: fmtSeconds},
    {key: 'next_step_s', label: 'time to next step', fmt: fmtSeconds},
    {key: 'steps_redone', label: 'steps redone', fmt: fmtInt},
    {key: 'world_before', label: 'world before \u2192 after', fmt: world}];
  fill('events', table(cols, rows, 'event-row', ['world_after']), rows.length);
}

function renderReplicas(doc) {
  const rows = objects(doc.replicas);
  if (!rows.length) return fill('replicas', none(), 0);
  const link = v => typeof v === 'string' && /^https?:\/\//.test(v) ?
      h('a', {href: v, rel: 'noreferrer'}, v) : fmtAny(v);  // never a javascript: URL
  const cols = [
    {key: 'id', label: 'id', fmt: fmtAny}, {key: 'url', label: 'url', cls: 'text', fmt: link},
    {key: 'health', label: 'health', cls: 'text', fmt: v => pill(v, HEALTH)},
    {key: 'in_flight', label: 'in flight', fmt: fmtInt}];
  fill('replicas', table(cols, rows, 'replica-row'), rows.length);
}

// ---- the job header ----

function stat(labelText, value, sub, cls) {
  return h('div', {class: 'stat'}, h('div', {class: 'label'}, labelText),
           h('div', {class: 'value ' + (cls || '')}, value),
           sub === undefined ? null : h('div', {class: 'sub'}, sub));
}

function stepStat(doc, job) {
  const steps = objects(doc.ranks).map(r => r.step).filter(isNum);
  const step = steps.length ? Math.max(...steps) : undefined, target = job.target_steps;
  if (!isNum(step) && !isNum(target)) return null;
  const value = fmtInt(step) + (isNum(target) ? ' / ' + fmtInt(target) : '');
  const bar = isNum(step) && isNum(target) && target > 0 ?
      h('div', {class: 'progress'}, h('div', {style: 'width:' + Math.min(100, 100 * step / target).toFixed(1) + '%'})) :
      undefined;
  return stat('step', value, bar);
}

function renderJob(doc) {
  const job = isObj(doc.job) ? doc.job : {}, w = isObj(doc.world) ? doc.world : {};
  const ago = 'updated ' + fmtTime(lastOkAt / 1000) + ' \u00b7 refresh ' + refreshes;
  const title = h('div', {class: 'titlebar'}, h('h1', {}, 'moe coordinator'),
                  h('span', {class: 'jobid mono'}, 'job ' + fmtAny(job.id)),
                  job.kind === undefined ? null : pill(job.kind, {train: 'info', serve: 'info'}),
                  job.state === undefined ? null : pill(job.state, STATES), h('span', {class: 'updated'}, ago));
  const stats = [stat('epoch', fmtInt(doc.epoch)), stepStat(doc, job)];
  if (isObj(doc.world)) {
    stats.push(stat('world', fmtInt(w.size) + ' ranks', 'EP ' + fmtInt(w.expert_parallel) + ' \u00d7 DP ' +
                    fmtInt(w.data_parallel)),
               stat('slots', fmtInt(w.slots), 'min ' + fmtInt(w.min) + ' \u00b7 max ' + fmtInt(w.max)));
  }
  if (isNum(job.started_at)) {
    const up = lastOkAt / 1000 - job.started_at;
    const over = job.state === 'finished' || job.state === 'failed';
    stats.push(stat('started', fmtTime(job.started_at, true), over ? undefined : 'up ' + fmtDuration(up), 'small'));
  }
  if (job.config !== undefined) stats.push(stat('config', h('span', {class: 'mono', title: fmtAny(job.config)},
                                                            fmtAny(job.config)), undefined, 'small'));
  const knownJob = ['id', 'kind', 'state', 'config', 'target_steps', 'started_at'];
  for (const [k, v] of Object.entries(job))
    if (!knownJob.includes(k)) stats.push(stat(label(k), fmtAny(v), undefined, 'small'));
  const knownWorld = ['size', 'expert_parallel', 'data_parallel', 'slots', 'min', 'max'];
  for (const [k, v] of Object.entries(w)) if (!knownWorld.includes(k)) stats.push(stat('world ' + label(k), fmtAny(v)));
  $('job').replaceChildren(title, h('div', {class: 'stats'}, ...stats));
}

// ---- the loss chart ----

// Round ticks covering [lo, hi]: {lo, hi, step, ticks}; `integer` keeps the step >= 1.
function niceTicks(lo, hi, n, integer) {
  if (!(hi > lo)) { const d = Math.abs(lo) * 0.05 || 1; lo -= d; hi += d; }
  const raw = (hi - lo) / Math.max(1, n), mag = Math.pow(10, Math.floor(Math.log10(raw))), f = raw / mag;
  let step = (f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10) * mag;
  if (integer) step = Math.max(1, Math.round(step));
  const nlo = Math.floor(lo / step + 1e-9) * step, nhi = Math.ceil(hi / step - 1e-9) * step, ticks = [];
  for (let i = 0; nlo + i * step <= nhi + step * 1e-9; i++) ticks.push(+(nlo + i * step).toPrecision(12));
  return {lo: nlo, hi: nhi, step, ticks};
}
const tickText = (v, step) => v.toFixed(Math.max(0, Math.min(6, -Math.floor(Math.log10(step) + 1e-9))));

// At most about MAX_POINTS points: the lowest and highest loss of each run of points, in step order.
function thin(pts) {
  if (pts.length <= MAX_POINTS) return pts;
  const per = Math.ceil(pts.length / (MAX_POINTS / 2)), out = [];
  for (let i = 0; i < pts.length; i += per) {
    const run = pts.slice(i, i + per);
    let lo = run[0], hi = run[0];
    for (const p of run) { if (p[1] < lo[1]) lo = p; if (p[1] > hi[1]) hi = p; }
    out.push(...(lo[0] <= hi[0] ? [lo, hi] : [hi, lo]));
  }
  out.push(pts[pts.length - 1]);
  return out;
}

function renderLoss(doc) {
  const pts = (Array.isArray(doc.loss_curve) ? doc.loss_curve : [])
                  .filter(p => Array.isArray(p) && isNum(p[0]) && isNum(p[1])).sort((a, b) => a[0] - b[0]);
  if (!pts.length) return fill('loss-chart', none(), 0);
  const W = Math.max(360, $('loss-chart').clientWidth || 640), H = 270, m = {l: 54, r: 30, t: 14, b: 38};
  const pw = W - m.l - m.r, ph = H - m.t - m.b, ys = pts.map(p => p[1]);
  let x0 = pts[0][0], x1 = pts[pts.length - 1][0];
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  const yt = niceTicks(Math.min(...ys), Math.max(...ys), 5), xt = niceTicks(x0, x1, Math.floor(pw / 80), true);
  const X = v => m.l + (v - x0) / (x1 - x0) * pw, Y = v => m.t + (yt.hi - v) / (yt.hi - yt.lo) * ph;
  const g = s('svg', {width: W, height: H, role: 'img', 'aria-label': 'training loss by step'});
  for (const t of yt.ticks) {
    g.append(s('line', {class: 'gridline', x1: m.l, x2: W - m.r, y1: Y(t), y2: Y(t)}),
             s('text', {x: m.l - 7, y: Y(t) + 4, 'text-anchor': 'end'}, tickText(t, yt.step)));
  }
  for (const t of xt.ticks.filter(t => t >= x0 && t <= x1)) {
    g.append(s('line', {class: 'axis', x1: X(t), x2: X(t), y1: m.t + ph, y2: m.t + ph + 4}),
             s('text', {x: X(t), y: m.t + ph + 17, 'text-anchor': 'middle'}, fmtInt(t)));
  }
  g.append(s('line', {class: 'axis', x1: m.l, x2: m.l, y1: m.t, y2: m.t + ph}),
           s('line', {class: 'axis', x1: m.l, x2: W - m.r, y1: m.t + ph, y2: m.t + ph}),
           s('text', {x: m.l + pw / 2, y: H - 4, 'text-anchor': 'middle'}, 'step'),
           s('text', {x: 12, y: m.t + ph / 2, 'text-anchor': 'middle', transform: `rotate(-90 12 ${m.t + ph / 2})`},
             'loss'));
  const d = thin(pts).map((p, i) => (i ? 'L' : 'M') + X(p[0]).toFixed(1) + ',' + Y(p[1]).toFixed(1)).join('');
  const last = pts[pts.length - 1];
  g.append(s('path', {class: 'loss-line', d}), s('circle', {class: 'last', cx: X(last[0]), cy: Y(last[1]), r: 3.5}),
           s('text', {class: 'strong', x: W - m.r, y: m.t + 10, 'text-anchor': 'end'},
             'step ' + fmtInt(last[0]) + ': ' + fmtLoss(last[1])));
  addCursor(g, pts, X, Y, m, pw, ph);
  fill('loss-chart', g, pts.length);
}

// A crosshair that follows the mouse and shows the nearest point.
function addCursor(g, pts, X, Y, m, pw, ph) {
  const line = s('line', {class: 'cursor', y1: m.t, y2: m.t + ph, visibility: 'hidden'});
  const dot = s('circle', {class: 'last', r: 4, visibility: 'hidden'});
  const text = s('text', {class: 'strong', y: m.t + 24, visibility: 'hidden'});
  const area = s('rect', {x: m.l, y: m.t, width: pw, height: ph, fill: 'transparent'});
  g.append(line, dot, text, area);
  area.addEventListener('mousemove', ev => {
    const x = ev.clientX - g.getBoundingClientRect().left;
    let lo = 0, hi = pts.length - 1;
    while (lo < hi) { const mid = (lo + hi) >> 1; if (X(pts[mid][0]) < x) lo = mid + 1; else hi = mid; }
    if (lo > 0 && Math.abs(X(pts[lo - 1][0]) - x) < Math.abs(X(pts[lo][0]) - x)) lo--;
    const p = pts[lo], px = X(p[0]), right = px > m.l + pw * 0.7;
    line.setAttribute('x1', px); line.setAttribute('x2', px);
    dot.setAttribute('cx', px); dot.setAttribute('cy', Y(p[1]));
    text.setAttribute('x', right ? px - 8 : px + 8); text.setAttribute('text-anchor', right ? 'end' : 'start');
    text.textContent = 'step ' + fmtInt(p[0]) + ': ' + fmtLoss(p[1]);
    for (const e of [line, dot, text]) e.setAttribute('visibility', 'visible');
  });
  area.addEventListener('mouseleave', () => {
    for (const e of [line, dot, text]) e.setAttribute('visibility', 'hidden');
  });
}

// ---- the expert load heat map ----

function heatColor(f) {
  const x = Math.max(0, Math.min(1, f)) * (HEAT.length - 1), i = Math.min(HEAT.length - 2, Math.floor(x)), t = x - i;
  const c = HEAT[i].map((v, k) => Math.round(v + (HEAT[i + 1][k] - v) * t));
  return {fill: `rgb(${c[0]},${c[1]},${c[2]})`, dark: f > 0.62};
}

function renderExperts(doc) {
  const load = isObj(doc.expert_load) ? doc.expert_load : {};
  const rows = Array.isArray(load.tokens) ? load.tokens.map(r => Array.isArray(r) ? r : []) : [];
  const E = Math.max(isNum(load.experts) ? load.experts : 0, ...rows.map(r => r.length));
  if (!rows.length || !E) return fill('expert-heatmap', none(), 0);
  const layers = Array.isArray(load.layers) ? load.layers : [];
  const shares = rows.map(r => {
    const total = r.reduce((a, v) => a + (isNum(v) ? v : 0), 0);
    return Array.from({length: E}, (_, e) => isNum(r[e]) && total > 0 ? r[e] / total : null);
  });
  const top = Math.max(2 / E, ...shares.flat().filter(isNum));  // the colour scale's end (uniform load mid-scale)
  const W = Math.max(300, $('expert-heatmap').clientWidth || 480), lw = 62, rw = 52, head = 18;
  const cw = Math.max(4, Math.min(56, Math.floor((W - lw - rw) / E))), ch = Math.max(15, Math.min(28, cw * 0.75));
  const gridH = head + ch * rows.length, H = gridH + 70;
  const g = s('svg', {width: Math.max(lw + cw * E + rw, 420), height: H, role: 'img',
                      'aria-label': 'tokens per expert and layer'});
  const every = Math.ceil(22 / cw);
  for (let e = 0; e < E; e += every)
    g.append(s('text', {x: lw + cw * (e + 0.5), y: head - 6, 'text-anchor': 'middle'}, e));
  g.append(s('text', {x: lw + cw * E + rw / 2, y: head - 6, 'text-anchor': 'middle'}, 'max/avg'));
  let cells = 0;
  shares.forEach((row, i) => {
    const y = head + ch * i, layer = layers[i] === undefined ? i : layers[i];
    g.append(s('text', {x: lw - 8, y: y + ch / 2 + 4, 'text-anchor': 'end'}, 'layer ' + fmtAny(layer)));
    row.forEach((share, e) => {
      const c = share === null ? {fill: '#e9ebef', dark: false} : heatColor(share / top);
      const tokens = rows[i][e], tip = 'layer ' + fmtAny(layer) + ', expert ' + e + ': ' + fmtInt(tokens) +
          ' tokens' + (share === null ? '' : ' (' + (100 * share).toFixed(1) + '% of the layer)');
      g.append(s('rect', {class: 'cell', x: lw + cw * e, y, width: cw - 1, height: ch - 1, fill: c.fill},
                 s('title', {}, tip)));
      if (cw >= 34 && share !== null) {
        const text = (100 * share).toFixed(share < 0.1 ? 1 : 0) + '%';
        g.append(s('text', {x: lw + cw * (e + 0.5), y: y + ch / 2 + 4, 'text-anchor': 'middle',
                            'pointer-events': 'none', style: 'fill:' + (c.dark ? '#fff' : '#3a3f4b')}, text));
      }
      cells++;
    });
    const max = Math.max(...row.filter(isNum));
    g.append(s('text', {x: lw + cw * E + rw / 2, y: y + ch / 2 + 4, 'text-anchor': 'middle', class: 'strong'},
               isFinite(max) ? (max * E).toFixed(2) + '\u00d7' : '\u2013'));
  });
  addLegend(g, lw, gridH + 26, Math.max(160, Math.min(cw * E, 320)), top, E);
  fill('expert-heatmap', g, cells);
}

function addLegend(g, x, y, w, top, E) {
  const grad = s('linearGradient', {id: 'heat-scale'});
  HEAT.forEach((c, i) => grad.append(s('stop', {offset: (i / (HEAT.length - 1)).toFixed(3),
                                                'stop-color': `rgb(${c.join(',')})`})));
  const u = x + w * (1 / E) / top;
  g.append(s('defs', {}, grad), s('rect', {x, y, width: w, height: 10, fill: 'url(#heat-scale)'}),
           s('line', {class: 'axis', x1: u, x2: u, y1: y - 3, y2: y + 13}),
           s('text', {x: u, y: y - 6, 'text-anchor': 'middle'}, 'uniform ' + (100 / E).toFixed(1) + '%'),
           s('text', {x, y: y + 25}, '0%'),
           s('text', {x: x + w, y: y + 25, 'text-anchor': 'end'}, (100 * top).toFixed(1) + '%'),
           s('text', {x, y: y + 40}, 'share of the layer\u2019s tokens; max/avg = busiest expert over the mean'));
}

// ---- fields this page does not know ----

function renderOther(doc) {
  const known = ['job', 'epoch', 'world', 'ranks', 'loss_curve', 'expert_load', 'events', 'replicas'];
  const rest = Object.entries(doc).filter(([k]) => !known.includes(k));
  $('other-card').hidden = !rest.length;
  fill('other', h('pre', {class: 'mono'}, rest.map(([k, v]) => k + ': ' + JSON.stringify(v)).join('\n')), rest.length);
}

// ---- refreshing ----

function render(doc) {
  const parts = [['job', renderJob], ['loss-chart', renderLoss], ['expert-heatmap', renderExperts],
                 ['ranks', renderRanks], ['events', renderEvents], ['replicas', renderReplicas],
                 ['other', renderOther]];
  for (const [id, f] of parts) {
    try {
      f(doc);
    } catch (e) {  // one malformed section does not take the others down
      $(id).replaceChildren(h('p', {class: 'fail'}, 'cannot show this section: ' + e.message));
    }
  }
}

function failure(status, text) {
  let msg = text.slice(0, 300);
  try { msg = JSON.parse(text).error.message || msg; } catch (e) { /* not the error JSON */ }
  if (status === 401) return 'not authorized (401): open this page as /?key=<API key>. ' + msg;
  return 'HTTP ' + status + ': ' + msg;
}

function showError(e) {
  const why = e.name === 'AbortError' ? 'no answer within ' + TIMEOUT_MS / 1000 + ' s' : e.message;
  const since = lastOkAt ? ' Showing the data of ' + fmtTime(lastOkAt / 1000) + '.' : '';
  $('error').textContent = 'Cannot refresh the status: ' + why + '. Retrying every second.' + since;
  document.body.dataset.state = 'error';
}

async function refresh() {
  const ctl = new AbortController(), timer = setTimeout(() => ctl.abort(), TIMEOUT_MS);
  try {
    const res = await fetch('status', {headers: KEY ? {Authorization: 'Bearer ' + KEY} : {}, cache: 'no-store',
                                       signal: ctl.signal});
    const text = await res.text();
    if (!res.ok) throw new Error(failure(res.status, text));
    const doc = JSON.parse(text);
    if (!isObj(doc)) throw new Error('the status document is not a JSON object');
    lastDoc = doc;
    lastOkAt = Date.now();
    refreshes++;
    render(doc);
    document.body.dataset.updated = String(refreshes);
    document.body.dataset.state = 'ok';
  } catch (e) {
    showError(e);
  } finally {
    clearTimeout(timer);
    setTimeout(refresh, REFRESH_MS);
  }
}

let resizeTimer = 0;
window.addEventListener('resize', () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => { if (lastDoc) render(lastDoc); }, 150);
});
refresh();
</script>
</body>
</html>
)PAGE";

}  // namespace

std::string_view dashboard_html() { return kPage; }

}  // namespace moe::launcher
