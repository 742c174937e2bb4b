"use strict";
// Everything below runs offline: no request leaves this page except to its own server.
const INFERNO = [[0,0,4],[31,12,72],[85,15,109],[136,34,106],[186,54,85],[227,89,51],[249,140,10],[249,201,50],[252,255,164]];
const PALETTE = [null,[230,60,60],[60,200,90],[70,130,250],[240,200,40],[200,80,220],[60,210,210],[250,140,60]];
function fitSize() {  // a panel's longer side in CSS pixels at zoom 1: three panels fill the stage
  const stage = $("stage"), width = stage ? stage.clientWidth - 80 : 1320;
  return Math.max(200, Math.min(Math.floor(width / 3), window.innerHeight - 260));
}
const $ = (id) => document.getElementById(id);
const viewer = window.segcamViewer = {
  info: null, slice: null, result: null, maps: {}, panelMaps: [null, null], request: null, busy: false,
  timings: [], brushes: new Map(), zoom: 1, magnify: 1, pan: {x: 0, y: 0}, window: null,
  cursor: null, readout: null, tri: {}, seq: 0, controller: null, confirmed: new Set(),
  client: Math.random().toString(36).slice(2, 12),
  slices: {}, shownAxis: null,  // the slice each view showed last
};

function decode(b64, Type) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return new Type(bytes.buffer);
}
function encode(bytes) {
  let text = "";
  for (let i = 0; i < bytes.length; i += 8192) text += String.fromCharCode.apply(null, bytes.subarray(i, i + 8192));
  return btoa(text);
}
function status(text, error) { const s = $("status"); s.textContent = text; s.className = error ? "error" : ""; }
const TOKEN = new URLSearchParams(window.location.search).get("token") || "";
async function api(path, body, signal) {
  const options = body === undefined ? {headers: {"X-Segcam-Token": TOKEN}} : {method: "POST", body: body instanceof Blob ? body : JSON.stringify(body),
    headers: {"Content-Type": body instanceof Blob ? "application/octet-stream" : "application/json", "X-Segcam-Token": TOKEN}, signal};
  const response = await fetch(path, options);
  const data = await response.json();
  if (!response.ok) { const error = new Error(data.error || response.statusText); error.superseded = !!data.superseded; throw error; }
  return data;
}
async function download(body) {
  const response = await fetch("/api/export", {method: "POST", body: JSON.stringify(body),
    headers: {"Content-Type": "application/json", "X-Segcam-Token": TOKEN}});
  if (!response.ok) { const data = await response.json(); throw new Error(data.error || response.statusText); }
  const name = (response.headers.get("Content-Disposition") || "").match(/filename="([^"]+)"/);
  const link = document.createElement("a");
  link.href = URL.createObjectURL(await response.blob());
  link.download = name ? name[1] : "segcam-export";
  document.body.appendChild(link); link.click(); link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}
// "save view": what is on screen as one PNG: each panel's title, its image with the window,
// overlays, outlines and orientation labels as shown, and the maps' colour bars with their range
const SAVE = {pad: 8, title: 20, below: 26};
function savedView() {
  const ids = layoutThree() ? ["tri0", "tri1", "tri2"] : ["view-prediction", "view0", "view1"];
  const canvases = ids.map((id) => $(id)).filter((c) => c.width > 0 && c.offsetParent !== null);
  const {pad, title, below} = SAVE;
  const out = document.createElement("canvas");
  out.width = canvases.reduce((w, c) => w + c.width + pad, pad);
  out.height = title + Math.max(...canvases.map((c) => c.height)) + below;
  const g = out.getContext("2d");
  g.fillStyle = "#16181d"; g.fillRect(0, 0, out.width, out.height);
  let x = pad;
  for (const c of canvases) {
    const panel = c.closest(".panel");
    g.font = "600 13px system-ui, sans-serif"; g.fillStyle = "#e8e8e8"; g.textBaseline = "alphabetic";
    g.fillText(panel.querySelector("h2").textContent, x, title - 6);
    g.drawImage(c, x, title);
    g.font = "600 13px system-ui, sans-serif"; g.fillStyle = "#ffd24a"; g.textBaseline = "middle";
    for (const span of c.parentElement.querySelectorAll(".dir")) {
      const side = ["top", "bottom", "left", "right"].find((k) => span.classList.contains(k)), w = g.measureText(span.textContent).width;
      const at = {top: [x + (c.width - w) / 2, title + 9], bottom: [x + (c.width - w) / 2, title + c.height - 9],
                  left: [x + 4, title + c.height / 2], right: [x + c.width - 4 - w, title + c.height / 2]}[side];
      g.fillText(span.textContent, ...at);
    }
    const bar = panel.querySelector(".bar canvas"), tick = (name) => panel.querySelector(`.ticks span:nth-child(${name})`);
    if (bar && tick(3) && tick(3).textContent) {  // the colour bar with its ticks, as on screen
      const y = title + c.height + 4;
      g.drawImage(bar, x, y);
      g.font = "11px system-ui, sans-serif"; g.fillStyle = "#e8e8e8"; g.textBaseline = "top";
      const texts = [1, 2, 3].map((n) => tick(n).textContent), widths = texts.map((t) => g.measureText(t).width);
      g.fillText(texts[0], x, y + bar.height + 2);
      g.fillText(texts[1], x + (bar.width - widths[1]) / 2, y + bar.height + 2);
      g.fillText(texts[2], x + bar.width - widths[2], y + bar.height + 2);
    }
    x += c.width + pad;
  }
  return out;
}
function saveView() {
  savedView().toBlob((blob) => {
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = `segcam-view-${(viewer.info.title || "input").replace(/[^A-Za-z0-9._-]+/g, "_")}.png`;
    document.body.appendChild(link); link.click(); link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  }, "image/png");
}
// signed maps and differences: blue (negative) - white - red (positive), symmetric about 0
const DIVERGING = [[33,102,172],[103,169,207],[209,229,240],[247,247,247],[253,219,199],[239,138,98],[178,24,43]];
function diverging(v) {  // v in [-1, 1]
  const x = (Math.min(Math.max(v, -1), 1) + 1) / 2 * (DIVERGING.length - 1), i = Math.min(Math.floor(x), DIVERGING.length - 2), f = x - i;
  return DIVERGING[i].map((a, k) => a * (1 - f) + DIVERGING[i + 1][k] * f);
}
// colour maps for positive maps (per panel); signed maps and differences use DIVERGING
const SEQUENTIAL = {
  inferno: INFERNO,
  viridis: [[68,1,84],[72,40,120],[62,74,137],[49,104,142],[38,130,142],[31,158,137],[53,183,121],[109,205,89],[180,222,44],[253,231,37]],
  hot: [[10,0,0],[120,0,0],[230,0,0],[255,90,0],[255,180,0],[255,240,60],[255,255,200]],
  grey: [[0,0,0],[255,255,255]],
};
function ramp(anchors, v) {
  const x = Math.min(Math.max(v, 0), 1) * (anchors.length - 1), i = Math.min(Math.floor(x), anchors.length - 2), f = x - i;
  return anchors[i].map((a, k) => a * (1 - f) + anchors[i + 1][k] * f);
}
function inferno(v) {
  const x = Math.min(Math.max(v, 0), 1) * (INFERNO.length - 1), i = Math.min(Math.floor(x), INFERNO.length - 2), f = x - i;
  return INFERNO[i].map((a, k) => a * (1 - f) + INFERNO[i + 1][k] * f);
}

