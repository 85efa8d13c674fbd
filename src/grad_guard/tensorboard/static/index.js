// grad_guard's "Gradients" dashboard: TensorBoard loads this ES module in an iframe whose
// base URL is /data/plugin/grad_guard/ and calls render(). Everything it needs is in this
// folder; nothing is fetched from the internet.

import {flowChart, lineChart} from './charts.js';
import {heatmap, legend, makeScale, makeTooltip} from './heatmap.js';
import {report, timeline} from './panels.js';

const MAX_RUNS = 4;
const RUN_COLORS = ['#3060c0', '#e15759', '#59a14f', '#b07aa1'];
const QUANTITY_NAMES = {
  grad_norm: 'gradient norm', param_norm: 'parameter norm', grad_to_param: 'gradient / parameter',
  update_ratio: 'update ratio', activation_mean: 'activation mean', activation_std: 'activation std',
  saturated_fraction: 'saturated fraction', dead_fraction: 'dead fraction',
  nonfinite_fraction: 'non-finite fraction',
};

const state = {runs: [], selected: [], quantity: 'grad_norm', cache: new Map(), detail: null};
let ui = null;

async function fetchJSON(path) {
  if (state.cache.has(path)) return state.cache.get(path);
  const response = await fetch(path);
  let body;
  try {
    body = await response.json();
  } catch (err) {
    body = {error: `${response.status} ${response.statusText}`};
  }
  if (!response.ok && !body.error) body = {error: `${response.status} ${response.statusText}`};
  state.cache.set(path, body);
  return body;
}

const q = (route, params) => `./${route}?${new URLSearchParams(params)}`;

function el(tag, className, text = '') {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text) e.textContent = text;
  return e;
}

function section(title, className) {
  const s = el('section', `gg-section ${className}`);
  s.append(el('h2', '', title));
  const body = el('div', 'gg-body');
  s.append(body);
  return {section: s, body};
}

export async function render() {
  const style = document.createElement('link');
  style.rel = 'stylesheet';
  style.href = new URL('./style.css', import.meta.url).href;
  document.head.append(style);
  document.body.classList.add('gg-page');
  const header = el('header', 'gg-header');
  header.append(el('h1', '', 'Gradients'));
  const picker = el('div', 'gg-run-picker');
  const quantities = el('div', 'gg-quantities');
  header.append(picker, quantities);
  const maps = section('Layer × step heatmap', 'gg-maps');
  const detail = section('Gradient flow / layer history', 'gg-detail');
  const events = section('Anomaly timeline', 'gg-anomalies');
  const reports = section('Health report', 'gg-reports');
  document.body.append(header, maps.section, detail.section, events.section, reports.section);
  ui = {picker, quantities, maps: maps.body, detail: detail.body, events: events.body,
    reports: reports.body, tooltip: makeTooltip()};
  state.runs = await fetchJSON('./runs');
  if (!Array.isArray(state.runs) || !state.runs.length) {
    ui.maps.append(el('p', 'gg-muted', 'No grad_guard data in this log directory.'));
    return;
  }
  state.selected = [state.runs[0].run];
  drawPicker();
  await update();
}

function drawPicker() {
  ui.picker.textContent = '';
  ui.picker.append(el('span', 'gg-label', `runs (up to ${MAX_RUNS}, one colour scale):`));
  for (const info of state.runs) {
    const label = el('label', 'gg-run');
    const box = document.createElement('input');
    box.type = 'checkbox';
    box.value = info.run;
    box.checked = state.selected.includes(info.run);
    box.disabled = !box.checked && state.selected.length >= MAX_RUNS;
    box.onchange = () => {
      state.selected = box.checked
        ? [...state.selected, info.run]
        : state.selected.filter((r) => r !== info.run);
      state.detail = null;
      drawPicker();
      update();
    };
    label.append(box, document.createTextNode(` ${info.run} (${info.layers} layers)`));
    ui.picker.append(label);
  }
}

function drawQuantities() {
  const available = new Set();
  for (const info of state.runs) {
    if (state.selected.includes(info.run)) info.quantities.forEach((x) => available.add(x));
  }
  if (!available.has(state.quantity)) state.quantity = 'grad_norm';
  ui.quantities.textContent = '';
  for (const name of Object.keys(QUANTITY_NAMES)) {
    if (!available.has(name)) continue;
    const button = el('button', name === state.quantity ? 'gg-active' : '', QUANTITY_NAMES[name]);
    button.dataset.quantity = name;
    button.onclick = () => { state.quantity = name; state.detail = null; update(); };
    ui.quantities.append(button);
  }
}

