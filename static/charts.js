// Shared views: emotion heat strip, stress chart with level bands, distribution and components.
// Charts keep at most MAX_POINTS windows and redraw at most once per animation frame.
// Everything is exported on window.Views; nothing else leaks into the page's global scope.
(() => {
"use strict";

const MAX_POINTS = 600; // ten minutes of 1 s hops on screen; the full timeline stays exportable
const EMOTIONS = ["angry", "disgusted", "fearful", "happy", "neutral", "other", "sad", "surprised", "unknown"];
const EMOTION_COLORS = {
  angry: "#e5484d", disgusted: "#8e4ec6", fearful: "#f76b15", happy: "#ffc53d", neutral: "#8b8d98",
  other: "#3e63dd", sad: "#0090ff", surprised: "#12a594", unknown: "#60646c",
};
const LEVELS = [
  { upTo: 25, name: "low", color: "rgba(48, 164, 108, 0.13)" },
  { upTo: 50, name: "moderate", color: "rgba(255, 197, 61, 0.16)" },
  { upTo: 75, name: "elevated", color: "rgba(247, 107, 21, 0.16)" },
  { upTo: 100, name: "high", color: "rgba(229, 72, 77, 0.18)" },
];
const COMPONENT_NAMES = {
  f0_mean_st: "Pitch (mean F0)",
  f0_range_st: "Pitch range",
  loudness: "Loudness",
  loudness_range: "Loudness range",
  alpha_ratio_db: "Energy above 1 kHz (alpha ratio)",
  hammarberg_db: "Spectral tilt (Hammarberg)",
  slope_0_500: "Spectral slope 0–500 Hz",
  slope_500_1500: "Spectral slope 0.5–1.5 kHz",
  hnr_db: "Voice clarity (HNR)",
  jitter: "Jitter",
  shimmer_db: "Shimmer",
  peaks_per_s: "Speech rate (loudness peaks)",
  voiced_per_s: "Voiced segments per second",
  emotion_arousal: "Emotion: angry / fearful / disgusted (vs usual)",
  emotion_valence: "Emotion: happy (vs usual)",
  prosodic_valence: "Voice: strain rather than joy (pitch range, low-frequency slope)",
  prosody: "Prosody",
};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "style") node.style.cssText = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function fmt(x, digits = 1) {
  return Number.isFinite(x) ? x.toFixed(digits) : "–";
}

// A canvas redrawn at most once per animation frame, at the screen's pixel density.
class CanvasView {
  constructor(canvas) {
    this.canvas = canvas;
    this.pending = false;
    new ResizeObserver(() => this.schedule()).observe(canvas);
  }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => { this.pending = false; this.draw(); });
  }

  blank() {  // sized to the element, cleared; drawing in CSS pixels
    const c = this.canvas;
    const dpr = window.devicePixelRatio || 1;
    const w = c.clientWidth, h = c.clientHeight;
    if (c.width !== w * dpr || c.height !== h * dpr) { c.width = w * dpr; c.height = h * dpr; }
    const g = c.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    return { g, w, h };
  }
}

// --- emotion heat strip: one column per window, one row per emotion ----------------------------

class HeatStrip extends CanvasView {
  constructor(canvas) {
    super(canvas);
    this.columns = [];
  }

  clear() { this.columns = []; this.schedule(); }

  push(result) {
    this.columns.push(result.scores);
    if (this.columns.length > MAX_POINTS) this.columns.splice(0, this.columns.length - MAX_POINTS);
    this.schedule();
  }

  setAll(results) { this.columns = results.slice(-MAX_POINTS).map(r => r.scores); this.schedule(); }

