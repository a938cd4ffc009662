// cachekit's web page: generate images over the OpenAI-style API (with server-sent progress), chart the runner's
// figures, and run an image stream over the WebSocket; for a video model, show a video stream as its frames finish.
// Plain JS, no build step, no network beyond this server.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "cachekit.apiKey";
// The cache tiers are "none" plus the shipped schedules GET /v1/models lists for the served model, each with the
// step count it runs (a joint-search point such as digits-fastest runs 8 steps): choosing one sets the steps field.
// Any policy spec the server takes (e.g. fora:interval=3) works through the API.
let scheduleSteps = {};

// ------------------------------------------------------------------------------------------------ API basics
function apiKey() {
  return $("api-key").value.trim();
}

function authHeaders(extra = {}) {
  const headers = {...extra};
  const key = apiKey();
  if (key) headers.Authorization = "Bearer " + key;
  return headers;
}

class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

// The server's {"error": {"message": ...}} as one readable line.
async function errorLine(response) {
  let message = response.statusText || "request failed";
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON: keep the status text */ }
  const retry = response.headers.get("Retry-After");
  return `${response.status}: ${message}` + (retry ? ` (retry in ${retry} s)` : "");
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, {...options, headers: authHeaders(options.headers)});
  } catch (err) {
    throw new ApiError(`cannot reach the server (${err.message})`, 0);
  }
  if (!response.ok) throw new ApiError(await errorLine(response), response.status);
  return response;
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

// ------------------------------------------------------------------------------------------------ server info
async function loadServerInfo() {
  try {
    const models = await (await api("v1/models")).json();
    $("model").textContent = models.data.map((m) => m.id).join(", ");
    fillTiers(models.data.flatMap((m) => m.schedules || []));
    showModelKind(models.data.some((m) => m.kind === "video") ? "video" : "image");
    showError("");
  } catch (err) {
    $("model").textContent = "?";
    showError(err.status === 401 ? `${err.message}. Enter the server's API key above.` : err.message);
    return;
  }
  try {  // the real bounds, from the server's own schema
    const spec = await (await api("openapi.json")).json();
    const props = spec.components.schemas.ImageGenerationRequest.properties;
    if (props.n && props.n.maximum) $("n").max = props.n.maximum;
    if (props.num_inference_steps && props.num_inference_steps.maximum) {
      $("steps").max = props.num_inference_steps.maximum;
    }
  } catch (_) { /* the form's defaults stand */ }
}

// schedules: [{id, num_inference_steps, speedup}] from /v1/models; "none" (the uncached model) comes first.
function fillTiers(schedules) {
  const select = $("cache");
  const chosen = localStorage.getItem("cachekit.cache") || select.value;
  schedules = [...schedules].sort((a, b) => (a.speedup || 0) - (b.speedup || 0));  // most faithful first
  scheduleSteps = Object.fromEntries(schedules.map((s) => [s.id, s.num_inference_steps]));
  const option = (value, text) => {
    const element = document.createElement("option");
    element.value = value;
    element.textContent = text;
    return element;
  };
  select.replaceChildren(option("none", "none (uncached)"), ...schedules.map((s) => option(s.id,
    `${s.id} (${s.num_inference_steps} steps${s.speedup ? ` · ${s.speedup.toFixed(1)}x` : ""})`)));
  const names = ["none", ...Object.keys(scheduleSteps)];
  select.value = names.includes(chosen) ? chosen : names.includes("digits-fast") ? "digits-fast" : names[0];
  followSchedule();
}

// A schedule runs the step count it was searched at: show it, and keep the field fixed while it is chosen.
function followSchedule() {
  const steps = scheduleSteps[$("cache").value];
  $("steps").disabled = steps !== undefined;
  if (steps !== undefined) $("steps").value = steps;
}

async function pollHealth() {
  const pill = $("health");
  try {
    const response = await fetch("healthz");
    const body = await response.json();
    pill.textContent = body.status === "ok" ? `ok · ${body.queued} queued · ${body.active} active` : body.status;
    pill.className = "pill " + (response.ok ? "ok" : "bad");
  } catch (_) {
    pill.textContent = "unreachable";
    pill.className = "pill bad";
  }
}

