// The model viewer: plain JavaScript, no build step, no third-party code. It calls the service's own endpoints
// (relative URLs, same origin) and shows what they return.
//
// Rules it keeps: the API key lives in memory and in this tab's sessionStorage and travels only as the
// X-API-Key header, never in a URL; every piece of text from a response or a file name reaches the page through
// textContent or a single attribute, never through HTML parsing; images are the service's own base64 PNGs shown
// at an integer scale with crisp pixels.

const KEY_STORAGE = "vae-ui-api-key";
const MAX_FILES = 64; // images taken from one choice or drop; each costs three requests
const PARALLEL = 4; // requests in flight per batch of uploads (the server batches them together anyway)
const LARGE = 112; // target display size of the longer image side, in CSS pixels
const SMALL = 64;
const STRIP_STRENGTHS = [-3, -2, -1, 0, 1, 2, 3];

const $ = (id) => document.getElementById(id);

const state = {
  key: null,
  model: null, // /v1/model
  noticed: null, // the sha256 of the last model change the page said
  files: [], // [{file, name, url, scoreRow}]
  items: [], // interpolation and edit ends: [{id, label, z}]
  directions: null, // [{name, kind, description, ...}] or null when editing is unavailable
  edits: {}, // AbortController of the edit in flight, per view ("live", "strip")
};

// Answers can arrive out of order (a second click before the first answer): only the latest request of each
// kind may change the page. ticket(kind) returns a function that says whether its request is still the latest.
const latestTickets = {};

function ticket(kind) {
  const mine = (latestTickets[kind] || 0) + 1;
  latestTickets[kind] = mine;
  return () => latestTickets[kind] === mine;
}

// ---------------------------------------------------------------------------------------------------------------
// HTTP

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }

  describe() {
    if (this.status === 401) {
      const what = state.key ? "The server refused this API key" : "This server needs an API key: enter it above";
      return `${what} (401 ${this.code}: ${this.message}).`;
    }
    if (this.status === 0) return this.message;
    return `${this.message} (${this.status} ${this.code}).`;
  }
}

// One request to the service: JSON or multipart in, JSON out; errors become ApiError with the service's own
// {"error": {"code", "message"}}.
async function api(path, { method = "GET", json, form, query, signal } = {}) {
  const headers = { Accept: "application/json" };
  if (state.key) headers["X-API-Key"] = state.key;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form; // the browser writes the multipart boundary
  }
  const url = query ? `${path}?${new URLSearchParams(query)}` : path;
  let response;
  try {
    response = await fetch(url, { method, headers, body, signal, cache: "no-store", credentials: "omit" });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "network_error", `Could not reach the server (${error.message}).`);
  }
  let data = null;
  if ((response.headers.get("content-type") || "").includes("application/json")) {
    try {
      data = await response.json();
    } catch {
      data = null;
    }
  }
  noticeModel(response.headers.get("x-model-sha256"));
  if (!response.ok) {
    const error = data && data.error;
    const retry = response.headers.get("retry-after");
    let message = error && error.message ? error.message : response.statusText || "request failed";
    if (retry) message += `; retry in ${retry} s`;
    throw new ApiError(response.status, error && error.code ? error.code : "http_error", message);
  }
  return data;
}

// ---------------------------------------------------------------------------------------------------------------
// DOM helpers (text only: no HTML is ever parsed from data)

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "text") node.textContent = value;
    else if (value !== null && value !== undefined) node.setAttribute(name, value);
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

function say(id, message, kind = "info") {
  const node = $(id);
  node.textContent = message;
  node.dataset.kind = kind;
}

function fail(id, error) {
  if (error && error.name === "AbortError") return;
  say(id, error instanceof ApiError ? error.describe() : `Error: ${error.message}`, "error");
  if (error instanceof ApiError && error.status === 401) $("api-key").focus();
}

function fmt(value, digits = 2) {
  return value === null || value === undefined || !Number.isFinite(value) ? "—" : value.toFixed(digits);
}