  draw() {
    const { g, w, h } = this.blank();
    const labelW = 78, rowH = h / EMOTIONS.length;
    g.font = "12px system-ui, sans-serif";
    g.textBaseline = "middle";
    EMOTIONS.forEach((e, i) => {
      g.fillStyle = "#b4b8c5";
      g.fillText(e, 4, (i + 0.5) * rowH);
    });
    const n = Math.max(this.columns.length, 30);
    const colW = (w - labelW) / n;
    const x0 = w - this.columns.length * colW;
    this.columns.forEach((scores, j) => {
      EMOTIONS.forEach((e, i) => {
        const p = scores[e] || 0;
        g.globalAlpha = Math.min(1, 0.06 + p * 1.6);
        g.fillStyle = EMOTION_COLORS[e];
        g.fillRect(x0 + j * colW, i * rowH + 1, Math.ceil(colW), rowH - 2);
      });
    });
    g.globalAlpha = 1;
  }
}

// --- utterances: one band per utterance, coloured by its emotion, one lane per party ------------

const MAX_UTTERANCES = 1000;
const UTTERANCE_SPAN_S = 600; // the last ten minutes on screen, as the charts keep

class UtteranceBands extends CanvasView {
  constructor(canvas, tip) {
    super(canvas);
    this.tip = tip;
    this.items = [];
    this.until = 0; // audio time shown up to: the latest result's end
    this.drawn = []; // [x0, x1, y0, y1, utterance] of the last draw, for hovering
    canvas.addEventListener("mousemove", e => this.hover(e));
    canvas.addEventListener("mouseleave", () => { this.tip.hidden = true; });
  }

  clear() { this.items = []; this.until = 0; this.schedule(); }

  push(u) {  // once each (a track's utterance_seq), whatever order a replay brings them in
    const key = `${u.track || ""}/${u.utterance_seq}`;
    if (this.items.some(x => `${x.track || ""}/${x.utterance_seq}` === key)) return;
    this.items.push(u);
    this.items.sort((a, b) => a.start_s - b.start_s);
    if (this.items.length > MAX_UTTERANCES) this.items.splice(0, this.items.length - MAX_UTTERANCES);
    this.until = Math.max(this.until, u.end_s);
    this.schedule();
  }

  setAll(list) { this.clear(); for (const u of list) this.push(u); }

  reach(endS) { if (endS > this.until) { this.until = endS; this.schedule(); } }

  get count() { return this.items.length; }

  lanes() {
    return [...new Set(this.items.map(u => u.track || "speaker"))].sort();
  }

  draw() {
    const { g, w, h } = this.blank();
    const lanes = this.lanes();
    const labelW = 78, axisH = 16;
    const laneH = (h - axisH) / Math.max(1, lanes.length);
    const t1 = Math.max(this.until, 10), t0 = Math.max(0, t1 - UTTERANCE_SPAN_S);
    const x = t => labelW + (t - t0) / (t1 - t0) * (w - labelW);
    g.font = "12px system-ui, sans-serif";
    g.textBaseline = "middle";
    g.fillStyle = "#b4b8c5";
    lanes.forEach((name, i) => g.fillText(name, 4, (i + 0.5) * laneH));
    if (!lanes.length) g.fillText("No utterance yet: each appears when its speaker pauses.", labelW, laneH / 2);
    this.drawn = [];
    for (const u of this.items) {
      if (u.end_s < t0) continue;
      const lane = lanes.indexOf(u.track || "speaker");
      const x0 = x(Math.max(u.start_s, t0)), x1 = Math.max(x0 + 2, x(u.end_s));
      const y0 = lane * laneH + 3, y1 = (lane + 1) * laneH - 3;
      g.globalAlpha = 0.35 + 0.65 * Math.min(1, u.confidence || 0);
      g.fillStyle = EMOTION_COLORS[u.emotion] || "#60646c";
      g.fillRect(x0, y0, x1 - x0, y1 - y0);
      this.drawn.push([x0, x1, y0, y1, u]);
    }
    g.globalAlpha = 1;
    g.fillStyle = "#b4b8c5";
    g.textBaseline = "alphabetic";
    const step = t1 - t0 > 120 ? 60 : t1 - t0 > 30 ? 10 : 5;
    for (let t = Math.ceil(t0 / step) * step; t <= t1; t += step) {
      const label = `${t}s`, tw = g.measureText(label).width;
      g.fillText(label, Math.min(Math.max(labelW, x(t) - tw / 2), w - tw), h - 3);
    }
  }