// ---------------------------------------------------------------- geometry of the shown planes
const three = () => viewer.info.dims === 3;
const layoutThree = () => three() && $("layout").value === "three";
function axisNow() { return three() ? Number($("axis").value) : -1; }
function plane(axis) {  // rows/cols voxel axes, flips, spacing and labels of a view
  if (!three()) return viewer.info.flat || {rows: {axis: 0, flip: false, size: viewer.info.shape[0]}, cols: {axis: 1, flip: false, size: viewer.info.shape[1]}, labels: {}, spacing: [1, 1], name: "image"};
  return viewer.info.planes[axis];
}
function view() { return three() ? {axis: axisNow(), index: Number($("slice").value)} : {}; }
function toIndex(row, col, axis = axisNow(), index = Number($("slice").value)) {  // shown pixel -> voxel index
  const p = plane(axis), voxel = three() ? [0, 0, 0] : [0, 0];
  voxel[p.rows.axis] = p.rows.flip ? p.rows.size - 1 - row : row;
  voxel[p.cols.axis] = p.cols.flip ? p.cols.size - 1 - col : col;
  if (three()) voxel[axis] = index;
  return voxel;
}
function toPixel(voxel, axis) {  // voxel index -> shown [row, col] on a view across axis
  const p = plane(axis), r = voxel[p.rows.axis], c = voxel[p.cols.axis];
  return [p.rows.flip ? p.rows.size - 1 - r : r, p.cols.flip ? p.cols.size - 1 - c : c];
}
function scales(axis, h, w) {  // CSS pixels per shown row and column (physical aspect kept)
  const [sy, sx] = plane(axis).spacing, unit = Math.min(sy, sx), ry = sy / unit, rx = sx / unit;
  const longest = Math.max(h * ry, w * rx), room = fitSize() / longest;
  const fit = room >= 4 ? Math.floor(room) : Math.floor(room * 4) / 4;  // whole or quarter steps
  return {fit, y: fit * ry * viewer.magnify, x: fit * rx * viewer.magnify, width: Math.round(w * rx * fit), height: Math.round(h * ry * fit)};
}