// ------------------------------------------------------------------------------------------------ generation
// Server-sent events from a fetch body: yields {event, data} with data parsed as JSON.
async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer = (buffer + value).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let text = colon < 0 ? "" : line.slice(colon + 1);
        if (text.startsWith(" ")) text = text.slice(1);
        if (field === "event") event = text;
        else if (field === "data") data.push(text);
      }
      if (data.length) yield {event, data: JSON.parse(data.join("\n"))};
    }
  }
}

let running = null;  // {requestId, controller, cancelling}

function makeCard(index, seed, prompt) {
  const card = document.createElement("figure");
  card.className = "card pending";
  card.dataset.index = index;
  card.dataset.seed = seed;
  const img = document.createElement("img");
  img.className = "pixelated";
  img.alt = `${prompt} (seed ${seed})`;
  const bar = document.createElement("progress");
  bar.max = 1;
  bar.value = 0;
  const caption = document.createElement("figcaption");
  caption.innerHTML = '<span class="state">queued</span><span class="latency"></span><span class="reuse"></span>';
  card.append(img, bar, caption);
  return card;
}

function percent(share) {
  return `${Math.round(share * 100)}%`;
}

async function generate(event) {
  event.preventDefault();
  if (running) return;
  showError("");
  const prompt = $("prompt").value;
  const n = parseInt($("n").value, 10);
  const steps = parseInt($("steps").value, 10);
  const seed = parseInt($("seed").value, 10) || 0;
  const cache = $("cache").value;
  localStorage.setItem("cachekit.cache", cache);
  const requestId = "web-" + Math.random().toString(36).slice(2, 12);
  const body = {prompt, n, seed, num_inference_steps: steps, cache, response_format: "b64_json",
                stream: true, preview: $("preview").checked, request_id: requestId};
  const controller = new AbortController();
  running = {requestId, controller};
  $("generate").disabled = true;
  $("cancel").disabled = false;
  const progress = $("progress");
  const progressText = $("progress-text");
  progress.value = 0;
  progressText.textContent = "sending…";

  const batch = document.createElement("div");
  batch.className = "batch";
  batch.dataset.requestId = requestId;
  const title = document.createElement("div");
  title.className = "batch-title muted";
  title.textContent = `“${prompt}” · ${cache} · ${steps} steps`;
  const cards = [];
  let done = [];
  let failed = 0;
  try {
    const response = await api("v1/images/generations", {
      method: "POST", headers: {"Content-Type": "application/json", Accept: "text/event-stream"},
      body: JSON.stringify(body), signal: controller.signal});
    for (let i = 0; i < n; i++) cards.push(makeCard(i, seed + i, prompt));
    done = cards.map(() => 0);
    batch.append(title, ...cards);
    $("images").prepend(batch);
    const stepsDone = cards.map(() => 0);
    const update = () => {
      const total = stepsDone.reduce((a, b) => a + b, 0);
      progress.value = total / (n * steps);
      progressText.textContent = `${total} / ${n * steps} steps · ${done.filter(Boolean).length} / ${n} images`;
    };
    for await (const {event: kind, data} of sseEvents(response)) {
      const card = cards[data.index];
      if (kind === "queued") {
        if (data.position !== null && data.position !== undefined) progressText.textContent = `queued, ${data.position} ahead`;
      } else if (kind === "started") {
        card.querySelector(".state").textContent = "running";
      } else if (kind === "step") {
        stepsDone[data.index] = data.step;
        card.querySelector("progress").value = data.step / data.num_steps;
        card.querySelector(".state").textContent = `step ${data.step}/${data.num_steps}`;
        if (data.preview_b64) card.querySelector("img").src = "data:image/png;base64," + data.preview_b64;
        update();
      } else if (kind === "image") {
        const info = data.cachekit;
        card.querySelector("img").src = "data:image/png;base64," + data.b64_json;
        card.classList.replace("pending", "done");
        card.querySelector("progress").value = 1;
        card.querySelector(".state").textContent = info.degraded ? `${info.plan} (degraded)` : info.plan;
        card.querySelector(".latency").textContent = `${(info.latency_s * 1000).toFixed(0)} ms`;
        card.querySelector(".reuse").textContent = `reuse ${percent(info.reused_share)}`;
        card.title = `seed ${info.seed} · queue ${(info.queue_wait_s * 1000).toFixed(0)} ms · ` +
                     `first step ${(info.time_to_first_step_s * 1000).toFixed(0)} ms · plan ${info.plan}` +
                     (info.requested_plan !== info.plan ? ` (asked ${info.requested_plan})` : "");
        card.dataset.latencyS = info.latency_s;
        card.dataset.reusedShare = info.reused_share;
        done[data.index] = 1;
        stepsDone[data.index] = steps;
        update();
      } else if (kind === "error") {
        failed += 1;
        card.classList.replace("pending", "failed");
        if (running.cancelling) {
          card.querySelector(".state").textContent = "cancelled";
        } else {
          card.querySelector(".state").textContent = "failed";
          card.querySelector(".latency").textContent = data.message;
          showError(`image ${data.index + 1}: ${data.message}` + (data.retryable ? " (retryable)" : ""));
        }
      }
    }
    progressText.textContent = `${done.filter(Boolean).length} / ${n} images` +
      (failed ? `, ${failed} ${running.cancelling ? "cancelled" : "failed"}` : "");
  } catch (err) {
    if (err.name === "AbortError") {
      progressText.textContent = "stopped";
    } else {
      showError(err.message);
      progressText.textContent = "";
    }
    for (const card of cards) {
      if (card.classList.contains("pending")) {
        card.classList.replace("pending", "failed");
        card.querySelector(".state").textContent = err.name === "AbortError" ? "stopped" : "failed";
      }
    }
  } finally {
    running = null;
    $("generate").disabled = false;
    $("cancel").disabled = true;
  }
}