function fmtP(value) {
  if (value === null || value === undefined) return "—";
  return value >= 0.01 ? value.toFixed(3) : value.toPrecision(2);
}

// An integer scale, so every model pixel becomes the same square of screen pixels.
function scaleFor(target) {
  const image = state.model.image;
  return Math.max(1, Math.floor(target / Math.max(image.width, image.height)));
}

const BASE64 = /^[A-Za-z0-9+/]*={0,2}$/;

function pixelImage(base64, alt, target) {
  if (typeof base64 !== "string" || !BASE64.test(base64)) throw new Error("the server sent an image that is not base64");
  const { width, height } = state.model.image;
  const scale = scaleFor(target);
  return el("img", {
    class: "pixels", alt, src: `data:image/png;base64,${base64}`,
    width: width * scale, height: height * scale,
  });
}

function tile(image, caption) {
  return el("figure", { class: "tile" }, image, el("figcaption", { text: caption }));
}

async function busy(section, work) {
  const node = $(section);
  node.setAttribute("aria-busy", "true");
  try {
    return await work();
  } finally {
    node.removeAttribute("aria-busy");
  }
}

// ---------------------------------------------------------------------------------------------------------------
// API key

function useKey() {
  const value = $("api-key").value.trim();
  state.key = value || null;
  try {
    if (state.key) sessionStorage.setItem(KEY_STORAGE, state.key);
    else sessionStorage.removeItem(KEY_STORAGE);
  } catch {
    // storage disabled: the key stays in memory for this page only
  }
  say("key-status", state.key ? "Key set for this tab." : "No key: requests go without one.");
  loadModel();
}

function forgetKey() {
  state.key = null;
  $("api-key").value = "";
  try {
    sessionStorage.removeItem(KEY_STORAGE);
  } catch {
    // nothing stored
  }
  say("key-status", "Key forgotten.");
}

// ---------------------------------------------------------------------------------------------------------------
// Model card

async function loadModel() {
  const current = ticket("model");
  say("model-status", "Loading the model card…");
  let model;
  try {
    model = await busy("model", () => api("v1/model"));
  } catch (error) {
    if (!current()) return;
    state.model = null;
    $("model-card").replaceChildren();
    fail("model-status", error);
    return;
  }
  if (!current()) return;
  state.model = model;
  say("model-status", "");
  renderModel(state.model);
  fillScoreKinds(state.model.metadata.scoring);
  updateItemControls();
  loadDirections();
}

// Every answer computed by a model names it (X-Model-Sha256). One other than the card's means the server was
// reloaded: say so, and load the card of the model that serves now.
function noticeModel(sha256) {
  if (!sha256 || !state.model || sha256 === state.model.sha256 || sha256 === state.noticed) return;
  state.noticed = sha256;
  const notice = $("model-notice");
  notice.textContent = `The server now serves another model (sha256 ${sha256.slice(0, 12)}…, before ` +
    `${state.model.sha256.slice(0, 12)}…): the card below shows it; results from before were the other model's.`;
  notice.hidden = false;
  loadModel();
}