  at(px, py) {
    return (this.drawn.find(([x0, x1, y0, y1]) => px >= x0 && px <= x1 && py >= y0 && py <= y1) || [])[4];
  }

  hover(e) {
    const box = this.canvas.getBoundingClientRect();
    const u = this.at(e.clientX - box.left, e.clientY - box.top);
    if (!u) { this.tip.hidden = true; return; }
    const top = Object.entries(u.scores).sort((a, b) => b[1] - a[1]);
    this.tip.replaceChildren(
      el("strong", { style: `color:${EMOTION_COLORS[u.emotion]}` }, `${u.emotion} ${(u.confidence * 100).toFixed(0)}%`),
      ` · ${u.track || "speaker"} · ${fmt(u.start_s)}–${fmt(u.end_s)} s · stress ${fmt(u.stress.index, 0)} (${u.stress.level})`,
      el("div", { class: "muted small" }, derived(u.circumplex)),
      u.random_weights ? el("div", { class: "muted small" }, "random-weight model: these are not emotions") : "",
      ...top.map(([label, p]) => el("div", { class: "tip-row", "data-label": label },
        el("span", { class: "bar-label" }, label), `${(p * 100).toFixed(1)}%`)));
    this.tip.hidden = false;
    const px = e.clientX - box.left, py = e.clientY - box.top;
    const flip = px + 12 + this.tip.offsetWidth > box.width; // near the right edge: to the left
    this.tip.style.left = `${flip ? px - 12 - this.tip.offsetWidth : px + 12}px`;
    this.tip.style.top = `${py + 12}px`;
  }
}

// --- stress index over time, on the four level bands ------------------------------------------

class StressChart {
  constructor(container) {
    this.container = container;
    this.x = []; this.index = []; this.raw = [];
    this.pending = false;
    const bands = {
      hooks: {
        drawClear: [u => {
          const { ctx, bbox } = u;
          let from = 0;
          for (const level of LEVELS) {
            const top = u.valToPos(level.upTo, "y", true), bottom = u.valToPos(from, "y", true);
            ctx.fillStyle = level.color;
            ctx.fillRect(bbox.left, top, bbox.width, bottom - top);
            from = level.upTo;
          }
        }],
      },
    };
    this.plot = new uPlot({
      width: container.clientWidth || 600,
      height: 190,
      plugins: [bands],
      scales: { x: { time: false }, y: { range: [0, 100] } },
      axes: [
        { stroke: "#b4b8c5", grid: { stroke: "rgba(255,255,255,0.05)" }, label: "seconds", labelSize: 18, size: 34 },
        { stroke: "#b4b8c5", grid: { stroke: "rgba(255,255,255,0.05)" }, values: (u, v) => v, size: 36 },
      ],
      legend: { show: false },
      cursor: { drag: { x: false, y: false } },
      series: [
        {},
        { label: "stress", stroke: "#f5f6fa", width: 2 },
        { label: "this window", stroke: "rgba(245,246,250,0.45)", width: 1, dash: [4, 4] },
      ],
    }, [[], [], []], container);
    new ResizeObserver(() => this.plot.setSize({ width: container.clientWidth, height: 190 })).observe(container);
  }

  clear() { this.x = []; this.index = []; this.raw = []; this.schedule(); }

  push(result) {
    this.x.push(result.end_s); this.index.push(result.stress.index); this.raw.push(result.stress.raw_index);
    if (this.x.length > MAX_POINTS) { this.x.shift(); this.index.shift(); this.raw.shift(); }
    this.schedule();
  }

  setAll(results) {
    this.clear();
    for (const r of results.slice(-MAX_POINTS)) this.push(r);
  }

  get points() { return this.x.length; }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.plot.setData([this.x, this.index, this.raw]);
    });
  }
}

// --- the latest window: emotion distribution and the stress components ------------------------