async function cancel() {
  if (!running || running.cancelling) return;
  running.cancelling = true;
  $("cancel").disabled = true;
  const {requestId, controller} = running;
  try {
    await api(`v1/requests/${encodeURIComponent(requestId)}/cancel`, {method: "POST"});
    // cancelled: the event stream reports each image as cancelled, then ends
  } catch (err) {
    if (err.status !== 404) showError(err.message);  // 404: not in flight (finished, or not started yet)
    controller.abort();  // leaving the event stream cancels whatever is left
  }
}

// ------------------------------------------------------------------------------------------------ the chart
const WINDOW_S = 120;
const COLORS = {images: "#2563eb", frames: "#16a34a", p50: "#d97706", p99: "#dc2626"};
const RATE_WINDOW_S = 5;  // throughput is averaged over the last few seconds of polls
const samples = [];  // {t, images, frames, p50, p99}: rates per second, latencies in seconds
const counts = [];  // {t, images, frames}: the runner's running totals at each poll

async function pollStats() {
  const now = performance.now() / 1000;
  try {
    const stats = await (await api("v1/stats")).json();
    const images = (stats.requests && stats.requests.done) || 0;
    const frames = Math.round((stats.frames_per_s || 0) * (stats.uptime_s || 0));
    counts.push({t: now, images, frames});
    while (counts.length > 2 && counts[1].t <= now - RATE_WINDOW_S) counts.shift();
    const first = counts[0];
    const span = now - first.t;
    const imageRate = span > 0 ? Math.max(0, images - first.images) / span : 0;
    const frameRate = span > 0 ? Math.max(0, frames - first.frames) / span : 0;
    const latency = stats.latency_s || {};
    samples.push({t: now, images: imageRate, frames: frameRate, p50: latency.p50, p99: latency.p99});
    while (samples.length && samples[0].t < now - WINDOW_S) samples.shift();
    const ms = (s) => (s === null || s === undefined ? "–" : `${(s * 1000).toFixed(0)} ms`);
    $("stats-now").textContent =
      `${imageRate.toFixed(2)} images/s · ${frameRate.toFixed(1)} frames/s · p50 ${ms(latency.p50)} · ` +
      `p99 ${ms(latency.p99)} · ${stats.queued} queued · ${stats.active} active · ` +
      `${stats.requests.done || 0} done` +
      (stats.batch_occupancy != null ? ` · batch ${percent(stats.batch_occupancy)} full` : "") +
      ` · cached ${bytes(stats.cached_bytes || 0)}`;
  } catch (err) {
    $("stats-now").textContent = `stats: ${err.message}`;
  }
  drawChart();
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

// A "nice" axis top: 1, 2 or 5 times a power of ten, at least `value`.
function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = Math.pow(10, Math.floor(Math.log10(value)));
  for (const m of [1, 2, 5, 10]) if (m * power >= value) return m * power;
  return 10 * power;
}

