// The anomaly timeline and the health report of one run.

import {lineChart} from './charts.js';
import {toNumber} from './heatmap.js';

export const KIND_COLORS = {
  nonfinite: '#e8114b', exploding: '#f28e2b', vanishing: '#4e79a7',
  loss_spike: '#b07aa1', amp_overflow: '#9c755f', skip: '#888888', rollback: '#7b3294',
};

function el(tag, className, text = '') {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text) e.textContent = text;
  return e;
}

/** Steps where a cumulative counter went up, with the increase. */
export function increments(points) {
  const out = [];
  let previous = 0;
  for (const [step, raw] of points || []) {
    const v = toNumber(raw);
    if (v === null || !Number.isFinite(v)) continue;
    if (v > previous) out.push({step, by: v - previous});
    previous = v;
  }
  return out;
}

function seriesNamed(series, suffix) {
  // the run-level name, or the first optimizer's (optimizer_<i>/<suffix>)
  if (series[suffix]) return {name: suffix, points: series[suffix]};
  const key = Object.keys(series).find((k) => k.endsWith('/' + suffix) && /^optimizer_\d+\//.test(k));
  return key ? {name: key, points: series[key]} : null;
}

/** Events, skips and rollbacks on a chart of the clipping threshold and norms. */
export function timeline(run, timelineData, events, width) {
  const box = el('div', 'gg-timeline');
  box.dataset.run = run;
  const series = timelineData.series || {};
  const lines = [];
  const colors = {'clip/pre_norm': '#f28e2b', 'clip/post_norm': '#59a14f', 'clip/threshold': '#222222'};
  for (const suffix of ['clip/pre_norm', 'clip/post_norm', 'clip/threshold']) {
    const found = seriesNamed(series, suffix);
    if (found) lines.push({name: found.name, color: colors[suffix], points: found.points});
  }
  if (!lines.length) {
    const total = seriesNamed(series, 'total_grad_norm');
    if (total) lines.push({name: 'total_grad_norm', color: '#f28e2b', points: total.points});
  }
  const markers = events.map((e) => ({
    x: e.step, kind: e.kind, color: KIND_COLORS[e.kind] || '#555',
    label: `${e.kind} at step ${e.step}, action ${e.action}`,
  }));
  for (const [counter, kind] of [['skipped_steps', 'skip'], ['rollbacks', 'rollback']]) {
    const found = seriesNamed(series, counter);
    for (const inc of increments(found ? found.points : [])) {
      markers.push({x: inc.step, kind, color: KIND_COLORS[kind], label: `${kind} +${inc.by} by step ${inc.step}`});
    }
  }
  box.append(lineChart({
    title: lines.some((l) => l.name.includes('clip/'))
      ? `clipping: threshold vs pre/post-clip total norm, with anomalies (${run})`
      : `total gradient norm with anomalies (${run})`,
    width, height: 220, log: true, series: lines, markers, className: 'gg-chart gg-timeline-chart',
  }));
  const keys = el('div', 'gg-kinds');
  for (const [kind, color] of Object.entries(KIND_COLORS)) {
    const k = el('span', 'gg-kind', kind);
    k.style.borderLeft = `10px solid ${color}`;
    keys.append(k);
  }
  box.append(keys);
  const counts = [];
  for (const name of ['skipped_steps', 'rollbacks']) {
    const found = seriesNamed(series, name);
    if (found && found.points.length) counts.push(`${name}: ${toNumber(found.points[found.points.length - 1][1])}`);
  }
  box.append(el('div', 'gg-counts', `${events.length} anomaly event(s)${counts.length ? '; ' + counts.join(', ') : ''}`));
  if (events.length) {
    const table = el('table', 'gg-events');
    table.append(rowOf('th', ['step', 'kind', 'action', 'details']));
    for (const e of events) {
      const detail = e.text.split('\n').slice(1).filter((l) => l.trim() && !l.startsWith('|')).join(' ');
      const tr = rowOf('td', [String(e.step), e.kind, e.action, detail]);
      tr.dataset.kind = e.kind;
      table.append(tr);
    }
    box.append(table);
  }
  return box;
}

function rowOf(cell, values) {
  const tr = el('tr');
  for (const v of values) tr.append(el(cell, '', v));
  return tr;
}

/** The health report: verdict, findings with evidence and advice, totals. */
export function report(run, data) {
  const box = el('div', 'gg-report');
  box.dataset.run = run;
  if (data.error) {
    box.append(el('p', 'gg-muted', `report unavailable: ${data.error}`));
    return box;
  }
  const findings = data.findings || [];
  const span = data.step_range ? `steps ${data.step_range[0]}-${data.step_range[1]}` : 'no steps';
  box.append(el('h3', data.healthy ? 'gg-healthy' : 'gg-unhealthy',
    `${run}: ${data.healthy ? 'healthy' : `${findings.length} finding(s)`} (${span}, ${data.logged_steps} logged steps)`));
  for (const f of findings) {
    const card = el('div', `gg-finding gg-${f.severity}`);
    card.dataset.rule = f.rule;
    card.append(el('div', 'gg-finding-title', `${f.severity.toUpperCase()}: ${f.title}`));
    const evidence = el('ul', 'gg-evidence');
    for (const line of f.evidence || []) evidence.append(el('li', '', line));
    card.append(evidence);
    if ((f.advice || []).length) {
      card.append(el('div', 'gg-advice-title', 'what to try'));
      const advice = el('ol', 'gg-advice');
      for (const line of f.advice) advice.append(el('li', '', line));
      card.append(advice);
    }
    box.append(card);
  }
  const totals = Object.entries(data.totals || {})
    .map(([k, v]) => `${k}: ${v === null ? '-' : typeof v === 'number' && !Number.isInteger(v) ? v.toFixed(3) : v}`);
  box.append(el('div', 'gg-counts', totals.join(' · ')));
  return box;
}