function renderDistribution(container, result) {
  const rows = EMOTIONS.map(e => {
    const p = result ? result.scores[e] || 0 : 0;
    return el("div", { class: "bar-row" },
      el("span", { class: "bar-label" }, e),
      el("span", { class: "bar" }, el("span", { class: "bar-fill", style: `width:${(p * 100).toFixed(1)}%;background:${EMOTION_COLORS[e]}` })),
      el("span", { class: "bar-value" }, `${(p * 100).toFixed(0)}%`));
  });
  container.replaceChildren(...rows);
}

// Median pitch travels as semitones re 100 Hz (what the z-score uses); people read hertz.
// A result after windows the server dropped unanalysed (expired: they could not be answered
// within its latency budget), or whose hop is well over the configured one: it was thinned.
function thinned(result, hopS) {
  if (result.expired) {
    return ` · thinned: ${result.expired} window(s) before this one expired unanalysed (server at capacity)`;
  }
  return result.hop_s != null && hopS && result.hop_s > 1.5 * hopS
    ? ` · thinned: ${fmt(result.hop_s, 1)} s since the previous result` : "";
}

// Valence and arousal projected from the scores (engine/circumplex.py): said to be derived.
function derived(c) {
  if (!c || c.valence == null) return "valence / arousal: – (no label with a place on the circumplex)";
  const signed = x => `${x >= 0 ? "+" : "−"}${Math.abs(x).toFixed(2)}`;
  const share = c.mapped < 0.999 ? `, ${(c.mapped * 100).toFixed(0)}% of the scores placed` : "";
  return `valence ${signed(c.valence)} · arousal ${signed(c.arousal)} (derived from the emotion scores${share})`;
}

function measure(value, unit, withUnit = true) {
  const [text, shown] = unit === "semitones re 100 Hz" ? [fmt(100 * 2 ** (value / 12), 0), "Hz"] : [fmt(value, 2), unit];
  return withUnit ? `${text} ${shown}` : text;
}

function renderComponents(container, stress) {
  if (!stress) { container.replaceChildren(el("p", { class: "muted" }, "No stress value yet.")); return; }
  const entries = Object.entries(stress.components)
    .filter(([, c]) => c.weight !== 0)  // measures the fitted index does not use
    .sort((a, b) => Math.abs(b[1].points || 0) - Math.abs(a[1].points || 0));
  const rows = entries.map(([name, c]) => {
    const points = c.points || 0;
    const detail = c.available === false
      ? `not measured for this window (${c.reason}); stress rests on the emotions, with lower confidence`
      : "measures" in c
        ? `${Object.entries(c.measures).map(([k, z]) => `${COMPONENT_NAMES[k] || k} z ${z >= 0 ? "+" : ""}${fmt(z, 2)}`).join(", ")}`
      : "z" in c
        ? `${measure(c.value, c.unit)} (baseline ${measure(c.baseline, c.unit, false)}, z ${c.z >= 0 ? "+" : ""}${fmt(c.z, 2)}${c.either_way ? ", counts either way" : ""})`
        : `${fmt(c.value * 100, 0)}% of the emotion distribution (usual ${fmt((c.baseline || 0) * 100, 0)}%)`;
    const width = Math.min(100, Math.abs(points) * 2);
    return el("div", { class: "comp-row", "data-component": name },
      el("span", { class: "comp-name" }, COMPONENT_NAMES[name] || name),
      el("span", { class: "comp-detail muted" }, detail),
      el("span", { class: "comp-points " + (points >= 0 ? "up" : "down") },
        el("span", { class: "comp-bar", style: `width:${width}%` }), `${points >= 0 ? "+" : ""}${fmt(points, 1)}`));
  });
  const note = stress.calibrating ? [el("p", { class: "muted" }, "Learning this voice's baseline: the first windows of speech are the reference.")] : [];
  container.replaceChildren(...note, ...rows);
}

// --- export -----------------------------------------------------------------------------------

function download(name, content, type) {
  const url = URL.createObjectURL(new Blob([content], { type }));
  const a = el("a", { href: url, download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

window.Views = { EMOTIONS, EMOTION_COLORS, LEVELS, HeatStrip, StressChart, UtteranceBands, renderDistribution, renderComponents, download, el, fmt, thinned, derived };
})();
