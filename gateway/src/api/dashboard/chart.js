// A small line chart on a canvas: a few series of [t, v] points, time on x, autoscaled y,
// drawn in the page's colours. Redraws at most once per animation frame, so thousands of
// points and frequent updates stay cheap.

function css(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim() || "#888";
}

function niceStep(span, ticks) {
  const raw = span / Math.max(ticks, 1);
  const mag = Math.pow(10, Math.floor(Math.log10(raw || 1)));
  const norm = raw / mag;
  return (norm < 1.5 ? 1 : norm < 3 ? 2 : norm < 7 ? 5 : 10) * mag;
}

function label(v) {
  const a = Math.abs(v);
  if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
  if (a >= 1e4) return (v / 1e3).toFixed(0) + "k";
  if (a >= 100) return v.toFixed(0);
  return +v.toFixed(2) + "";
}

function clock(t, span) {
  const d = new Date(t);
  const hm = d.toTimeString().slice(0, 5);
  return span > 2 * 86400000 ? `${d.getMonth() + 1}/${d.getDate()} ${hm}` : span > 600000 ? hm : d.toTimeString().slice(0, 8);
}

export class LineChart {
  constructor(canvas) {
    this.canvas = canvas;
    this.series = [];
    this.window = null; // [from, to] in ms, or null: fit the data
    this.zero = false; // keep 0 on the y axis (rates)
    this.markers = []; // [{ from, to, label }]: shaded spans (anomalies), in ms
    this.pending = false;
  }

  // series: [{ points: [[t, v], ...], dashed?: bool, colour?: string }]
  set(series, window) {
    this.series = series;
    this.window = window || null;
    this.draw();
  }

  draw() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.paint();
    });
  }

  paint() {
    const c = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    const w = c.clientWidth || c.width;
    const h = c.clientHeight || c.height;
    if (c.width !== Math.round(w * ratio)) {
      c.width = Math.round(w * ratio);
      c.height = Math.round(h * ratio);
    }
    const g = c.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, w, h);
    const pad = { l: 48, r: 10, t: 8, b: 20 };
    let t0 = Infinity, t1 = -Infinity, v0 = Infinity, v1 = -Infinity;
    for (const s of this.series) {
      for (const [t, v] of s.points) {
        if (v === null || !isFinite(v)) continue;
        if (t < t0) t0 = t;
        if (t > t1) t1 = t;
        if (v < v0) v0 = v;
        if (v > v1) v1 = v;
      }
    }
    if (this.window) [t0, t1] = this.window;
    if (this.zero && isFinite(v0)) v0 = Math.min(v0, 0);
    g.fillStyle = css("--muted");
    g.font = "11px system-ui, sans-serif";
    if (!isFinite(v0) || !isFinite(t0) || t1 <= t0) {
      g.fillText("no data yet", pad.l, h / 2);
      return;
    }
    if (v1 === v0) { v1 += 1; v0 -= this.zero && v0 === 0 ? 0 : 1; }
    const span = v1 - v0;
    if (!(this.zero && v0 === 0)) v0 -= span * 0.05;
    v1 += span * 0.05;
    const x = (t) => pad.l + ((t - t0) / (t1 - t0)) * (w - pad.l - pad.r);
    const y = (v) => h - pad.b - ((v - v0) / (v1 - v0)) * (h - pad.t - pad.b);
    // Grid and labels.
    g.strokeStyle = css("--line");
    g.lineWidth = 1;
    const vs = niceStep(v1 - v0, 4);
    for (let v = Math.ceil(v0 / vs) * vs; v <= v1; v += vs) {
      g.beginPath(); g.moveTo(pad.l, y(v)); g.lineTo(w - pad.r, y(v)); g.stroke();
      g.fillText(label(v), 4, y(v) + 4);
    }
    const ts = niceStep(t1 - t0, 5);
    for (let t = Math.ceil(t0 / ts) * ts; t <= t1; t += ts) {
      const text = clock(t, t1 - t0);
      const tw = g.measureText(text).width;
      g.fillText(text, Math.min(Math.max(x(t) - tw / 2, pad.l), w - pad.r - tw), h - 5);
    }
    // Markers: a shaded span (at least 3 px wide) with a tick on top, under the lines.
    g.fillStyle = css("--bad");
    for (const m of this.markers) {
      if (m.to < t0 || m.from > t1) continue;
      const a = x(Math.max(m.from, t0));
      const b = Math.max(x(Math.min(m.to, t1)), a + 3);
      g.globalAlpha = 0.18;
      g.fillRect(a, pad.t, b - a, h - pad.t - pad.b);
      g.globalAlpha = 1;
      g.fillRect(a, pad.t, b - a, 3);
    }
    g.fillStyle = css("--muted");
    // Lines.
    const palette = [css("--accent"), css("--ok"), css("--warn"), css("--bad")];
    this.series.forEach((s, i) => {
      g.strokeStyle = s.colour || palette[i % palette.length];
      g.lineWidth = 1.5;
      g.setLineDash(s.dashed ? [5, 4] : []);
      g.beginPath();
      let open = false;
      for (const [t, v] of s.points) {
        if (v === null || !isFinite(v) || t < t0 || t > t1) { open = false; continue; }
        if (open) g.lineTo(x(t), y(v)); else { g.moveTo(x(t), y(v)); open = true; }
      }
      g.stroke();
    });
    g.setLineDash([]);
  }
}