function drawPanel(ctx, box, series, unit, now) {
  const {x, y, w, h} = box;
  const values = series.flatMap((s) => samples.map((p) => p[s.key]).filter((v) => v !== null && v !== undefined));
  const top = niceMax(Math.max(0, ...values.map((v) => v * unitScale(unit))));
  ctx.strokeStyle = "#d4d4d8";
  ctx.fillStyle = "#71717a";
  ctx.lineWidth = 1;
  ctx.font = "11px system-ui, sans-serif";
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (let i = 0; i <= 4; i++) {
    const gy = Math.round(y + h - (h * i) / 4) + 0.5;
    ctx.beginPath();
    ctx.moveTo(x, gy);
    ctx.lineTo(x + w, gy);
    ctx.stroke();
    const label = (top * i) / 4;
    ctx.fillText(`${+label.toPrecision(3)}${i === 4 ? " " + unit : ""}`, x - 6, gy);
  }
  ctx.lineWidth = 2;
  for (const s of series) {
    ctx.strokeStyle = s.color;
    ctx.beginPath();
    let pen = false;
    for (const p of samples) {
      const v = p[s.key];
      if (v === null || v === undefined) { pen = false; continue; }
      const px = x + w - ((now - p.t) / WINDOW_S) * w;
      const py = y + h - Math.min(1, (v * unitScale(unit)) / top) * h;
      if (pen) ctx.lineTo(px, py); else ctx.moveTo(px, py);
      pen = true;
    }
    ctx.stroke();
  }
}

function unitScale(unit) {
  return unit === "ms" ? 1000 : 1;
}

function drawChart() {
  const canvas = $("chart");
  const ratio = window.devicePixelRatio || 1;
  const cssWidth = canvas.clientWidth || 600;
  const cssHeight = canvas.clientHeight || 240;
  if (canvas.width !== Math.round(cssWidth * ratio)) canvas.width = Math.round(cssWidth * ratio);
  if (canvas.height !== Math.round(cssHeight * ratio)) canvas.height = Math.round(cssHeight * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, cssWidth, cssHeight);
  const now = performance.now() / 1000;
  const left = 64;
  const width = cssWidth - left - 8;
  const half = (cssHeight - 36) / 2;
  ctx.fillStyle = "#3f3f46";
  ctx.font = "12px system-ui, sans-serif";
  ctx.textAlign = "left";
  ctx.textBaseline = "top";
  ctx.fillText("throughput", left, 0);
  ctx.fillText("latency", left, half + 18);
  // images/s last, so a flat stream line (no streams open) never hides it
  drawPanel(ctx, {x: left, y: 16, w: width, h: half - 8}, [
    {key: "frames", color: COLORS.frames}, {key: "images", color: COLORS.images}], "/s", now);
  drawPanel(ctx, {x: left, y: half + 34, w: width, h: half - 8}, [
    {key: "p50", color: COLORS.p50}, {key: "p99", color: COLORS.p99}], "ms", now);
  ctx.fillStyle = "#71717a";
  ctx.font = "11px system-ui, sans-serif";
  ctx.textAlign = "left";
  ctx.textBaseline = "bottom";
  ctx.fillText(`−${WINDOW_S} s`, left, cssHeight);
  ctx.textAlign = "right";
  ctx.fillText("now", left + width, cssHeight);
  canvas.dataset.samples = samples.length;
}

// ------------------------------------------------------------------------------------------------ the stream
let stream = null;  // {socket, timer, sent, received, started, video, ready}
const KEEP_FRAMES = 32;

function streamStatus(text) {
  $("stream-status").textContent = text;
}

