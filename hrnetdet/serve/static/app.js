// The page at / of `hrnetdet serve`: each chosen image is POSTed to /predict, its detections drawn
// over it (boxes, COCO-RLE masks, labels) and listed; the score slider filters what the server sent
// without asking it again. Plain JS, no dependencies, so the page works offline from the wheel; URLs
// relative to the page, so that it also works behind a proxy that serves the API under a path.
"use strict";

const KEY_STORAGE = "hrnetdet.apiKey";
const PARALLEL_REQUESTS = 4; // a few at once let the server batch them
const MASK_ALPHA = 110; // of 255
// Label text and box lines follow the image's size on screen (not its pixel count): a photo shrunk to
// a phone's width and a small image enlarged on a desktop both get legible labels (see fit).
const LABEL_CSS_PX = [11, 16]; // text height in CSS pixels, from a narrow to a wide display
const LINE_CSS_PX = [1.5, 3];

function onScreen([least, most], cssWidth, perPixel) {
  return Math.min(most, Math.max(least, cssWidth * perPixel));
}

const $ = (id) => document.getElementById(id);
const results = []; // one entry per chosen file, in order
const waitingForKey = []; // results whose request was refused for want of a key
let queue = [];
let running = 0;

// --- the server -----------------------------------------------------------------------------

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { "X-API-Key": key } : {};
}

class Unauthorized extends Error {}

async function api(path, init = {}) {
  const response = await fetch(path, { ...init, headers: { ...authHeaders(), ...(init.headers || {}) } });
  if (response.status === 401) throw new Unauthorized(await errorText(response));
  if (!response.ok) throw new Error(await errorText(response));
  return response.json();
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && typeof body.error === "string") return `${response.status}: ${body.error}`;
  } catch (_) { /* not JSON: the status says enough */ }
  return `${response.status} ${response.statusText}`;
}

async function loadInfo() {
  try {
    const info = await api("info");
    const kind = info.masks ? "boxes and masks" : "boxes";
    $("model").textContent = `${info.model} · ${(info.categories || []).length} categories · ${kind} · `
      + `${info.backend} · hrnetdet ${info.version}`;
    $("show-masks").parentElement.hidden = !info.masks;
    $("key-form").hidden = true;
  } catch (e) {
    if (e instanceof Unauthorized) askForKey(sessionStorage.getItem(KEY_STORAGE) ? "That key was refused." : "");
    else $("model").textContent = `The server did not answer /info (${e.message}).`;
  }
}

function askForKey(message) {
  $("model").textContent = "Waiting for an API key.";
  $("key-form").hidden = false;
  $("key-error").hidden = !message;
  $("key-error").textContent = message;
  $("key-input").focus();
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORAGE, $("key-input").value);
  $("key-input").value = "";
  loadInfo().then(() => {
    if ($("key-form").hidden) enqueue(waitingForKey.splice(0));
  });
});

// --- COCO compressed RLE ----------------------------------------------------------------------