function width() {
  return Math.max(480, document.documentElement.clientWidth - 40);
}

async function update() {
  drawQuantities();
  const runs = [...state.selected];
  const quantity = state.quantity;
  const datasets = await Promise.all(runs.map((run) => fetchJSON(q('heatmap', {run, tag: quantity}))));
  if (quantity !== state.quantity || runs.join('\n') !== state.selected.join('\n')) return;
  const usable = datasets.filter((d) => d && Array.isArray(d.layers));
  const scale = makeScale(quantity, usable);
  ui.maps.textContent = '';
  ui.maps.append(legend(scale));
  const row = el('div', 'gg-multiples');
  const each = Math.floor((width() - 16 * (runs.length - 1)) / Math.max(1, runs.length));
  const maps = [];
  const markStep = () => {
    for (const m of maps) m.markStep(state.detail && state.detail.kind === 'step' ? state.detail.step : null);
  };
  for (const data of usable) {
    const map = heatmap(data, {
      scale, width: each, maxHeight: runs.length > 1 ? 360 : 520, tooltip: ui.tooltip,
      title: `${data.run}: ${data.layers.length} layers × ${data.steps.length} steps (input at the top)`,
      labels: true,
      onColumn: (step) => { state.detail = {kind: 'step', step}; markStep(); drawDetail(usable, scale); },
      onRow: (layer) => { state.detail = {kind: 'layer', layer}; markStep(); drawDetail(usable, scale); },
    });
    maps.push(map);
    row.append(map);
  }
  ui.maps.append(row);
  markStep();
  ui.maps.append(el('p', 'gg-muted',
    'Hover a cell for its layer, step and value; click a column for the gradient flow of that step; click a layer name (or shift-click a cell) for its history.'));
  drawDetail(usable, scale);
  await drawRunPanels(runs);
}

function drawDetail(datasets, scale) {
  ui.detail.textContent = '';
  const d = state.detail;
  if (!d) {
    ui.detail.append(el('p', 'gg-muted', 'Click a heatmap column (a step) or a layer name.'));
    return;
  }
  if (d.kind === 'step') {
    const row = el('div', 'gg-multiples');
    const each = Math.max(360, Math.floor(width() / Math.max(1, datasets.length)) - 16);
    for (const data of datasets) {
      const column = data.steps.indexOf(d.step);
      if (column >= 0) row.append(flowChart(data, column, scale, each));
    }
    ui.detail.append(row);
    return;
  }
  const series = [];
  datasets.forEach((data, k) => {
    const j = data.layers.indexOf(d.layer);
    if (j >= 0) {
      series.push({name: data.run, color: RUN_COLORS[k % RUN_COLORS.length],
        points: data.steps.map((s, i) => [s, data.values[j][i]])});
    }
  });
  const chart = lineChart({title: `${scale.quantity} of ${d.layer}`, width: Math.min(width(), 900),
    height: 240, log: scale.log, series, className: 'gg-chart gg-series'});
  chart.dataset.layer = d.layer;
  ui.detail.append(chart);
}

async function drawRunPanels(runs) {
  const [timelines, eventLists, reportList] = await Promise.all([
    Promise.all(runs.map((run) => fetchJSON(q('timeline', {run})))),
    Promise.all(runs.map((run) => fetchJSON(q('events', {run})))),
    Promise.all(runs.map((run) => fetchJSON(q('report', {run})))),
  ]);
  if (runs.join('\n') !== state.selected.join('\n')) return;
  ui.events.textContent = '';
  ui.reports.textContent = '';
  const row = el('div', 'gg-multiples');
  const each = Math.floor((width() - 16 * (runs.length - 1)) / Math.max(1, runs.length));
  runs.forEach((run, k) => {
    const events = Array.isArray(eventLists[k]) ? eventLists[k] : [];
    ui.events.append(timeline(run, timelines[k] || {}, events, Math.min(width(), 1100)));
    const card = report(run, reportList[k] || {});
    card.style.width = `${each}px`;
    row.append(card);
  });
  ui.reports.append(row);
}