// Frame `i` of the drawn-digit sequence: each digit for a second or so, drifting a little, white on black like
// the digits model's images.
function drawDigitFrame(ctx, i, width, height) {
  const digit = Math.floor(i / 8) % 10;
  const phase = (i % 8) / 8;
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, width, height);
  ctx.translate(width / 2 + Math.sin(phase * 2 * Math.PI) * width * 0.06, height / 2);
  ctx.rotate(Math.sin(phase * 2 * Math.PI) * 0.15);
  ctx.fillStyle = "#fff";
  ctx.font = `bold ${Math.round(height * 0.95)}px sans-serif`;
  ctx.textAlign = "center";
  ctx.textBaseline = "middle";
  ctx.fillText(String(digit), 0, height * 0.05);
  ctx.setTransform(1, 0, 0, 1, 0, 0);
}

function drawWebcamFrame(ctx, video, width, height) {
  const side = Math.min(video.videoWidth, video.videoHeight);
  if (!side) return false;
  ctx.drawImage(video, (video.videoWidth - side) / 2, (video.videoHeight - side) / 2, side, side,
                0, 0, width, height);
  return true;
}

async function openWebcam() {
  if (!(navigator.mediaDevices && navigator.mediaDevices.getUserMedia)) {
    throw new Error("this browser gives the page no camera (it needs https or localhost)");
  }
  const media = await navigator.mediaDevices.getUserMedia({video: {width: 320, height: 240}, audio: false});
  const video = document.createElement("video");
  video.muted = true;
  video.playsInline = true;
  video.srcObject = media;
  await video.play();
  return video;
}

