// Small SVG charts: line charts (log or linear y), the gradient-flow bar chart of one
// step and one layer's time series. No library: a few hundred elements at most.

import {COLORS, formatValue, rampColor, toNumber} from './heatmap.js';

const NS = 'http://www.w3.org/2000/svg';

export function svg(tag, attrs = {}, text = '') {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text) el.textContent = text;
  return el;
}

function extent(values) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const v of values) {
    if (v < lo) lo = v;
    if (v > hi) hi = v;
  }
  if (lo === Infinity) return [0, 1];
  if (hi <= lo) return [lo - 0.5, hi + 0.5];
  return [lo, hi];
}

/**
 * A line chart. spec: {title, width, height, log, series: [{name, color, points: [[x, y]]}],
 * markers: [{x, color, label}], className}. Non-finite points are drawn as red ticks on
 * the top edge; zero on a log axis is left out.
 */
export function lineChart(spec) {
  const width = spec.width || 600;
  const height = spec.height || 200;
  const m = {left: 58, right: 12, top: 22, bottom: 28};
  const root = svg('svg', {width, height, class: spec.className || 'gg-chart'});
  root.append(svg('text', {x: m.left, y: 14, class: 'gg-chart-title'}, spec.title || ''));
  const xs = [];
  const ys = [];
  for (const s of spec.series) {
    for (const [x, yRaw] of s.points) {
      const y = toNumber(yRaw);
      xs.push(x);
      if (y !== null && Number.isFinite(y) && (!spec.log || y > 0)) ys.push(spec.log ? Math.log10(y) : y);
    }
  }
  for (const mk of spec.markers || []) xs.push(mk.x);
  const [x0, x1] = extent(xs);
  let [y0, y1] = extent(ys);
  if (spec.log) { y0 = Math.floor(y0); y1 = Math.ceil(y1); if (y1 === y0) y1 += 1; }
  const px = (x) => m.left + ((x - x0) / (x1 - x0 || 1)) * (width - m.left - m.right);
  const py = (t) => height - m.bottom - ((t - y0) / (y1 - y0 || 1)) * (height - m.top - m.bottom);
  const axis = svg('g', {class: 'gg-axis-lines'});
  axis.append(svg('line', {x1: m.left, y1: height - m.bottom, x2: width - m.right, y2: height - m.bottom}));
  axis.append(svg('line', {x1: m.left, y1: m.top, x2: m.left, y2: height - m.bottom}));
  const ticks = spec.log ? Math.min(6, y1 - y0) : 4;
  for (let k = 0; k <= ticks; k++) {
    const t = y0 + ((y1 - y0) * k) / ticks;
    axis.append(svg('text', {x: m.left - 4, y: py(t) + 4, class: 'gg-tick-label', 'text-anchor': 'end'},
      spec.log ? `1e${Math.round(t)}` : formatValue(t)));
  }
  axis.append(svg('text', {x: m.left, y: height - 8, class: 'gg-tick-label'}, String(x0)));
  axis.append(svg('text', {x: width - m.right, y: height - 8, class: 'gg-tick-label', 'text-anchor': 'end'},
    `${String(x1)} (step)`));
  root.append(axis);
  for (const mk of spec.markers || []) {
    const line = svg('line', {x1: px(mk.x), x2: px(mk.x), y1: m.top, y2: height - m.bottom,
      stroke: mk.color, class: 'gg-marker', 'data-step': mk.x, 'data-kind': mk.kind || ''});
    line.append(svg('title', {}, mk.label));
    root.append(line);
  }
  let legendX = width - m.right;
  for (const s of [...spec.series].reverse()) {
    const label = svg('text', {x: legendX, y: 14, fill: s.color, class: 'gg-series-label', 'text-anchor': 'end'}, s.name);
    root.append(label);
    legendX -= 10 + 7 * s.name.length;
    let d = '';
    for (const [x, yRaw] of s.points) {
      const y = toNumber(yRaw);
      if (y === null) continue;
      if (!Number.isFinite(y)) {
        root.append(svg('line', {x1: px(x), x2: px(x), y1: m.top, y2: m.top + 8, stroke: COLORS.nonfinite, 'stroke-width': 2}));
        continue;
      }
      if (spec.log && y <= 0) continue;
      d += `${d ? 'L' : 'M'}${px(x).toFixed(1)},${py(spec.log ? Math.log10(y) : y).toFixed(1)}`;
    }
    root.append(svg('path', {d, stroke: s.color, fill: 'none', 'stroke-width': 1.6, class: 'gg-line', 'data-name': s.name}));
  }
  return root;
}

/** Gradient flow of one step: one horizontal bar per layer, input layer at the top. */
export function flowChart(data, column, scale, width = 520) {
  const rowH = Math.max(8, Math.min(18, Math.floor(420 / Math.max(1, data.layers.length))));
  const m = {left: 150, right: 90, top: 26, bottom: 8};
  const height = m.top + m.bottom + rowH * data.layers.length;
  const root = svg('svg', {width, height, class: 'gg-flow', 'data-step': data.steps[column], 'data-run': data.run});
  root.append(svg('text', {x: 4, y: 16, class: 'gg-chart-title'},
    `${scale.label} through the layers at step ${data.steps[column]} (${data.run})`));
  const span = width - m.left - m.right;
  data.layers.forEach((layer, j) => {
    const v = toNumber(data.values[j][column]);
    const y = m.top + j * rowH;
    root.append(svg('text', {x: m.left - 6, y: y + rowH - 3, 'text-anchor': 'end', class: 'gg-tick-label'}, layer));
    let length = 0;
    let color = COLORS.missing;
    if (v !== null && !Number.isFinite(v)) { length = span; color = COLORS.nonfinite; }
    else if (v !== null && !(scale.log && v <= 0)) {
      const t = ((scale.log ? Math.log10(v) : v) - scale.lo) / (scale.hi - scale.lo);
      length = Math.max(2, Math.min(1, Math.max(0, t)) * span);
      color = rampColor(Math.min(1, Math.max(0, t)));
    } else if (v !== null) { length = 2; color = COLORS.zero; }
    const bar = svg('rect', {x: m.left, y: y + 1, width: length, height: rowH - 2, fill: color,
      class: 'gg-bar', 'data-layer': layer, 'data-value': v === null ? 'null' : String(v)});
    bar.append(svg('title', {}, `${layer}: ${formatValue(v)}`));
    root.append(bar);
    root.append(svg('text', {x: m.left + length + 4, y: y + rowH - 3, class: 'gg-tick-label'}, formatValue(v)));
  });
  return root;
}

/** One layer's values over the logged steps. */
export function seriesChart(data, row, scale, width = 520) {
  const points = data.steps.map((s, i) => [s, data.values[row][i]]);
  const chart = lineChart({
    title: `${data.tag} of ${data.layers[row]} (${data.run})`, width, height: 220,
    log: scale.log, series: [{name: data.layers[row], color: '#3060c0', points}],
    className: 'gg-chart gg-series',
  });
  chart.dataset.layer = data.layers[row];
  return chart;
}