// ---------------------------------------------------------------- drawing
function edges(mask, h, w, i, j) {
  return mask[i * w + j] && (i === 0 || j === 0 || i === h - 1 || j === w - 1 || !mask[(i - 1) * w + j] || !mask[(i + 1) * w + j] || !mask[i * w + j - 1] || !mask[i * w + j + 1]);
}
function labelEdges(labels, h, w, i, j) {  // a labelled pixel beside another label (or none)
  const v = labels[i * w + j];
  return v && (i === 0 || j === 0 || i === h - 1 || j === w - 1 || labels[(i - 1) * w + j] !== v || labels[(i + 1) * w + j] !== v || labels[i * w + j - 1] !== v || labels[i * w + j + 1] !== v);
}
function truthColour(label) {  // the class's colour, lightened: outlines, not the prediction's fill
  const colour = PALETTE[label % PALETTE.length] || [255, 255, 255];
  return colour.map((v) => Math.round((v + 2 * 255) / 3));
}
function grey(values, p) {
  const {level, width} = viewer.window, g = (values[p] - (level - width / 2)) / width;
  return 255 * Math.min(Math.max(g, 0), 1);
}
function draw(canvas, axis, data, paint, extra) {
  const [h, w] = data.shape, s = scales(axis, h, w);
  canvas.width = s.width; canvas.height = s.height;
  canvas.style.width = `${s.width}px`; canvas.style.height = `${s.height}px`;
  canvas.dataset.axis = axis;
  const image = new ImageData(w, h), truth = $("showTruth").checked && data.truth;
  for (let p = 0; p < h * w; p++) {
    let rgb = paint(p, grey(data.intensity, p));
    const i = Math.floor(p / w), j = p % w;
    // every border of the truth, also between two labels (a tumour inside the liver)
    if (truth && truth[p] && labelEdges(truth, h, w, i, j)) rgb = truthColour(truth[p]);
    if (data.set && edges(data.set, h, w, i, j)) rgb = [80, 220, 255];
    image.data.set([rgb[0], rgb[1], rgb[2], 255], 4 * p);
  }
  const off = new OffscreenCanvas(w, h); off.getContext("2d").putImageData(image, 0, 0);
  const context = canvas.getContext("2d"); context.imageSmoothingEnabled = false;
  context.fillStyle = "#000"; context.fillRect(0, 0, s.width, s.height);
  context.setTransform(s.x, 0, 0, s.y, viewer.pan.x, viewer.pan.y);
  context.drawImage(off, 0, 0);
  context.setTransform(1, 0, 0, 1, 0, 0);
  if (extra) extra(context, s);
  const frame = canvas.parentElement, labels = plane(axis).labels || {};
  frame.querySelectorAll(".dir").forEach((e) => e.remove());
  for (const side of ["top", "bottom", "left", "right"]) if (labels[side]) {
    const span = document.createElement("span"); span.className = `dir ${side}`; span.textContent = labels[side]; frame.appendChild(span);
  }
}
function overlays(context, s) {  // the box being dragged; the pointer, mirrored on every panel
  const at = viewer.pointer;
  if (at && !viewer.drag && at.axis === axisNow()) {
    // on whole device pixels (+0.5): a crisp one-pixel line
    const x = Math.floor(viewer.pan.x + (at.col + 0.5) * s.x) + 0.5, y = Math.floor(viewer.pan.y + (at.row + 0.5) * s.y) + 0.5;
    context.strokeStyle = "rgba(255, 255, 255, 0.9)"; context.lineWidth = 1;
    context.beginPath(); context.moveTo(x - 6, y); context.lineTo(x - 2, y); context.moveTo(x + 2, y); context.lineTo(x + 6, y);
    context.moveTo(x, y - 6); context.lineTo(x, y - 2); context.moveTo(x, y + 2); context.lineTo(x, y + 6); context.stroke();
  }
  if (viewer.drag) {
    const d = viewer.drag; context.strokeStyle = "#5df"; context.lineWidth = 2;
    context.strokeRect(viewer.pan.x + Math.min(d.c0, d.c1) * s.x, viewer.pan.y + Math.min(d.r0, d.r1) * s.y, (Math.abs(d.c1 - d.c0) + 1) * s.x, (Math.abs(d.r1 - d.r0) + 1) * s.y);
  }
}
function mapPaint(data, scale, opacity, signed, colours = INFERNO) {
  // the transparency ramp: a value's opacity grows with its size; below the threshold, none
  const threshold = Number($("threshold").value) / 100;
  return (p, g, base = [g, g, g]) => {  // over a grey value, or over a coloured base
    if (!data || !$("showMap").checked) return base;
    const v = signed ? data[p] / scale : Math.max(data[p], 0) / scale, size = Math.min(Math.abs(v), 1);
    if (size <= threshold || size === 0) return base;
    const a = opacity * size, rgb = signed ? diverging(v) : ramp(colours, v);
    return rgb.map((c, i) => (1 - a) * base[i] + a * c);
  };
}
function drawBar(canvas, signed, opacity, colours = INFERNO) {  // the colour ramp as drawn over mid grey, with its transparency
  const g = canvas.getContext("2d"), n = canvas.width, threshold = Number($("threshold").value) / 100;
  for (let x = 0; x < n; x++) {
    const v = signed ? 2 * x / (n - 1) - 1 : x / (n - 1), size = Math.abs(v), a = size <= threshold ? 0 : opacity * size;
    const rgb = (signed ? diverging(v) : ramp(colours, v)).map((c) => Math.round((1 - a) * 128 + a * c));
    g.fillStyle = `rgb(${rgb[0]},${rgb[1]},${rgb[2]})`; g.fillRect(x, 0, 1, canvas.height);
  }
}
const fmt = (v) => (v === 0 ? "0" : Number(v.toPrecision(3)).toString());
function ticks(k, scale, signed) {  // the colour bar's ticks: 0 to the maximum, or -s, 0, +s
  $("low" + k).textContent = signed ? fmt(-scale) : "0";
  $("mid" + k).textContent = signed ? "0" : fmt(scale / 2);
  $("high" + k).textContent = fmt(scale);
}
// what panel k shows on the current cut: values, whether they are signed, the scale, the note
function panelView(k, source) {
  const maps = source.panelMaps || [], own = maps[k], mode = $("show" + k).value;
  if (!own) return null;
  const perSlice = $("scale").value === "slice", entry = own.entry;
  const sliceAbs = (data) => { let m = 0; for (let i = 0; i < data.length; i++) { const a = Math.abs(data[i]); if (a > m) m = a; } return m; };
  if (mode === "difference" && k === 1 && maps[0]) {
    // the left map as the left panel shows it minus the right map, each divided by its own
    // maximum over the whole input (their scales differ by orders of magnitude between methods)
    const left = panelView(0, source), b = own.data, d = new Float32Array(b.length);
    const leftScale = left.signed ? Math.max(Math.abs(maps[0].entry.min), Math.abs(maps[0].entry.signed_max)) : maps[0].entry.max;
    const sa = leftScale > 0 ? leftScale : 1, sb = entry.max > 0 ? entry.max : 1;
    for (let i = 0; i < b.length; i++) d[i] = left.data[i] / sa - Math.max(b[i], 0) / sb;
    const top = perSlice ? sliceAbs(d) : 1;
    return {data: d, signed: true, scale: top > 0 ? top : 1, top, label: `±${fmt(top)} of each map's maximum (${perSlice ? "this slice" : "whole input"})`, entry, mode,
      note: sliceAbs(d) === 0 ? "the two maps are equal on this slice" : ""};
  }
  if (mode === "signed" && own.signed) {
    const whole = Math.max(Math.abs(entry.min), Math.abs(entry.signed_max)), top = perSlice ? sliceAbs(own.signed) : whole;
    return {data: own.signed, signed: true, scale: top > 0 ? top : 1, top, label: `±${fmt(top)} (${perSlice ? "this slice" : "whole input"})`, entry, mode, note: ""};
  }
  let sliceMax = 0;
  for (let i = 0; i < own.data.length; i++) if (own.data[i] > sliceMax) sliceMax = own.data[i];
  const top = perSlice ? sliceMax : entry.max;
  let note = "";
  if (sliceMax <= 0) {
    if (entry.slice_min < 0) note = `the map is 0 on this slice because its evidence is negative here (down to ${fmt(entry.slice_min)}): show it signed to see it`;
    else if (entry.max > 0) note = `the map is 0 on this slice (its maximum, ${entry.max.toPrecision(3)}, lies elsewhere)`;
    else note = entry.min < 0 ? `the map is 0 everywhere: its evidence is negative (down to ${fmt(entry.min)}); show it signed` : "the map is 0 everywhere";
  } else if (entry.zero_share > 0.5) {  // ReLU removed the negative evidence there
    const share = 100 * entry.zero_share;
    note = `0 on ${share > 99.9 ? share.toFixed(2) : share.toFixed(1)} % of the input, where its evidence is negative (show it signed)`;
  }
  return {data: own.data, signed: false, scale: top > 0 ? top : 1, top, label: `${top.toPrecision(3)} (${perSlice ? "this slice" : "whole input"})`, entry, mode, note};
}
function panelTitle(k) {
  const method = $("method" + k).value, own = viewer.panelMaps[k];
  if (!own) return `${method} (${viewer.awaiting ? "no pixel set yet" : "computing"})`;
  const e = own.entry, parts = [e.method];
  if (viewer.request && e.layer !== viewer.request.layer) parts.push(`layer ${layerLabel(e.layer)}`);
  if (viewer.request && e.class !== viewer.request.class) parts.push(`class ${viewer.info.classes[e.class]}`);
  const mode = $("show" + k).value;
  if (mode === "signed") parts.push("signed");
  if (mode === "difference" && k === 1) return `difference: left − right (${parts.join(" · ")})`;
  return parts.join(" · ");
}
function layerLabel(name) {  // short: the readable name when the layer has one (the module in the tooltip)
  const l = [...viewer.info.layers, ...(viewer.info.all_layers || [])].find((x) => x.name === name);
  return l && l.label ? l.label : name;
}
// the prediction against the truth, for the chosen class
const COMPARE = {tp: [240, 220, 60], fp: [240, 60, 60], fn: [60, 120, 255], tn: null};
function comparison(predicted, truly) { return predicted ? (truly ? "tp" : "fp") : (truly ? "fn" : "tn"); }
function brushPlane() { return viewer.brushes.get(`${axisNow()}:${Number($("slice").value)}`); }
function render() {
  if (layoutThree()) { renderThree(); return; }
  if (!viewer.slice) return;
  const axis = axisNow(), opacity = Number($("opacity").value) / 100, pred = viewer.slice.prediction;
  const shown = {...viewer.slice, set: viewer.result && viewer.result.setSlice};
  const brush = ["brush", "erase"].includes($("mode").value) ? brushPlane() : null;
  const truth = viewer.slice.truth, compare = $("compare").checked && truth, c = Number($("class").value);
  draw($("view-prediction"), axis, shown, (p, g) => {
    let rgb = [g, g, g];
    const colour = compare ? COMPARE[comparison(pred[p] === c, truth[p] === c)]
      : $("showPrediction").checked && PALETTE[pred[p] % PALETTE.length];
    if (colour) rgb = colour.map((v) => 0.55 * g + 0.45 * v);
    if (brush && brush[p]) rgb = rgb.map((c, k) => 0.5 * c + 0.5 * [80, 220, 255][k]);
    return rgb;
  }, overlays);
  viewer.zoom = scales(axis, ...viewer.slice.shape).x;
  [0, 1].forEach((k) => {
    const shownMap = panelView(k, viewer);
    $("name" + k).textContent = panelTitle(k);
    $("name" + k).title = viewer.panelMaps[k] ? `layer ${viewer.panelMaps[k].entry.layer}` : "";
    $("max" + k).textContent = shownMap ? shownMap.label : "";
    $("note" + k).textContent = shownMap ? shownMap.note : "";
    const own = viewer.panelMaps[k], panelSet = own && own.set ? own.set : shown.set;
    const ownOpacity = Number($("opacity" + k).value) / 100, colours = SEQUENTIAL[$("cmap" + k).value] || INFERNO;
    draw($("view" + k), axis, {...shown, set: panelSet}, mapPaint(shownMap && shownMap.data, shownMap ? shownMap.scale : 1, ownOpacity, shownMap && shownMap.signed, colours), overlays);
    const signed = Boolean(shownMap && shownMap.signed);
    drawBar($("bar" + k), signed, ownOpacity, colours);
    if (shownMap) ticks(k, shownMap.top, signed); else ["low", "mid", "high"].forEach((t) => { $(t + k).textContent = ""; });
  });
  drawStrip();
  setInfo();
  // the read-out follows the pointer: a new slice or new maps under a still mouse are read again
  if (viewer.pointer && viewer.pointer.axis === axis) readAt(toIndex(viewer.pointer.row, viewer.pointer.col), axis);
}
function renderThree() {
  const k = Number($("triMap").value), method = $("method" + k).value, opacity = Number($("opacity" + k).value) / 100;
  const colours = SEQUENTIAL[$("cmap" + k).value] || INFERNO;
  const c = Number($("class").value), compare = $("compare").checked;
  let shownTop = null, shownSigned = false;
  [0, 1, 2].forEach((axis) => {
    const t = viewer.tri[axis];
    $("triName" + axis).textContent = `${plane(axis).name} ${viewer.cursor[axis]} / ${viewer.info.shape[axis] - 1} · ${t && t.panelMaps ? panelTitle(k) : method}`;
    $("triSlice" + axis).max = viewer.info.shape[axis] - 1; $("triSlice" + axis).value = viewer.cursor[axis];
    if (!t) return;
    const shownMap = t.panelMaps ? panelView(k, t) : null, pred = t.slice.prediction, truth = t.slice.truth;
    if (shownMap) { shownTop = shownMap.top; shownSigned = shownMap.signed; }
    const paintMap = mapPaint(shownMap && shownMap.data, shownMap ? shownMap.scale : 1, opacity, shownMap && shownMap.signed, colours);
    const own = t.panelMaps && t.panelMaps[k], planeSet = own && own.set ? own.set : t.set;
    draw($("tri" + axis), axis, {...t.slice, set: planeSet}, (p, g) => {
      // the prediction (or the comparison with the truth) under the map, as in the one-plane layout
      const colour = compare && truth ? COMPARE[comparison(pred[p] === c, truth[p] === c)]
        : $("showPrediction").checked && PALETTE[pred[p] % PALETTE.length];
      return paintMap(p, g, colour ? colour.map((v) => 0.7 * g + 0.3 * v) : [g, g, g]);
    }, (context, s) => {
      const [r, cc] = toPixel(viewer.cursor, axis);
      context.strokeStyle = "rgba(120, 255, 120, 0.8)"; context.lineWidth = 1;
      const x = viewer.pan.x + (cc + 0.5) * s.x, y = viewer.pan.y + (r + 0.5) * s.y;
      context.beginPath(); context.moveTo(x, 0); context.lineTo(x, s.height); context.moveTo(0, y); context.lineTo(s.width, y); context.stroke();
    });
  });
  drawBar($("triBar"), shownSigned, opacity, colours);
  $("triLow").textContent = shownTop === null ? "" : (shownSigned ? fmt(-shownTop) : "0");
  $("triMid").textContent = shownTop === null ? "" : (shownSigned ? "0" : fmt(shownTop / 2));
  $("triHigh").textContent = shownTop === null ? "" : fmt(shownTop);
  readAt(viewer.cursor, viewer.tri[2] ? 2 : null);
  setInfo();
}
function drawStrip() {  // per slice along the shown view: where the pixel set and the left map's mass lie
  const canvas = $("strip"), g = canvas.getContext("2d"), r = viewer.result;
  canvas.width = canvas.clientWidth || 900;
  g.fillStyle = "#1a1d22"; g.fillRect(0, 0, canvas.width, canvas.height);
  if (!three() || !r || !r.profile || r.profile.axis !== axisNow()) return;
  const n = r.profile.set.length, w = canvas.width / n, mass = r.profile.maps[0] || [];
  const setTop = Math.max(...r.profile.set, 1), massTop = Math.max(...mass, 0);
  for (let i = 0; i < n; i++) {
    if (r.profile.set[i] > 0) { g.fillStyle = `rgba(80, 220, 255, ${0.35 + 0.65 * r.profile.set[i] / setTop})`; g.fillRect(i * w, 0, Math.max(w - 0.5, 1), 6); }
    if (massTop > 0 && mass[i] > 0) { g.fillStyle = `rgba(250, 150, 40, ${0.25 + 0.75 * mass[i] / massTop})`; g.fillRect(i * w, 7, Math.max(w - 0.5, 1), 7); }
  }
  const here = Number($("slice").value);
  g.fillStyle = "#fff"; g.fillRect(here * w + w / 2 - 1, 0, 2, canvas.height);
}
function world(voxel) {  // voxel index -> world mm (RAS, the affine's); null without an affine
  const a = viewer.info.affine;
  if (!a || voxel.length !== 3) return null;
  return [0, 1, 2].map((r) => a[r][0] * voxel[0] + a[r][1] * voxel[1] + a[r][2] * voxel[2] + a[r][3]);
}
function slicePosition(axis, index) {  // the slice's position in mm along its patient axis
  const a = viewer.info.affine;
  if (!a) return "";
  const centre = viewer.info.shape.map((n) => (n - 1) / 2);
  centre[axis] = index;
  const x = world(centre), column = [a[0][axis], a[1][axis], a[2][axis]];
  const along = column.map(Math.abs).indexOf(Math.max(...column.map(Math.abs)));
  return ` · ${["R", "A", "S"][along]} ${x[along].toFixed(1)} mm`;
}
function setInfo() {  // where the pixel set lies, on the shown view, and its statistics
  const r = viewer.result;
  $("stats").textContent = "";
  if (!r || !r.extent) { $("setinfo").textContent = r ? "the pixel set is empty" : ""; $("goto").disabled = true; return; }
  const st = r.stats || {}, unit = st.unit ? " " + st.unit : "";
  const inside = viewer.panelMaps[0] ? ` · left map's mass inside ${(100 * viewer.panelMaps[0].entry.inside).toFixed(1)} %` : "";
  const count = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
  const volume = st.ml === undefined ? "" : (st.ml >= 1 ? `${st.ml.toFixed(2)} ml` : `${(1000 * st.ml).toPrecision(3)} µl`);
  $("stats").textContent = (volume ? `${volume} · ` : "") + count(st.voxels, three() ? "voxel" : "pixel") +
    (st.mean_intensity !== undefined ? ` · mean ${st.mean_intensity.toFixed(1)}${unit}` : "") + inside;
  if (!three()) { $("setinfo").textContent = `${r.pixels} pixel${r.pixels === 1 ? "" : "s"} in the set`; return; }
  const axis = layoutThree() ? Number(viewer.info.default_axis) : axisNow(), [lo, hi] = r.extent[axis];
  const here = layoutThree() ? viewer.cursor[axis] : Number($("slice").value);
  $("setinfo").textContent = `set: ${r.pixels} voxel${r.pixels === 1 ? "" : "s"}, ${plane(axis).name} slices ${lo}–${hi}` + (here < lo || here > hi ? " (not on this slice)" : "");
  $("goto").disabled = false;
}
function readAt(voxel, axis) {  // the crosshair read-out: voxel, mm, intensity, prediction, truth, map values
  if (!voxel || axis === null) return;
  const t = layoutThree() ? viewer.tri[axis] : viewer;
  if (!t || !t.slice) return;
  const [r, c] = toPixel(voxel, axis), w = t.slice.shape[1], p = r * w + c;
  const unit = viewer.info.intensity.unit;
  const out = {index: voxel, intensity: t.slice.intensity[p], prediction: t.slice.prediction[p], maps: {}, panels: []};
  if (t.slice.truth) out.truth = t.slice.truth[p];
  for (const [method, data] of Object.entries(t.maps || {})) out.maps[method] = data[p];
  (t.panelMaps || []).forEach((m, k) => { if (m) out.panels.push({k, value: m.data[p], signed: m.signed ? m.signed[p] : null, method: m.entry.method}); });
  const mm = world(voxel);
  if (mm) out.world = mm;
  viewer.readout = out;
  const names = viewer.info.classes;
  $("readout").textContent = `voxel (${voxel.join(", ")})` + (mm ? ` · RAS (${mm.map((v) => v.toFixed(1)).join(", ")}) mm` : "") +
    ` · ${out.intensity.toPrecision(5)}${unit ? " " + unit : ""} · prediction ${names[out.prediction] || out.prediction}` +
    (out.truth !== undefined ? ` · truth ${names[out.truth] || out.truth}` : "") +
    out.panels.map((m) => ` · ${["left", "right"][m.k]} ${m.method} ${m.value.toPrecision(4)}` + (m.signed !== null ? ` (signed ${m.signed.toPrecision(4)})` : "")).join("");
}
function gotoMaximum() {  // the left map's maximum: its slice (and, in three planes, the crosshair)
  const own = viewer.panelMaps[0] || (layoutThree() && viewer.tri[2] && viewer.tri[2].panelMaps && viewer.tri[2].panelMaps[0]);
  if (!own) { status("no map yet", true); return; }
  if (!(own.entry.max > 0)) { status("the left map is 0 everywhere: no maximum to go to", true); return; }
  const at = own.entry.argmax;
  if (layoutThree()) { viewer.cursor = [...at]; loadThree(); }
  else {
    if (three()) setSlice(at[axisNow()]);
    const [row, col] = toPixel(at, axisNow());
    viewer.pointer = {row, col, axis: axisNow()}; render();  // the cross marks it
  }
  status(`the left map's maximum, ${own.entry.max.toPrecision(3)}, at ${three() ? "voxel" : "pixel"} (${at.join(", ")})`);
}

