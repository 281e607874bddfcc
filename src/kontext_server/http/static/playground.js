// The kontext-server playground: a plain ES module, no build step, no third-party code.
//
// It speaks only the server's public API, relative to the page (so a server behind a path
// prefix works): submit `POST {endpoint}`, the status stream `{status_url}/stream?logs=1`
// (EventSource; a fetch-read stream when an API key must be sent, since EventSource cannot
// send headers; polling when a stream breaks), the result `GET {response_url}`, cancel
// `PUT {cancel_url}`, and uploads `POST rest/storage/upload/initiate` + `PUT upload_url`
// (inline data: URIs when uploads are not available). Recent requests live in localStorage.

const HISTORY_KEY = "kontext-playground:history";
const API_KEY_KEY = "kontext-playground:api-key";
const HISTORY_MAX = 25;
const POLL_INTERVAL_MS = 700;
const IMAGE_TYPES = ["image/png", "image/jpeg", "image/webp", "image/gif", "image/avif"];
const STATUS_LABELS = {
  LOADING: "Loading…",
  IN_QUEUE: "In queue",
  IN_PROGRESS: "Running",
  COMPLETED: "Completed",
};

const $ = (id) => document.getElementById(id);

const state = {
  config: null,
  endpoint: null, // the chosen entry of config.endpoints
  images: [], // {key, name, previewUrl, url, via, status, ready, error}
  run: null, // the request followed in the run panel
  nextImageKey: 1,
};

// ---------------------------------------------------------------- small helpers

function apiUrl(path) {
  return new URL(path, document.baseURI).toString();
}

function apiKey() {
  return $("api-key").value.trim();
}

function authHeaders(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, authorization: `Key ${key}` } : extra;
}

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "text") node.textContent = value;
    else if (name === "className") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of [].concat(children)) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

