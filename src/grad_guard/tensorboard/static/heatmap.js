// Layer x step heatmap on a canvas, its colour scale and legend.
// Cells: a value coloured on the scale; NaN/Inf red with a cross; exactly zero black;
// no gradient (no value logged for that layer and step) light grey.

const VIRIDIS = [
  [68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142],
  [31, 158, 137], [53, 183, 121], [109, 205, 89], [180, 222, 44], [253, 231, 37],
];
export const COLORS = {nonfinite: '#e8114b', zero: '#000000', missing: '#e4e4e4'};
const LOG_QUANTITIES = new Set([
  'grad_norm', 'param_norm', 'grad_to_param', 'update_ratio', 'activation_std',
]);

/** A cell value as a number (NaN/Infinity come as strings), or null. */
export function toNumber(v) {
  if (v === null || v === undefined) return null;
  if (typeof v === 'number') return v;
  if (v === 'NaN') return NaN;
  if (v === 'Infinity') return Infinity;
  if (v === '-Infinity') return -Infinity;
  return Number(v);
}

export function formatValue(v) {
  if (v === null) return 'no gradient';
  if (Number.isNaN(v)) return 'NaN';
  if (!Number.isFinite(v)) return v > 0 ? 'Inf' : '-Inf';
  if (v === 0) return '0';
  const a = Math.abs(v);
  return a >= 1e-3 && a < 1e4 ? v.toPrecision(4) : v.toExponential(3);
}

/** One colour scale shared by every heatmap drawn with it (log10 or linear). */
export function makeScale(quantity, datasets) {
  const log = LOG_QUANTITIES.has(quantity);
  let lo = Infinity;
  let hi = -Infinity;
  for (const data of datasets) {
    for (const row of data.values) {
      for (const raw of row) {
        const v = toNumber(raw);
        if (v === null || !Number.isFinite(v) || (log && v <= 0)) continue;
        const t = log ? Math.log10(v) : v;
        if (t < lo) lo = t;
        if (t > hi) hi = t;
      }
    }
  }
  if (lo === Infinity) { lo = 0; hi = 1; }
  if (log) { lo = Math.floor(lo); hi = Math.ceil(hi); }
  if (hi <= lo) hi = lo + 1;
  const position = (v) => Math.min(1, Math.max(0, ((log ? Math.log10(v) : v) - lo) / (hi - lo)));
  return {
    log, lo, hi, quantity,
    label: log ? `log10 ${quantity}` : quantity,
    color(v) {
      if (v === null) return COLORS.missing;
      if (!Number.isFinite(v)) return COLORS.nonfinite;
      if (log && v <= 0) return COLORS.zero;
      return rampColor(position(v));
    },
  };
}