// ---------------------------------------------------------------- requests
function target() {
  const mode = $("mode").value;
  if (mode === "predicted" || mode === "uploaded") return {kind: mode};
  if (mode === "pixel" && viewer.pixel) return {kind: "pixel", index: viewer.pixel};
  if (mode === "box" && viewer.box) return {kind: "box", start: viewer.box[0], stop: viewer.box[1]};
  if (mode === "brush" || mode === "erase") {
    const slices = [];
    for (const [key, data] of viewer.brushes) if (data.some((v) => v)) {
      const [axis, index] = key.split(":").map(Number);
      slices.push(three() ? {axis, index, data: encode(data)} : {data: encode(data)});
    }
    if (!slices.length) return null;
    return three() ? {kind: "mask", slices} : {kind: "mask", data: slices[0].data};
  }
  return null;
}
function busy(on, what) { viewer.busy = on; $("busy").className = on ? "on" : ""; $("busyWhat").textContent = what || ""; }
async function confirmCost(layer, methods) {  // gradient-free methods on a volume: ask first
  if (!three()) return true;
  const free = methods.filter((m) => viewer.info.gradient_free.includes(m));
  const key = `${layer}|${free.join(",")}`;
  if (!free.length || viewer.confirmed.has(key)) return true;
  const cost = await api("/api/estimate", {layer, methods: free});
  if (cost.confirm) {
    const text = cost.methods.filter((m) => m.masked_inputs).map((m) => `${m.method}: ${m.masked_inputs} forward passes`).join(", ");
    if (!window.confirm(`${text} of the model, about ${Math.round(cost.seconds)} s at this layer (${cost.channels} channels). Run it?`)) return false;
  }
  viewer.confirmed.add(key);
  return true;
}
async function explain(withSlice) {  // withSlice: the new slice's image comes with its maps (one frame)
  const t = target();
  if (!t) { viewer.result = null; clearMaps(); viewer.awaiting = true; render(); status("choose the pixel set on the image"); return; }
  viewer.awaiting = false;
  const methods = [$("method0").value, $("method1").value], layer = $("layer").value;
  const panels = methods.map((method, k) => {
    const panel = {method, signed: $("show" + k).value !== "relu"};
    if (k === 1 && $("layer1").value) panel.layer = $("layer1").value;
    if (k === 1 && $("class1").value !== "") panel.class = Number($("class1").value);
    return panel;
  });
  try { if (!(await confirmCost(layer, methods))) { status("not run: choose a gradient method or a deeper layer"); return; } }
  catch (error) { status(error.message, true); return; }
  if (viewer.controller) viewer.controller.abort();  // a newer request supersedes (the server cancels it too)
  const controller = viewer.controller = new AbortController(), seq = ++viewer.seq;
  let request = {class: Number($("class").value), target: t, layer, methods, panels, client: viewer.client};
  if (layoutThree()) {
    const main = Number(viewer.info.default_axis);
    request = {...request, axis: main, index: viewer.cursor[main], planes: [0, 1, 2].filter((a) => a !== main).map((a) => ({axis: a, index: viewer.cursor[a]}))};
  } else request = {...request, ...view(), ...(withSlice ? {with_slice: true} : {})};
  busy(true, methods.join(" and "));
  const started = performance.now();
  try {
    const result = await api("/api/explain", request, controller.signal);
    if (seq !== viewer.seq) return;
    if (result.slice) { viewer.slice = sliceOf(result.slice); viewer.sliceIndex = request.index; }
    viewer.request = request; viewer.result = result;
    viewer.shownWork = work(request);
    setMaps(viewer, result.maps);
    result.setSlice = decode(result.pixel_set, Uint8Array);
    if (layoutThree()) {
      const main = Number(viewer.info.default_axis);
      for (const cut of [{axis: main, ...result}, ...result.planes]) {
        const t3 = viewer.tri[cut.axis] || (viewer.tri[cut.axis] = {});
        setMaps(t3, cut.maps); t3.set = decode(cut.pixel_set, Uint8Array);
        if (cut.slice) t3.slice = sliceOf(cut.slice);
      }
    }
    render();
    const total = performance.now() - started;
    viewer.timings.push(total);
    status(`${result.pixels} pixels in the set · update ${total.toFixed(0)} ms (server ${result.milliseconds} ms)`);
  } catch (error) {
    if (seq !== viewer.seq) return;
    if (withSlice && !(error.name === "AbortError" || error.superseded)) viewer.sliceKey = null;  // the slice is fetched again
    if (error.name === "AbortError" || error.superseded) status("cancelled");
    else status(error.message, true);
  } finally { if (seq === viewer.seq) { busy(false); viewer.controller = null; } }
}
async function cancel() {
  if (viewer.controller) viewer.controller.abort();
  viewer.seq++; busy(false); viewer.controller = null;
  try { await api("/api/cancel", {client: viewer.client}); status("cancelled"); } catch (error) { status(error.message, true); }
}
function sliceOf(s) {
  return {shape: s.shape, intensity: decode(s.intensity, Float32Array), prediction: decode(s.prediction, Uint8Array),
    truth: s.ground_truth ? decode(s.ground_truth, Uint8Array) : null};
}
async function fetchSlice(axis, index) { return sliceOf(await api("/api/slice", three() ? {axis, index} : {})); }
function work(request) {  // what a request computes (its slice aside): the same work has the same maps
  return JSON.stringify([request.class, request.target, request.layer, request.panels]);
}
function setMaps(holder, entries) {  // the answer's map entries, one per panel, decoded
  holder.panelMaps = entries.map((m) => ({entry: m, data: decode(m.data, Float32Array),
    signed: m.signed ? decode(m.signed, Float32Array) : null, set: m.pixel_set ? decode(m.pixel_set, Uint8Array) : null}));
  holder.maps = {};
  holder.panelMaps.forEach((m) => { if (!(m.entry.method in holder.maps)) holder.maps[m.entry.method] = m.data; });
}
function clearMaps() { viewer.maps = {}; viewer.panelMaps = [null, null]; }
function showingMaps() {  // the maps on screen are those the current controls ask for
  const t = target();
  return Boolean(t && viewer.result && viewer.request && viewer.shownWork === work({...viewer.request, class: Number($("class").value), target: t, layer: $("layer").value}) &&
    viewer.request.methods[0] === $("method0").value && viewer.request.methods[1] === $("method1").value);
}
async function loadSlice() {
  // one load per shown slice: a range input may fire twice for one move; a newer move wins
  const key = `${$("layout").value}:${axisNow()}:${$("slice").value}`;
  if (key === viewer.sliceKey) return;
  viewer.sliceKey = key;
  try {
    if (layoutThree()) { await loadThree(); return; }
    if (three()) $("sliceLabel").textContent = `${$("slice").value} / ${viewer.info.shape[axisNow()] - 1}${slicePosition(axisNow(), Number($("slice").value))}`;
    // maps on screen: the new slice and its maps come in one answer and are drawn in one frame
    // (no blank frame while scrolling); else the slice shows at once and its maps follow
    if (showingMaps()) { await explain(true); return; }
    const slice = await fetchSlice(axisNow(), Number($("slice").value));
    if (key !== viewer.sliceKey) return;
    viewer.slice = slice; viewer.sliceIndex = Number($("slice").value);
    if (viewer.request) { clearMaps(); viewer.result = null; }
    render();
    if (viewer.request || target()) await explain();
  } catch (error) { viewer.sliceKey = null; status(error.message, true); }
}
async function loadThree() {
  // maps on screen: the three new slices come with their maps in one answer (no blank frame)
  if (showingMaps() && viewer.request && viewer.request.planes) { await explain(true); return; }
  const cuts = await Promise.all([0, 1, 2].map((a) => fetchSlice(a, viewer.cursor[a])));
  cuts.forEach((slice, a) => { viewer.tri[a] = {slice}; });
  render();
  if (target()) await explain();
}
function setSlice(index) {
  const axis = axisNow(), size = viewer.info.shape[axis];
  $("slice").value = Math.min(Math.max(index, 0), size - 1); loadSlice();
}