function renderModel(model) {
  const meta = model.metadata || {};
  const data = meta.data || {};
  const evaluation = meta.evaluation || {};
  const scoring = meta.scoring || {};
  const calibration = meta.calibration || {};
  const pixels = meta.pixels || {};
  const training = meta.training || {};
  const image = model.image;
  const splits = ["train", "val", "calib", "test"]
    .filter((split) => data[`n_${split}`] !== undefined)
    .map((split) => `${data[`n_${split}`]} ${split}`)
    .join(" / ");
  const levels = pixels.levels ? `, ${pixels.levels} pixel levels` : "";
  const rows = [
    ["Data", `${data.name || "unknown"}${splits ? ` (${splits})` : ""}${data.binarize ? ", binarised" : ""}`],
    ["Image", `${image.channels} × ${image.height} × ${image.width} (channels × height × width)${levels}`],
    ["Latent size", `${model.latent_dim}${evaluation.active_units !== undefined ? ` (${evaluation.active_units} active units)` : ""}`],
    ["Likelihood", meta.model ? meta.model.likelihood : "—"],
    ["Test ELBO", evaluation.test_elbo_nats === undefined ? "—"
      : `${fmt(evaluation.test_elbo_nats)} ± ${fmt(evaluation.test_elbo_se)} nats (${fmt(evaluation.elbo_bits_per_dim, 3)} bits/dim)`],
    ["Test IW-NLL", evaluation.iw_nll_nats === undefined ? "—"
      : `${fmt(evaluation.iw_nll_nats)} ± ${fmt(evaluation.iw_nll_se)} nats (${fmt(evaluation.iw_nll_bits_per_dim, 3)} bits/dim, K = ${evaluation.iw_k})`],
    ["Anomaly score", `${scoring.default || "nll"}, K = ${model.score_k}`],
    ["Calibration", calibration.n ? `${calibration.n} held-out scores (${calibration.split || "calib"} split): `
      + `the smallest p-value is 1/${calibration.n + 1}` : "none: scores get no p-values"],
    ["Training", training.epochs_run !== undefined ? `${training.epochs_run} epochs on ${training.device || "?"}` : "—"],
    ["Artifact", `sha256 ${model.sha256.slice(0, 12)}…, created ${meta.created || "?"}, torch ${meta.torch_version || "?"}, served on ${model.device}`],
  ];
  $("model-card").replaceChildren(...rows.flatMap(([name, value]) => [el("dt", { text: name }), el("dd", { text: value })]));
}

function fillScoreKinds(scoring) {
  const select = $("score-kind");
  const kinds = scoring && scoring.kinds ? Object.keys(scoring.kinds) : ["nll"];
  const current = select.value || (scoring && scoring.default) || kinds[0];
  select.replaceChildren(...kinds.map((kind) => el("option", { value: kind, text: kind })));
  select.value = kinds.includes(current) ? current : kinds[0];
}

// ---------------------------------------------------------------------------------------------------------------
// Your images: reconstruction and anomaly score, one image per request (the server batches them together)

async function runLimited(tasks, limit) {
  let next = 0;
  const worker = async () => {
    while (next < tasks.length) await tasks[next++]();
  };
  await Promise.all(Array.from({ length: Math.min(limit, tasks.length) }, worker));
}

function formWith(file) {
  const form = new FormData();
  form.append("file", file, file.name);
  return form;
}

function addFiles(fileList) {
  if (!state.model) {
    say("images-status", "Load the model first (an API key may be needed).", "error");
    return;
  }
  const files = Array.from(fileList).slice(0, MAX_FILES);
  const skipped = fileList.length - files.length;
  for (const entry of state.files) URL.revokeObjectURL(entry.url);
  state.items = state.items.filter((item) => item.kind !== "image");
  state.files = files.map((file, index) => ({ file, name: file.name || `image ${index + 1}`, index, url: URL.createObjectURL(file) }));
  $("image-results").replaceChildren(...state.files.map(imageRow));
  $("rescore").disabled = state.files.length === 0;
  updateItemControls();
  const note = skipped > 0 ? ` (the first ${MAX_FILES}; ${skipped} left out)` : "";
  say("images-status", `Reconstructing and scoring ${files.length} image(s)${note}…`);
  const current = ticket("images");
  busy("images", async () => {
    let failed = 0;
    await runLimited(state.files.map((entry) => async () => {
      const [reconstructed, scored] = await Promise.allSettled([reconstruct(entry), score(entry)]);
      if (reconstructed.status === "rejected" || scored.status === "rejected") failed += 1;
    }), PARALLEL);
    if (!current()) return; // newer images were chosen meanwhile: their own batch reports
    say("images-status", failed ? `${failed} of ${files.length} image(s) failed: see each image.`
      : `${files.length} image(s) reconstructed and scored.`, failed ? "error" : "info");
  });
}