function streamUrl() {
  const url = new URL("v1/stream", location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  if (apiKey()) url.searchParams.set("api_key", apiKey());
  return url.toString();
}

async function startStream(event) {
  event.preventDefault();
  if (stream) return;
  showError("");
  let video = null;
  if ($("stream-source").value === "webcam") {
    try {
      video = await openWebcam();
    } catch (err) {
      showError(`webcam: ${err.message}`);
      return;
    }
  }
  const socket = new WebSocket(streamUrl());
  socket.binaryType = "arraybuffer";
  stream = {socket, timer: null, sent: 0, received: 0, started: 0, video, ready: false};
  $("stream-start").disabled = true;
  $("stream-stop").disabled = false;
  streamStatus("connecting…");
  const current = stream;
  socket.onopen = () => {
    socket.send(JSON.stringify({prompt: $("stream-prompt").value, guidance: $("stream-guidance").value,
                                similarity_filter: $("stream-filter").checked}));
  };
  socket.onmessage = (message) => {
    if (typeof message.data === "string") {
      let body;
      try { body = JSON.parse(message.data); } catch (_) { return; }
      if (body.type === "ready") onStreamReady(current, body);
      else if (body.type === "error") showError(`stream: ${body.message}` + (body.retryable ? " (retryable)" : ""));
      return;
    }
    onStreamFrame(current, message.data);
  };
  socket.onclose = (close) => {
    if (current.stopped) return;
    if (!current.ready && !close.wasClean) {
      showError("stream: could not open the WebSocket (is the server up, and the API key right?)");
    }
    finishStream(current, `closed${close.code && close.code !== 1000 && close.code !== 1005 ? ` (${close.code}${
      close.reason ? ": " + close.reason : ""})` : ""}`);
  };
}

function onStreamReady(current, ready) {
  current.ready = true;
  current.started = performance.now();
  const canvas = $("stream-in");
  canvas.width = ready.width;
  canvas.height = ready.height;
  const ctx = canvas.getContext("2d");
  const fps = Math.max(1, Math.min(parseFloat($("stream-fps").value) || 8, ready.max_frames_per_s || 30));
  streamStatus(`streaming ${ready.width}x${ready.height} at ${fps} frames/s`);
  const sendFrame = () => {
    const socket = current.socket;
    if (socket.readyState !== WebSocket.OPEN) return;
    if (socket.bufferedAmount > 256 * 1024) return;  // the network is behind: skip this frame
    if (current.video) {
      if (!drawWebcamFrame(ctx, current.video, canvas.width, canvas.height)) return;
    } else {
      drawDigitFrame(ctx, current.sent, canvas.width, canvas.height);
    }
    canvas.toBlob(async (blob) => {
      if (!blob || socket.readyState !== WebSocket.OPEN) return;
      socket.send(await blob.arrayBuffer());
      current.sent += 1;
      updateStreamCount(current);
    }, "image/png");
  };
  sendFrame();
  current.timer = setInterval(sendFrame, 1000 / fps);
}

function onStreamFrame(current, data) {
  current.received += 1;
  const out = $("stream-out");
  const img = document.createElement("img");
  img.className = "pixelated";
  img.alt = `frame ${current.received}`;
  img.src = URL.createObjectURL(new Blob([data], {type: "image/png"}));
  img.onload = () => {
    img.dataset.loaded = "1";
  };
  out.prepend(img);
  while (out.children.length > KEEP_FRAMES) {
    const old = out.lastElementChild;
    URL.revokeObjectURL(old.src);
    old.remove();
  }
  out.dataset.received = current.received;
  updateStreamCount(current);
}

function updateStreamCount(current) {
  const seconds = (performance.now() - current.started) / 1000;
  const rate = seconds > 0 ? current.received / seconds : 0;
  streamStatus(`sent ${current.sent} · received ${current.received} · ${rate.toFixed(1)} frames/s back`);
}

function finishStream(current, why) {
  if (current.timer) clearInterval(current.timer);
  current.timer = null;
  if (current.video) current.video.srcObject.getTracks().forEach((track) => track.stop());
  if (stream === current) stream = null;
  $("stream-start").disabled = false;
  $("stream-stop").disabled = true;
  streamStatus(current.ready ? `sent ${current.sent} · received ${current.received} · ${why}` : why);
}

function stopStream() {
  if (!stream) return;
  const current = stream;
  current.stopped = true;
  if (current.timer) clearInterval(current.timer);
  current.timer = null;
  if (current.socket.readyState === WebSocket.OPEN) {
    current.socket.send(JSON.stringify({type: "close"}));
    current.socket.close(1000);
  } else {
    current.socket.close();
  }
  finishStream(current, "stopped");
}

// ------------------------------------------------------------------------------------------------ video stream
// A video model streams frames over WS /v1/video-stream as they finish: a JSON header {"type": "frame", index}
// then the PNG. The page shows the newest frame large, the recent ones in a strip, the time to the first frame and
// the frame rate since it.
let video = null;  // {socket, opened, first, received, lastIndex, inOrder, stopped, ready}

function showModelKind(kind) {
  const isVideo = kind === "video";
  $("video-section").hidden = !isVideo;
  for (const id of ["generate-section", "stream-section"]) $(id).hidden = isVideo;
}

function videoStatus(text) {
  $("video-status").textContent = text;
}

function videoUrl() {
  const url = new URL("v1/video-stream", location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  if (apiKey()) url.searchParams.set("api_key", apiKey());
  return url.toString();
}

function videoFigures(current) {
  const parts = [`frames ${current.received}`];
  if (current.first !== null) {
    parts.push(`first frame after ${((current.first - current.opened) / 1000).toFixed(2)} s`);
    const seconds = (performance.now() - current.first) / 1000;
    if (current.received > 1 && seconds > 0) parts.push(`${((current.received - 1) / seconds).toFixed(1)} frames/s`);
  }
  if (!current.inOrder) parts.push("OUT OF ORDER");
  return parts.join(" · ");
}

function startVideo(event) {
  event.preventDefault();
  if (video) return;
  showError("");
  const socket = new WebSocket(videoUrl());
  socket.binaryType = "arraybuffer";
  const current = {socket, opened: performance.now(), first: null, received: 0, lastIndex: -1, inOrder: true,
                   pending: null, stopped: false, ready: false};
  video = current;
  $("video-start").disabled = true;
  $("video-stop").disabled = false;
  $("video-strip").replaceChildren();
  videoStatus("connecting…");
  socket.onopen = () => {
    socket.send(JSON.stringify({prompt: $("video-prompt").value, cache: $("video-cache").value,
                                steps: parseInt($("video-steps").value, 10) || 8,
                                window: parseInt($("video-window").value, 10) || 3,
                                seed: parseInt($("video-seed").value, 10) || 0}));
  };
  socket.onmessage = (message) => {
    if (typeof message.data !== "string") {
      onVideoFrame(current, message.data);
      return;
    }
    let body;
    try { body = JSON.parse(message.data); } catch (_) { return; }
    if (body.type === "ready") {
      current.ready = true;
      videoStatus(`streaming ${body.width}x${body.height} · ${body.steps} steps, window ${body.window} · ` +
                  `cache ${body.plan} · waiting for the first frame`);
    } else if (body.type === "frame") {
      current.pending = body.index;
    } else if (body.type === "done") {
      finishVideo(current, "done");
    } else if (body.type === "error") {
      showError(`video: ${body.message}` + (body.retryable ? " (retryable)" : ""));
    }
  };
  socket.onclose = (close) => {
    if (current.stopped) return;
    if (!current.ready && !close.wasClean) {
      showError("video: could not open the WebSocket (is the server up, and the API key right?)");
    }
    finishVideo(current, "closed");
  };
}

function onVideoFrame(current, data) {
  const index = current.pending === null ? current.lastIndex + 1 : current.pending;
  current.pending = null;
  if (index !== current.lastIndex + 1) current.inOrder = false;
  current.lastIndex = index;
  current.received += 1;
  if (current.first === null) current.first = performance.now();
  const url = URL.createObjectURL(new Blob([data], {type: "image/png"}));
  const now = $("video-now");
  const previous = now.dataset.url;
  now.src = url;
  now.dataset.url = url;
  now.dataset.index = index;
  $("video-caption").textContent = `frame ${index}`;
  const img = document.createElement("img");
  img.className = "pixelated";
  img.alt = `frame ${index}`;
  img.src = URL.createObjectURL(new Blob([data], {type: "image/png"}));
  img.onload = () => { img.dataset.loaded = "1"; };
  const strip = $("video-strip");
  strip.prepend(img);
  while (strip.children.length > KEEP_FRAMES) {
    const old = strip.lastElementChild;
    URL.revokeObjectURL(old.src);
    old.remove();
  }
  if (previous) URL.revokeObjectURL(previous);
  strip.dataset.received = current.received;
  strip.dataset.inOrder = current.inOrder ? "1" : "0";
  if (current.first !== null) strip.dataset.firstFrameS = ((current.first - current.opened) / 1000).toFixed(3);
  videoStatus(videoFigures(current));
}

function finishVideo(current, why) {
  if (video === current) video = null;
  $("video-start").disabled = false;
  $("video-stop").disabled = true;
  videoStatus(`${videoFigures(current)} · ${why}`);
}

function stopVideo() {
  if (!video) return;
  const current = video;
  current.stopped = true;
  if (current.socket.readyState === WebSocket.OPEN) {
    current.socket.send(JSON.stringify({type: "close"}));
    current.socket.close(1000);
  } else {
    current.socket.close();
  }
  finishVideo(current, "stopped");
}

// ------------------------------------------------------------------------------------------------ start-up
function init() {
  const keyInput = $("api-key");
  keyInput.value = localStorage.getItem(KEY_STORAGE) || "";
  keyInput.addEventListener("change", () => {
    const key = keyInput.value.trim();
    if (key) localStorage.setItem(KEY_STORAGE, key); else localStorage.removeItem(KEY_STORAGE);
    loadServerInfo();
  });
  keyInput.addEventListener("input", () => {
    const key = keyInput.value.trim();
    if (key) localStorage.setItem(KEY_STORAGE, key); else localStorage.removeItem(KEY_STORAGE);
  });
  if (!(navigator.mediaDevices && navigator.mediaDevices.getUserMedia)) {
    const webcam = $("stream-source").querySelector('option[value="webcam"]');
    webcam.disabled = true;
    webcam.textContent = "webcam (not available here)";
  }
  fillTiers([]);
  $("cache").addEventListener("change", () => {
    localStorage.setItem("cachekit.cache", $("cache").value);
    followSchedule();
  });
  $("key-form").addEventListener("submit", (event) => event.preventDefault());
  $("generate-form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancel);
  $("stream-form").addEventListener("submit", startStream);
  $("stream-stop").addEventListener("click", stopStream);
  $("video-form").addEventListener("submit", startVideo);
  $("video-stop").addEventListener("click", stopVideo);
  window.addEventListener("resize", drawChart);
  loadServerInfo();
  pollHealth();
  setInterval(pollHealth, 5000);
  drawChart();
  const poll = async () => {
    if (!document.hidden) await pollStats();
    setTimeout(poll, 1000);
  };
  poll();
}

init();