// ---------------------------------------------------------------- the mouse and the keys
function position(event) {
  const canvas = event.target, rect = canvas.getBoundingClientRect(), axis = Number(canvas.dataset.axis);
  const data = canvas.id.startsWith("tri") ? viewer.tri[axis].slice : viewer.slice, [h, w] = data.shape, s = scales(axis, h, w);
  const col = Math.floor((event.clientX - rect.left - canvas.clientLeft - viewer.pan.x) / s.x), row = Math.floor((event.clientY - rect.top - canvas.clientTop - viewer.pan.y) / s.y);
  return [Math.min(Math.max(row, 0), h - 1), Math.min(Math.max(col, 0), w - 1)];
}
function stamp(row, col) {
  const [h, w] = viewer.slice.shape, r = Number($("radius").value), value = $("mode").value === "brush" ? 1 : 0;
  const key = three() ? `${axisNow()}:${Number($("slice").value)}` : "2d";
  if (!viewer.brushes.has(key)) viewer.brushes.set(key, new Uint8Array(h * w));
  const brush = viewer.brushes.get(key);
  for (let i = Math.max(0, Math.floor(row - r)); i <= Math.min(h - 1, Math.ceil(row + r)); i++)
    for (let j = Math.max(0, Math.floor(col - r)); j <= Math.min(w - 1, Math.ceil(col + r)); j++)
      if ((i - row) ** 2 + (j - col) ** 2 <= r * r + 0.25) brush[i * w + j] = value;
}
function stroke(row, col) {  // a smooth stroke: stamps every half pixel from the last point
  const last = viewer.last || [row, col], steps = Math.max(1, Math.ceil(2 * Math.hypot(row - last[0], col - last[1])));
  for (let k = 1; k <= steps; k++) stamp(Math.round(last[0] + (row - last[0]) * k / steps), Math.round(last[1] + (col - last[1]) * k / steps));
  viewer.last = [row, col];
}
function attach(canvas) {
  canvas.addEventListener("contextmenu", (event) => event.preventDefault());
  canvas.addEventListener("mousedown", (event) => {
    event.preventDefault();
    if (event.button === 2) { viewer.windowing = {x: event.clientX, y: event.clientY, ...viewer.window}; return; }
    if (event.button === 1 || event.shiftKey) { viewer.panning = {x: event.clientX - viewer.pan.x, y: event.clientY - viewer.pan.y}; return; }
    const [row, col] = position(event), mode = $("mode").value, axis = Number(canvas.dataset.axis);
    if (canvas.id.startsWith("tri")) { viewer.cursor = toIndex(row, col, axis, viewer.cursor[axis]); loadThree(); return; }
    if (mode === "pixel") { viewer.pixel = toIndex(row, col); explain(); }
    else if (mode === "box") { viewer.drag = {r0: row, c0: col, r1: row, c1: col}; }
    else if (mode === "brush" || mode === "erase") { viewer.painting = true; viewer.last = null; stroke(row, col); render(); }
  });
  canvas.addEventListener("mousemove", (event) => {
    if (viewer.windowing || viewer.panning) return;
    const [row, col] = position(event), axis = Number(canvas.dataset.axis);
    if (!canvas.id.startsWith("tri")) {
      const moved = !viewer.pointer || viewer.pointer.row !== row || viewer.pointer.col !== col;
      viewer.pointer = {row, col, axis}; readAt(toIndex(row, col), axis);
      if (moved && !viewer.drag && !viewer.painting && !viewer.framePending) {  // the mirrored cursor, once a frame
        viewer.framePending = true;
        requestAnimationFrame(() => { viewer.framePending = false; render(); });
      }
    }
    else viewer.triPointer = axis;
    if (viewer.drag) { viewer.drag.r1 = row; viewer.drag.c1 = col; render(); }
    else if (viewer.painting) { stroke(row, col); render(); }
  });
  canvas.addEventListener("wheel", (event) => {
    event.preventDefault();
    if (event.ctrlKey) {  // about the pointer: the voxel under it stays under it
      const rect = canvas.getBoundingClientRect();
      zoomBy(event.deltaY < 0 ? 1.25 : 0.8, {x: event.clientX - rect.left - canvas.clientLeft, y: event.clientY - rect.top - canvas.clientTop});
      return;
    }
    const step = event.deltaY > 0 ? 1 : -1;
    if (canvas.id.startsWith("tri")) {
      const axis = Number(canvas.dataset.axis);
      viewer.cursor[axis] = Math.min(Math.max(viewer.cursor[axis] + step, 0), viewer.info.shape[axis] - 1); loadThree();
    } else if (three()) setSlice(Number($("slice").value) + step);
  }, {passive: false});
}
function zoomBy(factor, anchor) {
  const before = viewer.magnify;
  viewer.magnify = Math.min(Math.max(before * factor, 1), 16);
  if (anchor) {  // pan so that the point under the anchor stays there: p = pan + u * scale
    const ratio = viewer.magnify / before;
    viewer.pan = {x: anchor.x - (anchor.x - viewer.pan.x) * ratio, y: anchor.y - (anchor.y - viewer.pan.y) * ratio};
  }
  if (viewer.magnify === 1) viewer.pan = {x: 0, y: 0};  // fitted again: nothing to pan
  render();
}
window.addEventListener("mousemove", (event) => {
  if (viewer.windowing) {
    const w0 = viewer.windowing, range = Math.max(viewer.info.intensity.max - viewer.info.intensity.min, 1e-6) / 500;
    setWindow(w0.level - (event.clientY - w0.y) * range, Math.max(w0.width + (event.clientX - w0.x) * range, range));
  } else if (viewer.panning) { viewer.pan = {x: event.clientX - viewer.panning.x, y: event.clientY - viewer.panning.y}; render(); }
});
window.addEventListener("mouseup", () => {
  viewer.windowing = null; viewer.panning = null;
  if (viewer.drag) {
    const d = viewer.drag, a = toIndex(Math.min(d.r0, d.r1), Math.min(d.c0, d.c1)), b = toIndex(Math.max(d.r0, d.r1), Math.max(d.c0, d.c1));
    const start = a.map((v, k) => Math.min(v, b[k])), stop = a.map((v, k) => Math.max(v, b[k]) + 1);
    if (three()) {  // a slab: the box depth, centred on the shown slice
      const axis = axisNow(), depth = Math.max(1, Number($("depth").value) || 1), size = viewer.info.shape[axis];
      const first = Math.min(Math.max(Number($("slice").value) - Math.floor((depth - 1) / 2), 0), Math.max(size - depth, 0));
      start[axis] = first; stop[axis] = Math.min(first + depth, size);
    }
    viewer.box = [start, stop];
    viewer.drag = null; explain();
  }
  if (viewer.painting) { viewer.painting = false; viewer.last = null; explain(); }
});
window.addEventListener("keydown", (event) => {
  const active = document.activeElement, typing = active.tagName === "INPUT" && !["range", "checkbox", "file"].includes(active.type);
  const arrows = ["ArrowUp", "ArrowDown", "ArrowLeft", "ArrowRight", "PageUp", "PageDown", "Home", "End"].includes(event.key);
  if (typing || (arrows && ["INPUT", "SELECT"].includes(active.tagName))) return;  // the control's own keys
  if (active.tagName === "SELECT" && /^[a-z0-9]$/i.test(event.key)) active.blur();  // a select would jump to an option
  const steps = {ArrowUp: 1, ArrowDown: -1, PageUp: 5, PageDown: -5};
  if (event.key in steps && three() && !layoutThree()) { event.preventDefault(); setSlice(Number($("slice").value) + steps[event.key]); }
  else if (event.key in steps && layoutThree()) {  // the plane under the pointer (else the axial one)
    event.preventDefault();
    const axis = viewer.triPointer ?? Number(viewer.info.default_axis);
    viewer.cursor[axis] = Math.min(Math.max(viewer.cursor[axis] + steps[event.key], 0), viewer.info.shape[axis] - 1); loadThree();
  }
  else if (event.key === "+" || event.key === "=") zoomBy(1.25);
  else if (event.key === "-") zoomBy(0.8);
  else if (event.key === "0") { viewer.magnify = 1; viewer.pan = {x: 0, y: 0}; render(); }
  else if (/^[1-9]$/.test(event.key) && event.key <= viewer.info.intensity.presets.length) {  // window presets
    $("preset").value = Number(event.key) - 1; $("preset").dispatchEvent(new Event("change"));
  } else if (event.key in TOGGLES) {  // toggles the page offers (no truth: none for it)
    const box = $(TOGGLES[event.key]);
    if (box.closest("label").style.display !== "none") { box.checked = !box.checked; render(); }
  }
  else if (event.key === "m") gotoMaximum();
  else if (event.key === "s") saveView();
});
const TOGGLES = {h: "showMap", p: "showPrediction", t: "showTruth", c: "compare"};
function setWindow(level, width) {
  viewer.window = {level, width};
  $("level").value = Number(level.toPrecision(5)); $("width").value = Number(width.toPrecision(5));
  render();
}