// The run lengths of a COCO compressed RLE text: each count in 5-bit groups (low first, 0x20 = more
// follows, 0x10 of the last group = negative) offset by 48; from the third on, a count is stored as
// its difference to the count two before. Arithmetic instead of bit operators: counts may pass 2^31.
function rleCounts(text) {
  const counts = [];
  let p = 0;
  while (p < text.length) {
    let x = 0;
    let k = 0;
    let more = true;
    while (more) {
      if (p >= text.length) throw new Error("truncated mask RLE");
      const c = text.charCodeAt(p) - 48;
      x += (c & 0x1f) * 2 ** (5 * k);
      more = (c & 0x20) !== 0;
      p += 1;
      k += 1;
      if (!more && (c & 0x10)) x -= 2 ** (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

// Paints the mask's pixels into RGBA `data` (width x height). Runs alternate background and mask,
// background first, over the pixels in column-major order (down each column, then the next one).
function paintMask(data, width, height, counts, rgb) {
  let index = 0;
  for (let i = 0; i < counts.length; i += 1) {
    const end = Math.min(index + counts[i], width * height);
    if (i % 2 === 1) {
      for (let j = index; j < end; j += 1) {
        const o = ((j % height) * width + Math.floor(j / height)) * 4;
        data[o] = rgb[0];
        data[o + 1] = rgb[1];
        data[o + 2] = rgb[2];
        data[o + 3] = MASK_ALPHA;
      }
    }
    index = end;
  }
}

// --- drawing ------------------------------------------------------------------------------------

function labelIdOf(detection) {
  return detection.label_id ?? detection.category_id;
}

// HSL(hue, 85%, 50%) as RGB, the hue turning by the golden angle per label: neighbouring ids get
// distant colours.
function rgbOf(labelId) {
  const h = ((labelId * 137.508) % 360) / 60;
  const c = 0.85;
  const x = c * (1 - Math.abs((h % 2) - 1));
  const [r, g, b] = [[c, x, 0], [x, c, 0], [0, c, x], [0, x, c], [x, 0, c], [c, 0, x]][Math.floor(h) % 6];
  const m = 0.5 - c / 2;
  return [r, g, b].map((v) => Math.round((v + m) * 255));
}

function cssColour(labelId) {
  return `rgb(${rgbOf(labelId).join(",")})`;
}

function textColourOn(labelId) {
  const [r, g, b] = rgbOf(labelId);
  return 0.2126 * r + 0.7152 * g + 0.0722 * b > 140 ? "#000" : "#fff";
}

function threshold() {
  return Number($("score").value);
}

function visible(result) {
  const min = threshold();
  return result.response.detections.filter((d) => d.score >= min);
}

const runs = new WeakMap(); // a detection's decoded mask runs, decoded once

// One layer with every shown mask at the image's size, rebuilt only when the set of shown masks
// changes: the API sorts detections by score, so the shown ones are the first `shown.length`.
function maskLayer(result, shown) {
  if (result.maskCount === shown.length) return result.maskCanvas;
  const { width, height } = result.response;
  const image = new ImageData(width, height);
  for (const d of [...shown].reverse()) { // the best score painted last, on top
    if (!d.mask || d.mask.size[0] !== height || d.mask.size[1] !== width) continue;
    if (!runs.has(d)) runs.set(d, rleCounts(d.mask.counts));
    paintMask(image.data, width, height, runs.get(d), rgbOf(labelIdOf(d)));
  }
  const layer = result.maskCanvas || document.createElement("canvas");
  layer.width = width;
  layer.height = height;
  layer.getContext("2d").putImageData(image, 0, 0);
  result.maskCanvas = layer;
  result.maskCount = shown.length;
  return layer;
}

// Sizes the canvas to its displayed size times the screen's pixel ratio (not the image's size), so
// that lines and labels are drawn sharp at their size on screen. Returns the canvas pixels per image
// pixel and the displayed width in CSS pixels.
function fit(result) {
  const { width, height } = result.response;
  const canvas = result.canvas;
  const room = canvas.parentElement.clientWidth || width;
  const cssWidth = Math.max(1, Math.min(room, (Math.max(240, window.innerHeight * 0.8) * width) / height));
  const ratio = window.devicePixelRatio || 1;
  const w = Math.max(1, Math.round(cssWidth * ratio));
  const h = Math.max(1, Math.round((w * height) / width));
  canvas.style.width = `${cssWidth}px`;
  if (canvas.width !== w || canvas.height !== h) {
    canvas.width = w;
    canvas.height = h;
  }
  return { f: w / width, cssWidth };
}

function draw(result) {
  const { f, cssWidth } = fit(result);
  const canvas = result.canvas;
  const ctx = canvas.getContext("2d");
  const ratio = window.devicePixelRatio || 1;
  const labelPx = onScreen(LABEL_CSS_PX, cssWidth, 1 / 36) * ratio; // 16 px from 576 px wide up
  const linePx = onScreen(LINE_CSS_PX, cssWidth, 1 / 250) * ratio;
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(result.bitmap, 0, 0, canvas.width, canvas.height);
  const shown = visible(result);
  if ($("show-masks").checked && shown.some((d) => d.mask)) {
    ctx.imageSmoothingEnabled = f < 1; // enlarged: each image pixel's mask stays a crisp square
    ctx.drawImage(maskLayer(result, shown), 0, 0, canvas.width, canvas.height);
  }
  ctx.lineWidth = linePx;
  ctx.font = `600 ${labelPx}px system-ui, sans-serif`;
  ctx.textBaseline = "top";
  for (const d of [...shown].reverse()) { // the best score drawn last, on top
    const { xmin, ymin, xmax, ymax } = d.box;
    const id = labelIdOf(d);
    ctx.strokeStyle = cssColour(id);
    ctx.strokeRect(xmin * f, ymin * f, (xmax - xmin) * f, (ymax - ymin) * f);
    if ($("show-labels").checked) drawLabel(ctx, `${d.label} ${d.score.toFixed(2)}`, xmin * f, ymin * f, labelPx, id);
  }
  fillTable(result, shown);
  result.article.dataset.state = "done";
}

function drawLabel(ctx, text, x, y, size, labelId) {
  const pad = size / 5;
  const h = size + 2 * pad;
  const w = ctx.measureText(text).width + 2 * pad;
  const top = y - h >= 0 ? y - h : y; // above the box, or inside it at the image's top edge
  const left = Math.min(Math.max(0, x), Math.max(0, ctx.canvas.width - w));
  ctx.fillStyle = cssColour(labelId);
  ctx.fillRect(left, top, w, h);
  ctx.fillStyle = textColourOn(labelId);
  ctx.fillText(text, left + pad, top + pad);
}

function fillTable(result, shown) {
  const body = result.article.querySelector("tbody");
  const rows = shown.map((d, i) => {
    const tr = document.createElement("tr");
    tr.dataset.label = d.label;
    tr.dataset.score = String(d.score);
    const b = d.box;
    const cells = [i + 1, d.label, d.score.toFixed(3), b.xmin.toFixed(1), b.ymin.toFixed(1), b.xmax.toFixed(1), b.ymax.toFixed(1)];
    for (const value of cells) {
      const td = document.createElement("td");
      td.textContent = value;
      tr.appendChild(td);
    }
    tr.firstChild.style.borderLeftColor = cssColour(labelIdOf(d));
    return tr;
  });
  body.replaceChildren(...rows);
  const total = result.response.detections.length;
  result.article.querySelector(".summary").textContent =
    `${shown.length} of ${total} detections shown (score ≥ ${threshold().toFixed(2)}) · ${result.response.width}×${result.response.height}`;
}

let redrawPending = false;
function redrawAll() {
  if (redrawPending) return;
  redrawPending = true;
  requestAnimationFrame(() => {
    redrawPending = false;
    for (const r of results) if (r.response && r.bitmap) draw(r);
  });
}

const resized = new ResizeObserver((entries) => {
  for (const entry of entries) {
    const r = results.find((x) => x.canvas.parentElement === entry.target);
    if (r && r.response && r.bitmap) draw(r);
  }
});

// --- files ---------------------------------------------------------------------------------------

function addFiles(files) {
  const added = [];
  for (const file of files) {
    const article = $("result-template").content.firstElementChild.cloneNode(true);
    article.querySelector(".name").textContent = file.name;
    article.querySelector(".summary").textContent = "detecting…";
    article.dataset.state = "pending";
    $("results").appendChild(article);
    const result = { file, name: file.name, article, canvas: article.querySelector("canvas") };
    resized.observe(result.canvas.parentElement);
    results.push(result);
    added.push(result);
  }
  enqueue(added);
}

function enqueue(items) {
  queue = queue.concat(items);
  pump();
}

function pump() {
  while (running < PARALLEL_REQUESTS && queue.length) {
    const result = queue.shift();
    running += 1;
    detect(result).finally(() => {
      running -= 1;
      pump();
      updateStatus();
    });
  }
  updateStatus();
}

async function detect(result) {
  result.article.dataset.state = "pending";
  const body = new FormData();
  body.append("image", result.file, result.file.name);
  const decoded = result.bitmap ? Promise.resolve(result.bitmap) : createImageBitmap(result.file);
  decoded.catch(() => {}); // a refusal is reported below, once the server has answered
  try {
    result.response = await api("predict", { method: "POST", body });
  } catch (e) {
    if (e instanceof Unauthorized) {
      waitingForKey.push(result);
      askForKey(sessionStorage.getItem(KEY_STORAGE) ? "That key was refused." : "");
      return fail(result, "Waiting for an API key.", "pending");
    }
    return fail(result, e.message);
  }
  try {
    result.bitmap = await decoded;
  } catch (_) {
    return fail(result, "The server read this image but the browser cannot display it.");
  }
  result.article.querySelector(".error").hidden = true;
  draw(result);
}

function fail(result, message, state = "error") {
  const p = result.article.querySelector(".error");
  p.textContent = message;
  p.hidden = false;
  result.article.querySelector(".summary").textContent = "";
  result.article.dataset.state = state;
}

function updateStatus() {
  const done = results.filter((r) => r.response).length;
  const pending = running + queue.length;
  $("status").textContent = results.length
    ? `${done} of ${results.length} images detected${pending ? ` · ${pending} in progress` : ""}`
    : "";
  $("download").disabled = done === 0;
}

function download() {
  const payload = results.filter((r) => r.response).map((r) => ({
    file: r.name,
    width: r.response.width,
    height: r.response.height,
    detections: r.response.detections,
  }));
  const url = URL.createObjectURL(new Blob([JSON.stringify(payload, null, 1)], { type: "application/json" }));
  const a = document.createElement("a");
  a.href = url;
  a.download = "detections.json";
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

// --- controls ----------------------------------------------------------------------------------

$("files").addEventListener("change", (event) => {
  addFiles(event.target.files);
  event.target.value = ""; // the same file chosen again is a new request
});
$("drop").addEventListener("keydown", (event) => {
  if (event.key === "Enter" || event.key === " ") {
    event.preventDefault();
    $("files").click();
  }
});
document.addEventListener("dragover", (event) => {
  event.preventDefault();
  $("drop").classList.add("over");
});
document.addEventListener("dragleave", (event) => {
  if (!event.relatedTarget) $("drop").classList.remove("over");
});
document.addEventListener("drop", (event) => {
  event.preventDefault();
  $("drop").classList.remove("over");
  if (event.dataTransfer && event.dataTransfer.files.length) addFiles(event.dataTransfer.files);
});
$("score").addEventListener("input", () => {
  $("score-value").textContent = threshold().toFixed(2);
  redrawAll();
});
$("show-masks").addEventListener("change", redrawAll);
$("show-labels").addEventListener("change", redrawAll);
$("download").addEventListener("click", download);
window.addEventListener("resize", redrawAll); // a new window height changes the room for tall images

$("score-value").textContent = threshold().toFixed(2);
loadInfo();