function imageRow(entry) {
  const original = el("img", { class: "pixels original", alt: `Your image ${entry.name}`, src: entry.url });
  const size = state.model.image;
  const scale = scaleFor(LARGE);
  original.width = size.width * scale;
  original.height = size.height * scale;
  entry.node = el("li", { class: "result" },
    tile(original, entry.name),
    el("figure", { class: "tile slot-reconstruction" }, el("div", { class: "placeholder", text: "…" }),
      el("figcaption", { text: "reconstruction" })),
    el("div", { class: "slot-score" }, el("p", { class: "hint", text: "Scoring…" })));
  return entry.node;
}

async function reconstruct(entry) {
  const slot = entry.node.querySelector(".slot-reconstruction");
  try {
    const encoded = await api("encode", { method: "POST", form: formWith(entry.file) });
    const decoded = await api("decode", { method: "POST", json: { z: encoded.mu } });
    if (!state.files.includes(entry)) return; // replaced by newer images meanwhile
    slot.replaceWith(tile(pixelImage(decoded.images[0], `Reconstruction of ${entry.name}`, LARGE), "reconstruction"));
    state.items.push({ id: `image-${entry.index}`, kind: "image", order: entry.index, label: `Your image ${entry.index + 1}: ${entry.name}`, z: encoded.mu[0] });
    updateItemControls(); // an end for interpolations and edits as soon as its latent is known
  } catch (error) {
    slot.replaceWith(errorNote(error));
    throw error;
  }
}

async function score(entry) {
  const alpha = Number($("alpha").value);
  if (!(alpha > 0 && alpha < 1)) {
    const error = new Error("the level α must be between 0 and 1");
    entry.node.querySelector(".slot-score").replaceWith(errorNote(error, "slot-score"));
    throw error;
  }
  const kind = $("score-kind").value;
  const slot = () => entry.node.querySelector(".slot-score");
  entry.scoring = (entry.scoring || 0) + 1; // a newer score of this image (another α or kind) wins
  const mine = entry.scoring;
  try {
    const result = await api("anomaly-score", { method: "POST", form: formWith(entry.file), query: { alpha, score: kind } });
    if (entry.scoring === mine) slot().replaceWith(scoreView(result, result.scores[0], alpha));
  } catch (error) {
    if (entry.scoring === mine) slot().replaceWith(errorNote(error, "slot-score"));
    throw error;
  }
}

function errorNote(error, extraClass = "") {
  const text = error instanceof ApiError ? error.describe() : `Error: ${error.message}`;
  return el("p", { class: `error ${extraClass}`.trim(), role: "alert", text });
}

function scoreView(result, row, alpha) {
  let verdict;
  let kind;
  if (row.is_anomaly === null || row.is_anomaly === undefined) {
    verdict = "no verdict: the score is not calibrated";
    kind = "unknown";
  } else if (row.is_anomaly) {
    verdict = `anomaly at α = ${alpha}`;
    kind = "anomaly";
  } else {
    verdict = `normal at α = ${alpha}`;
    kind = "normal";
  }
  const kinds = (state.model.metadata.scoring || {}).kinds || {};
  const units = (kinds[result.score] && kinds[result.score].units) || "nats";
  const facts = [
    [`Score (${result.score})`, `${fmt(row.score_nats)} ${units}`],
    ["p-value", fmtP(row.p_value)],
    ["Percentile", row.percentile === null ? "—" : `${fmt(row.percentile, 1)} %`],
    ["NLL", `${fmt(row.nll_nats)} nats (${fmt(row.nll_bits_per_dim, 3)} bits/dim)`],
    ["ELBO", `${fmt(row.elbo_nats)} nats = ${fmt(row.reconstruction_nats)} reconstruction − ${fmt(row.kl_nats)} KL`],
  ];
  if (row.neighbour_distance !== null && row.neighbour_distance !== undefined) {
    facts.push(["Latent distance", `${fmt(row.neighbour_distance, 3)} to the nearest training image`]);
  }
  if (row.latent_density_nats !== null && row.latent_density_nats !== undefined) {
    facts.push(["Latent density", `${fmt(row.latent_density_nats)} nats (−log, where the training classes lie)`]);
  }
  return el("div", { class: "slot-score" },
    el("p", { class: "verdict", "data-verdict": kind, text: verdict }),
    el("dl", { class: "facts" }, ...facts.flatMap(([name, value]) => [el("dt", { text: name }), el("dd", { text: value })])));
}