function formatBytes(bytes) {
  if (!Number.isFinite(bytes)) return "";
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} kB`;
  return `${(bytes / (1024 * 1024)).toFixed(1)} MB`;
}

function shortEndpoint(endpoint) {
  const entry = state.config?.endpoints.find((e) => e.id === endpoint);
  return entry ? entry.label : endpoint;
}

async function readJson(response) {
  const text = await response.text();
  try {
    return text ? JSON.parse(text) : null;
  } catch {
    return { detail: text || `HTTP ${response.status}` };
  }
}

function detailText(body, response) {
  if (body && typeof body.detail === "string") return body.detail;
  if (body && body.error && body.error.message) return body.error.message;
  return `The server answered ${response.status} ${response.statusText}`.trim();
}

// ---------------------------------------------------------------- endpoint and fields

function renderEndpoints() {
  const box = $("endpoint-options");
  box.replaceChildren();
  for (const entry of state.config.endpoints) {
    const id = `endpoint-${entry.id.replaceAll("/", "-")}`;
    const input = el("input", {
      type: "radio",
      name: "endpoint",
      id,
      value: entry.id,
      onchange: () => chooseEndpoint(entry.id),
    });
    box.append(el("label", { for: id, className: "segment" }, [input, el("span", { text: entry.label })]));
  }
}

function chooseEndpoint(endpointId) {
  const entry = state.config.endpoints.find((e) => e.id === endpointId) || state.config.endpoints[0];
  state.endpoint = entry;
  for (const radio of document.querySelectorAll('input[name="endpoint"]')) {
    radio.checked = radio.value === entry.id;
  }
  const multi = entry.image_field === "image_urls";
  $("endpoint-hint").textContent = `${entry.id} — ${multi ? "several reference images" : "one image"}`;
  $("images-label").textContent = multi ? "Images" : "Image";
  $("file-input").multiple = multi;
  const limit = multi ? `1 to ${state.config.max_image_urls} images` : "one image";
  $("images-hint").textContent =
    `${limit}; PNG, JPEG, WebP, GIF or AVIF, up to ${formatBytes(state.config.max_image_bytes)} each.`;
  if (!multi && state.images.length > 1) {
    replaceImages(state.images.slice(0, 1));
    $("images-hint").textContent += " Max edits one image: the first one was kept.";
  }
  renderImages();
  renderAspectRatio(entry);
}

function renderAspectRatio(entry) {
  const ratios = state.config.aspect_ratios;
  const text = $("aspect_ratio");
  const choice = $("aspect_ratio_choice");
  const [widest, tallest] = state.config.aspect_ratio_range;
  if (entry.aspect_ratio === "enum") {
    const current = text.value.trim();
    choice.replaceChildren(
      el("option", { value: "", text: "Follow the input" }),
      ...ratios.map((ratio) => el("option", { value: ratio, text: ratio })),
    );
    choice.value = ratios.includes(current) ? current : "";
    text.hidden = true;
    choice.hidden = false;
    $("aspect_ratio-label").setAttribute("for", "aspect_ratio_choice");
    $("aspect_ratio-hint").textContent = `One of ${ratios.join(", ")}; empty follows the input.`;
  } else {
    if (!choice.hidden && choice.value) text.value = choice.value;
    $("aspect-ratios").replaceChildren(...ratios.map((ratio) => el("option", { value: ratio })));
    text.hidden = false;
    choice.hidden = true;
    $("aspect_ratio-label").setAttribute("for", "aspect_ratio");
    $("aspect_ratio-hint").textContent =
      `Any W:H from ${widest} to ${tallest}, e.g. ${ratios.slice(1, 4).join(", ")}; empty follows the input.`;
  }
}

// ---------------------------------------------------------------- input images

function addFiles(fileList) {
  const files = [...fileList];
  if (files.length === 0) return;
  const multi = state.endpoint.image_field === "image_urls";
  const problems = [];
  const accepted = [];
  for (const file of files) {
    if (!IMAGE_TYPES.includes(file.type)) {
      problems.push(`${file.name}: not a PNG, JPEG, WebP, GIF or AVIF image`);
    } else if (file.size > state.config.max_image_bytes) {
      problems.push(`${file.name}: ${formatBytes(file.size)} is over the ${formatBytes(state.config.max_image_bytes)} limit`);
    } else {
      accepted.push(file);
    }
  }
  if (!multi && accepted.length > 0) {
    replaceImages([]);
    accepted.splice(1);
  }
  const room = state.config.max_image_urls - state.images.length;
  if (accepted.length > room) {
    problems.push(`at most ${state.config.max_image_urls} images: ${accepted.length - room} left out`);
    accepted.splice(room);
  }
  for (const file of accepted) state.images.push(startUpload(file));
  showFieldError("images", problems.join("; "));
  renderImages();
}

function startUpload(file) {
  const image = {
    key: state.nextImageKey++,
    name: file.name,
    previewUrl: URL.createObjectURL(file),
    url: null,
    via: null,
    status: "uploading",
  };
  image.ready = uploadFile(file)
    .then((url) => ({ url, via: "upload" }))
    .catch(async (error) => ({ url: await readAsDataUrl(file), via: "inline", reason: error.message }))
    .then(({ url, via, reason }) => {
      Object.assign(image, { url, via, status: "ready", reason });
      renderImages();
      return image;
    })
    .catch((error) => {
      Object.assign(image, { status: "error", reason: error.message });
      renderImages();
      return image;
    });
  return image;
}

/** fal storage's initiate + PUT pair; rejects when uploads are unavailable. */
async function uploadFile(file) {
  const initiate = await fetch(apiUrl("rest/storage/upload/initiate?storage_type=fal-cdn-v3"), {
    method: "POST",
    headers: authHeaders({ "content-type": "application/json" }),
    body: JSON.stringify({ content_type: file.type, file_name: file.name }),
  });
  const body = await readJson(initiate);
  if (!initiate.ok || !body?.upload_url || !body?.file_url) {
    throw new Error(`upload unavailable (${detailText(body, initiate)})`);
  }
  const put = await fetch(body.upload_url, {
    method: "PUT",
    headers: { "content-type": file.type },
    body: file,
  });
  if (!put.ok) throw new Error(`upload failed (${put.status})`);
  return body.file_url;
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

function useResultAsInput(image, name) {
  const input = {
    key: state.nextImageKey++,
    name,
    previewUrl: image.url,
    url: image.url,
    via: "result",
    status: "ready",
  };
  input.ready = Promise.resolve(input);
  replaceImages([input]);
  showFieldError("images", "");
  renderImages();
  $("edit-form").scrollIntoView({ behavior: "smooth", block: "start" });
  $("prompt").focus();
  $("prompt").select();
}

function removeImage(key) {
  replaceImages(state.images.filter((image) => image.key !== key));
  renderImages();
}

/** Sets the input images, releasing the previews of those no longer shown. */
function replaceImages(images) {
  for (const image of state.images) {
    if (!images.includes(image) && image.previewUrl.startsWith("blob:")) URL.revokeObjectURL(image.previewUrl);
  }
  state.images = images;
}

const IMAGE_STATES = {
  uploading: () => "uploading…",
  error: (image) => `cannot be used: ${image.reason}`,
  ready: (image) =>
    ({ upload: "uploaded", inline: "sent inline", result: "previous result", stored: "stored on the server" })[
      image.via
    ] || "ready",
};

function renderImages() {
  const list = $("image-list");
  list.replaceChildren(
    ...state.images.map((image) =>
      el("li", { className: `image-item ${image.status}`, dataset: { via: image.via || "", status: image.status } }, [
        el("img", { src: image.previewUrl, alt: "", loading: "lazy" }),
        el("div", { className: "image-text" }, [
          el("span", { className: "image-name", text: image.name }),
          el("span", {
            className: "image-state",
            text: IMAGE_STATES[image.status](image),
            title: image.reason || null,
          }),
        ]),
        el("button", {
          type: "button",
          className: "subtle remove",
          "aria-label": `Remove ${image.name}`,
          text: "Remove",
          onclick: () => removeImage(image.key),
        }),
      ]),
    ),
  );
  $("drop-zone").classList.toggle("has-images", state.images.length > 0);
}

// ---------------------------------------------------------------- validation errors

function clearErrors() {
  for (const box of document.querySelectorAll(".field-error")) {
    box.hidden = true;
    box.textContent = "";
  }
  for (const control of document.querySelectorAll("[aria-invalid]")) control.removeAttribute("aria-invalid");
  $("form-error").hidden = true;
  $("form-error").textContent = "";
}

function controlFor(field) {
  if (field === "images" || field === "image_url" || field === "image_urls") return $("file-input");
  if (field === "aspect_ratio") return $("aspect_ratio").hidden ? $("aspect_ratio_choice") : $("aspect_ratio");
  return $(field);
}

function showFieldError(field, message) {
  const box = document.querySelector(`[data-error-for~="${field}"]`);
  if (!box) return false;
  box.textContent = message;
  box.hidden = !message;
  const control = controlFor(field);
  if (control) {
    if (message) control.setAttribute("aria-invalid", "true");
    else control.removeAttribute("aria-invalid");
  }
  return true;
}

function showFormError(message) {
  $("form-error").textContent = message;
  $("form-error").hidden = !message;
}

/** A FastAPI 422 list: each message next to its field, the rest above the form. */
function showValidationErrors(detail) {
  const general = [];
  const messages = new Map();
  for (const error of detail) {
    const loc = Array.isArray(error.loc) ? error.loc : [];
    const field = loc[0] === "body" ? loc[1] : undefined;
    if (typeof field === "string" && document.querySelector(`[data-error-for~="${field}"]`)) {
      messages.set(field, [...(messages.get(field) || []), error.msg]);
    } else {
      general.push(error.msg);
    }
  }
  for (const [field, lines] of messages) showFieldError(field, lines.join(" "));
  if (general.length) showFormError(general.join(" "));
  const first = [...messages.keys()][0];
  if (first) controlFor(first)?.focus();
}

// ---------------------------------------------------------------- submit

function collectInput() {
  const input = { prompt: $("prompt").value };
  const urls = state.images.filter((image) => image.status === "ready").map((image) => image.url);
  if (state.endpoint.image_field === "image_urls") input.image_urls = urls;
  else if (urls.length) input.image_url = urls[0];
  const seed = $("seed").value.trim();
  if (seed) {
    // Seeds above 2**53 are sent as digits: the server reads them exactly, a JS number would not.
    input.seed = /^\d+$/.test(seed) && Number.isSafeInteger(Number(seed)) ? Number(seed) : seed;
  }
  const guidance = $("guidance_scale");
  if (guidance.value !== "") input.guidance_scale = Number(guidance.value);
  else if (guidance.validity.badInput) input.guidance_scale = "not a number";
  input.num_images = Number($("num_images").value);
  input.safety_tolerance = $("safety_tolerance").value;
  input.output_format = $("output_format").value;
  const ratio = state.endpoint.aspect_ratio === "enum" ? $("aspect_ratio_choice").value : $("aspect_ratio").value.trim();
  if (ratio) input.aspect_ratio = ratio;
  input.sync_mode = $("sync_mode").checked;
  input.enhance_prompt = $("enhance_prompt").checked;
  return input;
}

async function submitEdit(event) {
  event.preventDefault();
  clearErrors();
  const button = $("submit-button");
  button.disabled = true;
  try {
    if (state.images.some((image) => image.status === "uploading")) {
      $("submit-state").textContent = "Uploading images…";
      await Promise.all(state.images.map((image) => image.ready));
    }
    $("submit-state").textContent = "Submitting…";
    const input = collectInput();
    const response = await fetch(apiUrl(state.endpoint.id), {
      method: "POST",
      headers: authHeaders({ "content-type": "application/json" }),
      body: JSON.stringify(input),
    });
    const body = await readJson(response);
    if (response.status === 422 && Array.isArray(body?.detail)) {
      showValidationErrors(body.detail);
      $("submit-state").textContent = "Please fix the marked fields.";
      return;
    }
    if (!response.ok) {
      showFormError(detailText(body, response));
      $("submit-state").textContent = "";
      return;
    }
    $("submit-state").textContent = "Submitted.";
    const entry = historyEntry(body, input);
    saveHistory([entry, ...loadHistory().filter((item) => item.id !== entry.id)]);
    followRequest(entry, body);
  } catch (error) {
    showFormError(`Could not reach the server: ${error.message}`);
    $("submit-state").textContent = "";
  } finally {
    button.disabled = false;
  }
}

// ---------------------------------------------------------------- following a request

function followRequest(entry, firstStatus = null) {
  stopFollowing();
  const run = { entry, finished: false, closers: [] };
  state.run = run;
  $("run-empty").hidden = true;
  $("run").hidden = false;
  $("run-id").textContent = entry.id;
  $("run-endpoint").textContent = shortEndpoint(entry.endpoint);
  $("run-endpoint").title = entry.endpoint;
  $("logs").replaceChildren();
  $("results").replaceChildren();
  $("run-error").hidden = true;
  setProgress(null);
  $("cancel-button").hidden = false;
  $("cancel-button").disabled = false;
  setStatus(firstStatus ? firstStatus.status : "LOADING", firstStatus?.queue_position);
  renderHistory();
  openStream(run);
}

function stopFollowing() {
  if (!state.run) return;
  state.run.finished = true;
  for (const close of state.run.closers) close();
  state.run = null;
}

function openStream(run) {
  const url = `${run.entry.status_url}/stream?logs=1`;
  if (!apiKey() && "EventSource" in window) {
    const source = new EventSource(url);
    run.closers.push(() => source.close());
    source.onmessage = (message) => applyStatus(run, JSON.parse(message.data), { append: true });
    source.onerror = () => {
      // The server ends the stream after COMPLETED; anything else: fall back to polling.
      source.close();
      if (!run.finished) startPolling(run);
    };
    return;
  }
  const controller = new AbortController();
  run.closers.push(() => controller.abort());
  readStream(url, controller.signal, (body) => applyStatus(run, body, { append: true }))
    .then(() => {
      if (!run.finished) startPolling(run);
    })
    .catch(() => {
      if (!run.finished) startPolling(run);
    });
}

/** Server-sent events read with fetch, which (unlike EventSource) can send the API key. */
async function readStream(url, signal, onEvent) {
  const response = await fetch(url, { headers: authHeaders({ accept: "text/event-stream" }), signal });
  if (!response.ok || !response.body) throw new Error(`stream answered ${response.status}`);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replaceAll("\r\n", "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) onEvent(JSON.parse(data));
    }
  }
}

function startPolling(run) {
  let timer = null;
  run.closers.push(() => clearTimeout(timer));
  const poll = async () => {
    if (run.finished) return;
    try {
      const response = await fetch(`${run.entry.status_url}?logs=1`, { headers: authHeaders() });
      const body = await readJson(response);
      if (response.status === 404) {
        finishWithError(run, "This request is no longer on the server (expired, or made with another API key).", "not_found");
        return;
      }
      if (response.ok) applyStatus(run, body, { append: false });
      else showRunError(detailText(body, response));
    } catch (error) {
      showRunError(`Lost the connection to the server (${error.message}); retrying…`);
    }
    if (!run.finished) timer = setTimeout(poll, POLL_INTERVAL_MS);
  };
  poll();
}

function applyStatus(run, body, { append }) {
  if (run !== state.run || run.finished) return;
  if (Array.isArray(body.logs)) {
    if (!append) $("logs").replaceChildren();
    for (const line of body.logs) appendLog(line);
  }
  setStatus(body.status, body.queue_position);
  if (body.progress) setProgress(body.progress);
  if (body.status === "COMPLETED") finish(run, body);
}

const STEP_LOG = /^step (\d+)\/(\d+)$/;
const HAS_ZONE = /(Z|[+-]\d\d:?\d\d)$/;

function appendLog(line) {
  // fal's timestamps may carry no zone; they are UTC.
  const stamp = line.timestamp || "";
  const time = stamp ? new Date(HAS_ZONE.test(stamp) ? stamp : `${stamp}Z`) : null;
  const shown = time && !Number.isNaN(time.getTime()) ? time.toLocaleTimeString() : "";
  const step = STEP_LOG.exec(line.message || "");
  if (step) setProgress({ step: Number(step[1]), total: Number(step[2]) });
  $("logs").append(
    el("li", { className: `log-line level-${(line.level || "INFO").toLowerCase()}` }, [
      el("time", { text: shown, datetime: line.timestamp || null }),
      el("span", { className: "log-level", text: line.level || "" }),
      el("span", { className: "log-message", text: line.message }),
    ]),
  );
  const box = $("logs");
  box.scrollTop = box.scrollHeight;
}

function setStatus(status, queuePosition) {
  const badge = $("run-status");
  badge.textContent = STATUS_LABELS[status] || status;
  badge.dataset.status = status;
  const position = $("queue-position");
  if (status === "IN_QUEUE" && Number.isInteger(queuePosition)) {
    position.hidden = false;
    position.textContent =
      queuePosition === 0 ? "Next in line: waiting for a worker." : `Position in queue: ${queuePosition} ahead of this request.`;
  } else {
    position.hidden = true;
  }
}

function setProgress(progress) {
  const bar = $("progress");
  if (!progress) {
    bar.max = 1;
    bar.value = 0;
    $("progress-text").textContent = "–";
    return;
  }
  bar.max = progress.total;
  bar.value = progress.step;
  bar.setAttribute("aria-valuetext", `step ${progress.step} of ${progress.total}`);
  $("progress-text").textContent = `step ${progress.step}/${progress.total}`;
}

async function finish(run, body) {
  run.finished = true;
  for (const close of run.closers) close();
  $("cancel-button").hidden = true;
  if (body.error || body.error_type) {
    finishWithError(run, body.error || "The request failed", body.error_type);
    return;
  }
  const bar = $("progress");
  if (bar.max > 1) bar.value = bar.max;
  try {
    const response = await fetch(run.entry.response_url, { headers: authHeaders() });
    const output = await readJson(response);
    if (run !== state.run) return;
    if (!response.ok) {
      finishWithError(run, detailText(output, response), output?.error_type);
      return;
    }
    renderResults(run, output);
    updateHistory(run.entry.id, { state: "done", thumb: firstStoredUrl(output) });
  } catch (error) {
    showRunError(`Could not fetch the result: ${error.message}`);
  }
}

function finishWithError(run, message, errorType) {
  run.finished = true;
  for (const close of run.closers) close();
  $("cancel-button").hidden = true;
  const cancelled = errorType === "client_cancelled";
  const badge = $("run-status");
  badge.textContent = cancelled ? "Cancelled" : "Failed";
  badge.dataset.status = cancelled ? "CANCELLED" : "FAILED";
  showRunError(errorType ? `${message} (${errorType})` : message);
  updateHistory(run.entry.id, { state: cancelled ? "cancelled" : "failed" });
}

function showRunError(message) {
  $("run-error").textContent = message;
  $("run-error").hidden = !message;
}

async function cancelRun() {
  const run = state.run;
  if (!run || run.finished) return;
  const button = $("cancel-button");
  button.disabled = true;
  $("run-status").textContent = "Cancelling…";
  try {
    const response = await fetch(run.entry.cancel_url, { method: "PUT", headers: authHeaders() });
    const body = await readJson(response);
    if (response.status === 404) showRunError("The server does not know this request any more.");
    else if (!response.ok && body?.status !== "ALREADY_COMPLETED") showRunError(detailText(body, response));
  } catch (error) {
    showRunError(`Could not cancel: ${error.message}`);
    button.disabled = false;
  }
}

// ---------------------------------------------------------------- results

function renderResults(run, output) {
  const images = Array.isArray(output.images) ? output.images : [];
  const summary = [];
  if (output.seed !== undefined) summary.push(`seed ${output.seed}`);
  if (output.timings?.inference !== undefined) summary.push(`${Number(output.timings.inference).toFixed(1)} s`);
  const cards = images.map((image, index) => resultCard(run, output, image, index));
  $("results").replaceChildren(
    el("h3", { text: `Result${images.length > 1 ? "s" : ""}` }),
    el("p", { className: "result-summary", text: summary.join(" · ") }),
    el("div", { className: "result-grid" }, cards),
  );
}

function resultCard(run, output, image, index) {
  const name = image.file_name || `result-${index + 1}.${(image.content_type || "image/jpeg").split("/")[1]}`;
  const format = (image.content_type || "").replace("image/", "").toUpperCase();
  const flagged = Array.isArray(output.has_nsfw_concepts) && output.has_nsfw_concepts[index];
  const details = [`${image.width} × ${image.height} px`, format, formatBytes(image.file_size)].filter(Boolean);
  return el("figure", { className: "result-card" }, [
    el("a", { href: image.url, target: "_blank", rel: "noopener", className: "result-link" }, [
      el("img", {
        className: "result-image",
        src: image.url,
        alt: `Result ${index + 1} of “${run.entry.prompt}”`,
        dataset: { width: String(image.width), height: String(image.height) },
      }),
    ]),
    el("figcaption", {}, [
      el("span", { className: "result-size", text: details.join(" · ") }),
      el("span", { className: "result-seed", text: `seed ${output.seed}` }),
      flagged ? el("span", { className: "flag", text: "flagged by the safety checker" }) : null,
      el("span", { className: "result-actions" }, [
        el("a", { href: image.url, download: name, className: "button-link", text: "Download" }),
        el("button", {
          type: "button",
          className: "edit-again",
          text: "Edit this result again",
          onclick: () => useResultAsInput(image, name),
        }),
      ]),
    ]),
  ]);
}

function firstStoredUrl(output) {
  const url = output?.images?.[0]?.url;
  return typeof url === "string" && !url.startsWith("data:") ? url : null;
}

// ---------------------------------------------------------------- recent requests

function historyEntry(submitted, input) {
  const settings = { ...input };
  delete settings.image_url;
  delete settings.image_urls;
  const imageUrls = [].concat(input.image_urls || input.image_url || []).filter((url) => !url.startsWith("data:"));
  return {
    id: submitted.request_id,
    endpoint: state.endpoint.id,
    prompt: input.prompt,
    created_at: new Date().toISOString(),
    status_url: submitted.status_url,
    response_url: submitted.response_url,
    cancel_url: submitted.cancel_url,
    state: "submitted",
    settings,
    image_urls: imageUrls,
    thumb: null,
  };
}

function loadHistory() {
  try {
    const items = JSON.parse(localStorage.getItem(HISTORY_KEY) || "[]");
    return Array.isArray(items) ? items : [];
  } catch {
    return [];
  }
}

function saveHistory(items) {
  try {
    localStorage.setItem(HISTORY_KEY, JSON.stringify(items.slice(0, HISTORY_MAX)));
  } catch {
    // Storage full or blocked: the list is a convenience, the edit itself is unaffected.
  }
  renderHistory();
}

function updateHistory(id, changes) {
  saveHistory(loadHistory().map((item) => (item.id === id ? { ...item, ...changes } : item)));
}

const HISTORY_STATES = {
  submitted: "submitted",
  done: "done",
  failed: "failed",
  cancelled: "cancelled",
};

function renderHistory() {
  const items = loadHistory();
  $("history-empty").hidden = items.length > 0;
  $("history").replaceChildren(
    ...items.map((item) => {
      const current = state.run?.entry.id === item.id;
      const when = new Date(item.created_at);
      return el("li", { className: `history-item${current ? " current" : ""}`, dataset: { requestId: item.id } }, [
        item.thumb ? el("img", { src: item.thumb, alt: "", loading: "lazy" }) : el("span", { className: "thumb-placeholder" }),
        el("div", { className: "history-text" }, [
          el("span", { className: "history-prompt", text: item.prompt || "(no prompt)" }),
          el("span", {
            className: "history-meta",
            text: `${shortEndpoint(item.endpoint)} · ${when.toLocaleString()} · ${HISTORY_STATES[item.state] || item.state}`,
          }),
        ]),
        el("button", {
          type: "button",
          className: "subtle reopen",
          text: current ? "Shown" : "Reopen",
          disabled: current,
          "aria-label": `Reopen request “${item.prompt}”`,
          onclick: () => reopen(item),
        }),
      ]);
    }),
  );
}

function reopen(item) {
  chooseEndpoint(item.endpoint);
  $("prompt").value = item.prompt || "";
  restoreSettings(item.settings || {});
  if (item.image_urls?.length) {
    const images = item.image_urls.map((url, index) => {
      const name = decodeURIComponent(new URL(url).pathname.split("/").pop() || `input ${index + 1}`);
      const image = { key: state.nextImageKey++, name, previewUrl: url, url, via: "stored", status: "ready" };
      image.ready = Promise.resolve(image);
      return image;
    });
    replaceImages(images);
    renderImages();
  }
  followRequest(item);
  $("run-heading").scrollIntoView({ behavior: "smooth", block: "start" });
}

function restoreSettings(settings) {
  $("seed").value = settings.seed ?? "";
  $("guidance_scale").value = settings.guidance_scale ?? 3.5;
  $("num_images").value = String(settings.num_images ?? 1);
  $("safety_tolerance").value = String(settings.safety_tolerance ?? 2);
  $("output_format").value = settings.output_format ?? "jpeg";
  $("aspect_ratio").value = settings.aspect_ratio ?? "";
  $("aspect_ratio_choice").value = settings.aspect_ratio ?? "";
  $("sync_mode").checked = Boolean(settings.sync_mode);
  $("enhance_prompt").checked = Boolean(settings.enhance_prompt);
}

// ---------------------------------------------------------------- start

function wireDropZone() {
  const zone = $("drop-zone");
  const over = (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  };
  zone.addEventListener("dragenter", over);
  zone.addEventListener("dragover", over);
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    addFiles(event.dataTransfer?.files || []);
  });
  $("file-input").addEventListener("change", (event) => {
    addFiles(event.target.files);
    event.target.value = ""; // picking the same file again still fires change
  });
  document.addEventListener("paste", (event) => {
    const files = event.clipboardData?.files;
    if (files?.length) addFiles(files);
  });
}

function wireApiKey() {
  const input = $("api-key");
  input.value = sessionStorage.getItem(API_KEY_KEY) || "";
  input.addEventListener("change", () => sessionStorage.setItem(API_KEY_KEY, input.value.trim()));
  if (state.config.auth_required) {
    $("key-details").open = true;
    $("api-key-hint").textContent = "This server needs an API key. " + $("api-key-hint").textContent;
  }
}

async function start() {
  try {
    const response = await fetch(apiUrl("playground/config.json"));
    state.config = await response.json();
  } catch (error) {
    showFormError(`Could not load the playground's settings from the server: ${error.message}`);
    return;
  }
  $("server-version").textContent = `kontext-server ${state.config.version}`;
  renderEndpoints();
  chooseEndpoint(state.config.endpoints[0].id);
  wireDropZone();
  wireApiKey();
  $("edit-form").addEventListener("submit", submitEdit);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("edit-form").requestSubmit();
  });
  $("cancel-button").addEventListener("click", cancelRun);
  $("clear-history").addEventListener("click", () => saveHistory([]));
  renderHistory();
  document.body.dataset.ready = "true";
}

start();