export function rampColor(t) {
  const x = t * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
  const f = x - i;
  const c = VIRIDIS[i].map((a, k) => Math.round(a + (VIRIDIS[i + 1][k] - a) * f));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

/** The colour legend: the ramp with its ticks, then the special cells. */
export function legend(scale) {
  const box = document.createElement('div');
  box.className = 'gg-legend';
  const ramp = document.createElement('canvas');
  ramp.width = 240;
  ramp.height = 12;
  const g = ramp.getContext('2d');
  for (let x = 0; x < ramp.width; x++) {
    g.fillStyle = rampColor(x / (ramp.width - 1));
    g.fillRect(x, 0, 1, ramp.height);
  }
  const ends = (v) => (scale.log ? `1e${v}` : formatValue(v));
  box.append(span(ends(scale.lo), 'gg-tick'), ramp, span(ends(scale.hi), 'gg-tick'),
    span(scale.label, 'gg-legend-label'));
  const specials = [['NaN / Inf', COLORS.nonfinite], ['no gradient', COLORS.missing]];
  if (scale.log) specials.splice(1, 0, ['zero', COLORS.zero]);
  for (const [name, color] of specials) {
    const swatch = span('', 'gg-swatch');
    swatch.style.background = color;
    box.append(swatch, span(name, 'gg-swatch-label'));
  }
  return box;
}

function span(text, className) {
  const s = document.createElement('span');
  s.className = className;
  s.textContent = text;
  return s;
}

/**
 * Draw one run's heatmap into a new element and return it.
 * options: {scale, width, maxHeight, title, tooltip, onColumn(step, i), onRow(layer, j)}
 */
export function heatmap(data, options) {
  const rows = data.layers.length;
  const cols = data.steps.length;
  const root = document.createElement('div');
  root.className = 'gg-heatmap';
  root.dataset.run = data.run;
  root.dataset.tag = data.tag;
  if (options.title) root.append(span(options.title, 'gg-heatmap-title'));
  const labelWidth = options.labels === false ? 0 : 110;
  const cellW = Math.max(1, Math.floor((options.width - labelWidth) / Math.max(cols, 1)));
  const cellH = Math.max(2, Math.min(22, Math.floor(options.maxHeight / Math.max(rows, 1))));
  const grid = document.createElement('div');
  grid.className = 'gg-grid';
  const labels = document.createElement('div');
  labels.className = 'gg-row-labels';
  labels.style.width = `${labelWidth}px`;
  if (labelWidth) {
    data.layers.forEach((name, j) => {
      const label = span(cellH >= 9 ? name : '', 'gg-row-label');
      label.dataset.layer = name;
      label.title = name;
      label.style.height = `${cellH}px`;
      label.style.lineHeight = `${cellH}px`;
      label.style.fontSize = `${Math.min(12, cellH - 1)}px`;
      label.onclick = () => options.onRow && options.onRow(name, j);
      labels.append(label);
    });
  }
  const scroller = document.createElement('div');
  scroller.className = 'gg-scroller';
  const canvas = document.createElement('canvas');
  canvas.width = Math.max(1, cols * cellW);
  canvas.height = Math.max(1, rows * cellH);
  Object.assign(canvas.dataset, {rows, cols, cellW, cellH});
  const g = canvas.getContext('2d');
  const numbers = data.values.map((row) => row.map(toNumber));
  for (let j = 0; j < rows; j++) {
    for (let i = 0; i < cols; i++) {
      const v = numbers[j][i];
      g.fillStyle = options.scale.color(v);
      g.fillRect(i * cellW, j * cellH, cellW, cellH);
      if (v !== null && !Number.isFinite(v) && cellW >= 6 && cellH >= 6) {
        g.strokeStyle = '#ffffff';
        g.beginPath();
        g.moveTo(i * cellW + 1, j * cellH + 1);
        g.lineTo((i + 1) * cellW - 1, (j + 1) * cellH - 1);
        g.moveTo((i + 1) * cellW - 1, j * cellH + 1);
        g.lineTo(i * cellW + 1, (j + 1) * cellH - 1);
        g.stroke();
      }
    }
  }
  const cell = (event) => {
    const box = canvas.getBoundingClientRect();
    const i = Math.floor((event.clientX - box.left) / (box.width / cols));
    const j = Math.floor((event.clientY - box.top) / (box.height / rows));
    return i >= 0 && i < cols && j >= 0 && j < rows ? {i, j} : null;
  };
  canvas.addEventListener('mousemove', (event) => {
    const c = cell(event);
    if (!c) return options.tooltip.hide();
    const v = numbers[c.j][c.i];
    options.tooltip.show(event, {
      run: data.run, layer: data.layers[c.j], step: data.steps[c.i], value: v,
      quantity: data.tag,
    });
  });
  canvas.addEventListener('mouseleave', () => options.tooltip.hide());
  canvas.addEventListener('click', (event) => {
    const c = cell(event);
    if (!c) return;
    if (event.shiftKey && options.onRow) options.onRow(data.layers[c.j], c.j);
    else if (options.onColumn) options.onColumn(data.steps[c.i], c.i);
  });
  const marker = document.createElement('div');
  marker.className = 'gg-col-marker';
  marker.style.display = 'none';
  scroller.append(canvas, marker);
  // outline the column of `step` (null: none), e.g. the step the flow chart shows
  root.markStep = (step) => {
    const i = step === null ? -1 : data.steps.indexOf(step);
    marker.style.display = i < 0 ? 'none' : 'block';
    marker.style.left = `${i * cellW - 1}px`;
    marker.style.width = `${cellW}px`;
    marker.style.height = `${rows * cellH}px`;
  };
  const axis = span(cols ? `steps ${data.steps[0]} … ${data.steps[cols - 1]} (${cols} logged)` : 'no steps', 'gg-axis');
  grid.append(labels, scroller);
  root.append(grid, axis);
  return root;
}

/** A floating tooltip shared by every heatmap of the page. */
export function makeTooltip() {
  const tip = document.createElement('div');
  tip.className = 'gg-tooltip';
  tip.style.display = 'none';
  document.body.append(tip);
  return {
    element: tip,
    show(event, cell) {
      tip.textContent = '';
      const lines = [
        ['layer', cell.layer], ['step', String(cell.step)],
        [cell.quantity, formatValue(cell.value)], ['run', cell.run],
      ];
      for (const [k, v] of lines) {
        const line = document.createElement('div');
        line.append(span(`${k}: `, 'gg-tip-key'), span(v, `gg-tip-${k === cell.quantity ? 'value' : k}`));
        tip.append(line);
      }
      Object.assign(tip.dataset, {
        layer: cell.layer, step: String(cell.step),
        value: cell.value === null ? 'null' : String(cell.value),
      });
      tip.style.display = 'block';
      tip.style.left = `${event.pageX + 14}px`;
      tip.style.top = `${event.pageY + 14}px`;
    },
    hide() { tip.style.display = 'none'; },
  };
}