function rescore() {
  if (!state.files.length) return;
  say("images-status", "Scoring again…");
  const current = ticket("images");
  busy("images", async () => {
    let failed = 0;
    await runLimited(state.files.map((entry) => async () => {
      try {
        await score(entry);
      } catch {
        failed += 1;
      }
    }), PARALLEL);
    if (!current()) return;
    say("images-status", failed ? `${failed} of ${state.files.length} score(s) failed: see each image.`
      : `${state.files.length} image(s) scored.`, failed ? "error" : "info");
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Samples

function readSeed() {
  const text = $("sample-seed").value.trim();
  // JavaScript numbers are exact only up to 2^53: a larger seed would silently become another one.
  if (!/^[0-9]+$/.test(text) || Number(text) > Number.MAX_SAFE_INTEGER) {
    throw new Error(`the seed must be a whole number from 0 to ${Number.MAX_SAFE_INTEGER}`);
  }
  return Number(text);
}

function newSeed() {
  const words = crypto.getRandomValues(new Uint32Array(2));
  $("sample-seed").value = String((words[0] & 0x1fffff) * 2 ** 32 + words[1]); // 53 random bits
}

async function drawSamples() {
  if (!state.model) return say("samples-status", "Load the model first (an API key may be needed).", "error");
  let request;
  try {
    const n = Number($("sample-n").value);
    if (!Number.isInteger(n) || n < 1 || n > 64) throw new Error("the number of images must be a whole number from 1 to 64");
    request = { n, seed: readSeed(), temperature: Number($("sample-temperature").value) };
  } catch (error) {
    return fail("samples-status", error);
  }
  const current = ticket("samples");
  say("samples-status", "Drawing…");
  try {
    const result = await busy("samples", () => api("sample", { method: "POST", json: request }));
    if (!current()) return;
    const label = `seed ${request.seed}, temperature ${request.temperature.toFixed(2)}`;
    $("sample-grid").replaceChildren(...result.images.map((image, i) =>
      el("li", {}, tile(pixelImage(image, `Sample ${i + 1} of ${result.images.length}, ${label}`, SMALL), `#${i + 1}`))));
    state.items = state.items.filter((item) => item.kind !== "sample").concat(result.z.map((z, i) => (
      { id: `sample-${i}`, kind: "sample", order: i, label: `Sample ${i + 1} (${label})`, z })));
    updateItemControls();
    say("samples-status", `${result.images.length} samples, ${label}.`);
  } catch (error) {
    if (current()) fail("samples-status", error);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Ends for interpolations and edits: your images (their posterior means) and the samples

function sortedItems() {
  const rank = { image: 0, sample: 1 };
  return [...state.items].sort((a, b) => rank[a.kind] - rank[b.kind] || a.order - b.order);
}

function fillItems(select, items, fallback) {
  const current = select.value;
  select.replaceChildren(...items.map((item) => el("option", { value: item.id, text: item.label })));
  const ids = items.map((item) => item.id);
  select.value = ids.includes(current) ? current : (ids[fallback] ?? ids[0] ?? "");
}

function updateItemControls() {
  const items = sortedItems();
  fillItems($("interp-from"), items, 0);
  fillItems($("interp-to"), items, items.length - 1);
  fillItems($("edit-source"), items, 0);
  $("interp-run").disabled = items.length < 2;
  if (items.length < 2) say("interp-status", "Add images or draw samples to pick two ends.", "prompt");
  else if ($("interp-status").dataset.kind === "prompt") say("interp-status", "");
  updateEditControls();
}

function itemById(id) {
  return state.items.find((item) => item.id === id);
}

async function interpolate() {
  const from = itemById($("interp-from").value);
  const to = itemById($("interp-to").value);
  const steps = Number($("interp-steps").value);
  const method = document.querySelector("input[name=interp-method]:checked").value;
  if (!from || !to) return say("interp-status", "Pick two ends: add images or draw samples first.", "error");
  if (!Number.isInteger(steps) || steps < 2 || steps > 32) {
    return say("interp-status", "Frames must be a whole number from 2 to 32.", "error");
  }
  const current = ticket("interpolation");
  say("interp-status", "Interpolating…");
  try {
    const result = await busy("interpolation", () =>
      api("interpolate", { method: "POST", query: { steps, method }, json: { z: [from.z, to.z] } }));
    if (!current()) return;
    $("interp-strip").replaceChildren(...result.images.map((image, i) => el("li", {},
      tile(pixelImage(image, `Frame ${i + 1} of ${result.images.length} (${method})`, SMALL), String(i + 1)))));
    say("interp-status", `${result.images.length} frames, ${method}, from ${from.label} to ${to.label}.`);
  } catch (error) {
    if (current()) fail("interp-status", error);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Edits (GET /directions, POST /edit): unavailable on a server without them

async function loadDirections() {
  try {
    const result = await api("directions");
    state.directions = Array.isArray(result && result.directions) ? result.directions : [];
  } catch (error) {
    state.directions = null;
    if (error instanceof ApiError && (error.status === 404 || error.status === 405)) {
      say("edit-status", "Editing is unavailable: this server has no edit directions (GET /directions is not there).");
    } else {
      fail("edit-status", error);
    }
    updateEditControls();
    return;
  }
  const select = $("edit-direction");
  select.replaceChildren(...state.directions.map((d) => el("option", { value: d.name, text: `${d.name} (${d.kind})` })));
  say("edit-status", state.directions.length ? "" : "This model has no edit directions yet.");
  showDirection();
  updateEditControls();
}

function currentDirection() {
  return state.directions && state.directions.find((d) => d.name === $("edit-direction").value);
}

function showDirection() {
  const direction = currentDirection();
  if (!direction) return $("edit-description").replaceChildren();
  const facts = [direction.description || ""];
  if (direction.n_pos !== undefined) facts.push(`${direction.n_pos} positive / ${direction.n_neg} negative examples`);
  if (Number.isFinite(direction.norm)) facts.push(`|v| = ${fmt(direction.norm)}`);
  if (Number.isFinite(direction.auroc)) facts.push(`AUROC ${fmt(direction.auroc, 3)}`);
  $("edit-description").textContent = facts.filter(Boolean).join("; ");
}

function updateEditControls() {
  const usable = Boolean(state.directions && state.directions.length);
  const hasSource = usable && state.items.length > 0;
  $("edit-direction").disabled = !usable;
  $("edit-source").disabled = !hasSource;
  $("edit-strength").disabled = !hasSource;
  $("edit-strip").disabled = !hasSource;
  if (usable && !hasSource) say("edit-status", "Add an image or draw samples to edit one.", "prompt");
  else if (hasSource && $("edit-status").dataset.kind === "prompt") say("edit-status", "");
}

// One edit request per view: a newer one aborts the one in flight (only the slider's latest position matters).
async function edit(view, strengths) {
  const source = itemById($("edit-source").value);
  const direction = currentDirection();
  if (!source || !direction) return null;
  if (state.edits[view]) state.edits[view].abort();
  const controller = new AbortController();
  state.edits[view] = controller;
  try {
    const result = await api("edit", { method: "POST", signal: controller.signal,
      json: { z: [source.z], direction: direction.name, strengths } });
    return { result, source, direction };
  } finally {
    if (state.edits[view] === controller) delete state.edits[view];
  }
}

let editTimer = null;

function onStrength() {
  const strength = Number($("edit-strength").value);
  $("edit-strength-value").textContent = strength.toFixed(1);
  clearTimeout(editTimer);
  editTimer = setTimeout(() => showEdit(strength), 60); // a drag sends one request per pause, not per pixel
}

async function showEdit(strength) {
  try {
    const done = await edit("live", [strength]);
    if (!done) return;
    const image = pixelImage(done.result.edits[0].images[0],
      `${done.source.label} edited along ${done.direction.name} at strength ${strength.toFixed(1)}`, LARGE);
    image.id = "edit-image";
    $("edit-image").replaceWith(image);
    $("edit-caption").textContent = `${done.direction.name}, strength ${strength.toFixed(1)}`;
    $("edit-live").hidden = false;
    say("edit-status", "");
  } catch (error) {
    fail("edit-status", error);
  }
}

async function showEditStrip() {
  try {
    const done = await busy("editing", () => edit("strip", STRIP_STRENGTHS));
    if (!done) return;
    const strengths = done.result.strengths || STRIP_STRENGTHS;
    $("edit-strip-frames").replaceChildren(...done.result.edits[0].images.map((image, i) => el("li", {},
      tile(pixelImage(image, `${done.direction.name} at strength ${strengths[i]}`, SMALL), `${strengths[i]}`))));
    say("edit-status", "");
  } catch (error) {
    fail("edit-status", error);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Wiring

function onEnter(ids, action) {
  for (const id of ids) {
    $(id).addEventListener("keydown", (event) => {
      if (event.key === "Enter") {
        event.preventDefault();
        action();
      }
    });
  }
}

function setUpDrop() {
  const zone = $("drop");
  const over = (event) => {
    event.preventDefault();
    zone.classList.add("over");
  };
  zone.addEventListener("dragenter", over);
  zone.addEventListener("dragover", over);
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    const files = Array.from(event.dataTransfer.files).filter((file) => !file.type || file.type.startsWith("image/"));
    if (files.length) addFiles(files);
    else say("images-status", "Nothing to do: drop image files.", "error");
  });
}

function start() {
  try {
    state.key = sessionStorage.getItem(KEY_STORAGE);
  } catch {
    state.key = null;
  }
  if (state.key) {
    $("api-key").value = state.key;
    say("key-status", "Key set for this tab.");
  }
  $("key-use").addEventListener("click", useKey);
  $("key-forget").addEventListener("click", forgetKey);
  onEnter(["api-key"], useKey);

  $("files").addEventListener("change", (event) => {
    if (event.target.files.length) addFiles(event.target.files);
  });
  setUpDrop();
  $("rescore").addEventListener("click", rescore);
  $("score-kind").addEventListener("change", rescore);
  onEnter(["alpha"], rescore);

  $("sample-draw").addEventListener("click", drawSamples);
  $("sample-new-seed").addEventListener("click", () => {
    newSeed();
    drawSamples();
  });
  $("sample-temperature").addEventListener("input", () => {
    $("sample-temperature-value").textContent = Number($("sample-temperature").value).toFixed(2);
  });
  onEnter(["sample-n", "sample-seed", "sample-temperature"], drawSamples);

  $("interp-run").addEventListener("click", interpolate);
  onEnter(["interp-steps"], interpolate);

  $("edit-direction").addEventListener("change", () => {
    showDirection();
    onStrength();
  });
  $("edit-source").addEventListener("change", onStrength);
  $("edit-strength").addEventListener("input", onStrength);
  $("edit-strip").addEventListener("click", showEditStrip);

  loadModel();
}

start();