// ---------------------------------------------------------------- start
function fillLayers() {
  const info = viewer.info, chosen = $("layer").value || info.default_layer;
  $("layer").replaceChildren();
  const entries = $("allLayers").checked ? [...info.layers, ...info.all_layers] : info.layers;
  entries.forEach((l) => $("layer").add(new Option(
    `${l.label ? l.label + " — " : ""}${l.name}  (${l.shape.slice(1).join("×")})${l.hidden ? " · norm/activation" : ""}`, l.name)));
  $("layer").value = entries.some((l) => l.name === chosen) ? chosen : info.default_layer;
  const right = $("layer1").value;
  $("layer1").replaceChildren(new Option("layer as chosen", ""));
  entries.forEach((l) => $("layer1").add(new Option(`${l.label ? l.label + " — " : ""}${l.name}`, l.name)));
  $("layer1").value = entries.some((l) => l.name === right) ? right : "";
}
async function start() {
  try {
    const info = viewer.info = await api("/api/info");
    $("title").textContent = info.title;
    document.title = `${info.title} · segcam viewer`;
    info.classes.forEach((name, c) => $("class").add(new Option(`${c}: ${name}`, c)));
    info.classes.forEach((name, c) => $("class1").add(new Option(`class ${c}: ${name}`, c)));
    $("class").value = Math.min(1, info.classes.length - 1);
    // names come from the model's folder or the command line: text nodes only, never markup
    const legendEntry = (text, fill, line) => {
      const entry = document.createElement("span"), swatch = document.createElement("i");
      if (fill) swatch.style.background = fill;
      if (line) { swatch.style.background = "transparent"; swatch.style.border = `2px solid ${line}`; }
      entry.append(swatch, document.createTextNode(text));
      return entry;
    };
    $("legend").replaceChildren(
      ...info.classes.flatMap((name, c) => {
        const colour = PALETTE[c % PALETTE.length];
        return colour ? [legendEntry(name, `rgb(${colour})`)] : [];
      }),
      // what the lines are: the pixel set, the truth's borders (its class's colour), the crosshair
      legendEntry("pixel set", null, "rgb(80, 220, 255)"),
      ...(info.ground_truth ? [legendEntry("truth (class colour, light)", null, `rgb(${truthColour(1)})`)] : []),
      ...(info.ground_truth ? [["true positive", "tp"], ["false positive", "fp"], ["false negative", "fn"]]
        .map(([text, kind]) => legendEntry(`${text} (compare)`, `rgb(${COMPARE[kind]})`)) : []),
      ...(three() ? [legendEntry("crosshair (three planes)", null, "rgb(120, 255, 120)")] : []));
    fillLayers();
    for (const k of [0, 1]) {
      info.methods.forEach((m) => $("method" + k).add(new Option(m.name + (m.kind === "gradient" ? "" : " (gradient-free)"), m.name)));
      $("method" + k).value = info.default_methods[k];
    }
    info.intensity.presets.forEach((p, k) => $("preset").add(new Option(`${p.name} (L ${Math.round(p.level)}, W ${Math.round(p.width)})`, k)));
    const first = info.intensity.presets[info.intensity.default || 0];  // a CT: soft tissue
    $("preset").value = info.intensity.default || 0;
    viewer.window = {level: first.level, width: first.width};
    $("level").value = Number(first.level.toPrecision(5)); $("width").value = Number(first.width.toPrecision(5));
    $("truthToggle").style.display = info.ground_truth ? "" : "none";
    $("compareToggle").style.display = info.ground_truth ? "" : "none";
    if (three()) {
      document.body.classList.add("three");
      info.axes.forEach((name, a) => $("axis").add(new Option(info.oriented ? `${name} (axis ${a})` : name, a)));
      $("axis").value = info.default_axis;
      const axis = Number(info.default_axis);
      $("slice").max = info.shape[axis] - 1; $("slice").value = Math.floor(info.shape[axis] / 2);
      viewer.shownAxis = axis;
      viewer.cursor = info.shape.map((n) => Math.floor(n / 2));
      $("depth").max = Math.max(...info.shape);
      if (info.oblique) status("oblique volume: shown along its nearest axes, not resampled");
    }
    ["view-prediction", "view0", "view1", "tri0", "tri1", "tri2"].forEach((id) => attach($(id)));
    ["class", "layer", "method0", "method1", "layer1", "class1", "show0", "show1"].forEach((id) => $(id).addEventListener("change", () => explain()));
    $("threshold").addEventListener("input", () => { $("thresholdLabel").textContent = `${$("threshold").value} %`; render(); });
    $("triMap").addEventListener("change", render);
    $("gotoMax").addEventListener("click", gotoMaximum);
    [0, 1, 2].forEach((a) => $("triSlice" + a).addEventListener("input", () => { viewer.cursor[a] = Number($("triSlice" + a).value); loadThree(); }));
    window.addEventListener("resize", render);
    ["scale", "showPrediction", "showTruth", "showMap", "compare"].forEach((id) => $(id).addEventListener("change", render));
    $("allLayers").addEventListener("change", fillLayers);
    $("mode").addEventListener("change", () => {
      if (["predicted", "uploaded"].includes($("mode").value) || target()) { explain(); return; }
      // the new mode has no pixel set yet: the previous set's maps are not this mode's
      clearMaps(); viewer.result = null; viewer.awaiting = true;
      status("choose the pixel set: click, drag or paint on the image"); render();
    });
    $("clearBrush").addEventListener("click", () => { viewer.brushes.clear(); if (["brush", "erase"].includes($("mode").value)) explain(); });
    // the side panel's opacity sets both maps'; each panel has its own, and its colour map
    $("opacity").addEventListener("input", () => { [0, 1].forEach((k) => { $("opacity" + k).value = $("opacity").value; }); render(); });
    [0, 1].forEach((k) => { $("opacity" + k).addEventListener("input", render); $("cmap" + k).addEventListener("change", render); });
    $("slice").addEventListener("input", loadSlice);
    $("cancel").addEventListener("click", cancel);
    $("preset").addEventListener("change", () => { const p = info.intensity.presets[Number($("preset").value)]; setWindow(p.level, p.width); });
    ["level", "width"].forEach((id) => $(id).addEventListener("change", () => setWindow(Number($("level").value), Math.max(Number($("width").value), 1e-6))));
    $("resetView").addEventListener("click", () => { viewer.magnify = 1; viewer.pan = {x: 0, y: 0}; render(); });
    $("layout").addEventListener("change", () => {
      document.body.classList.toggle("layout-three", layoutThree());
      const a = axisNow();
      if (layoutThree()) viewer.cursor[a] = Number($("slice").value);
      else $("slice").value = viewer.cursor[a];  // back to one plane: the crosshair's slice
      loadSlice();
    });
    $("goto").addEventListener("click", () => {
      const r = viewer.result; if (!r || !r.extent) return;
      if (layoutThree()) { viewer.cursor = r.extent.map(([lo, hi]) => Math.floor((lo + hi) / 2)); loadThree(); return; }
      const [lo, hi] = r.extent[axisNow()]; setSlice(Math.floor((lo + hi) / 2));
    });
    $("axis").addEventListener("change", () => {
      // each view keeps its slice: leaving a view and coming back shows the slice it showed
      viewer.slices[viewer.shownAxis] = Number($("slice").value);
      const axis = axisNow(); $("slice").max = info.shape[axis] - 1;
      $("slice").value = viewer.slices[axis] ?? Math.floor(info.shape[axis] / 2);
      viewer.shownAxis = axis; loadSlice();
    });
    $("upload").addEventListener("change", async (event) => {
      const file = event.target.files[0]; if (!file) return;
      try {
        const r = await api(`/api/upload?client=${encodeURIComponent(viewer.client)}`, file);
        status(`uploaded mask: ${r.pixels} pixels`); $("mode").value = "uploaded"; explain();
      } catch (error) { status(error.message, true); }
    });
    $("saveView").addEventListener("click", saveView);
    document.querySelectorAll("[data-export]").forEach((button) => button.addEventListener("click", async () => {
      // the export names what this page shows: class, target, layer, method
      const k = Number(button.dataset.panel || 0), panel = viewer.request && viewer.request.panels[k];
      const format = ["npz", "pixel_set"].includes(button.dataset.export) ? button.dataset.export : (three() ? "nifti" : "png");
      if (!viewer.request) { status("nothing to export yet: explain a target first", true); return; }
      if ($("show" + k).value === "difference") { status("a difference is not exported: export each map, or save the view", true); return; }
      const shown = {...viewer.request, method: panel.method, signed: $("show" + k).value === "signed" && !["npz", "pixel_set"].includes(format)};
      if (panel.layer) shown.layer = panel.layer;
      if (panel.class !== undefined) shown.class = panel.class;
      try {
        for (const kind of format === "nifti" ? ["nifti", "json"] : [format]) {
          if (kind === "png" && shown.signed) { status("a signed map exports as arrays; 'save view' saves it as shown", true); return; }
          await download({...shown, format: kind});
        }
      } catch (error) { status(error.message, true); }
    }));
    await loadSlice();
  } catch (error) { status(error.message, true); }
}
start();
