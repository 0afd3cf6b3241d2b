// The t2i-engine page: a form over /api/info, live progress from /api/generations/{id}/events
// (server-sent events read with fetch, so a bearer token can be sent), and the gallery.
"use strict";

const $ = (id) => document.getElementById(id);
const PARAMS = ["prompt", "negative_prompt", "width", "height", "steps", "sampler", "guidance_scale", "seed"];
const NUMBERS = new Set(["width", "height", "steps", "guidance_scale", "seed", "strength"]);
let info = null;
let current = null; // the id of the generation this page follows

function headers() {
  const token = sessionStorage.getItem("t2i-token") || $("token").value;
  return token ? { Authorization: "Bearer " + token } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error || message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

async function imageUrl(path) {
  const blob = await (await api(path)).blob();
  return URL.createObjectURL(blob);
}

function setStatus(text, step, total) {
  $("status").textContent = text;
  $("progress").max = total || 1;
  $("progress").value = step || 0;
}

async function loadInfo() {
  info = await (await api("/api/info")).json();
  $("model").textContent = info.model;
  const d = info.defaults;
  for (const key of ["negative_prompt", "width", "height", "steps", "guidance_scale"]) $(key).value = d[key] ?? "";
  $("strength").value = d.strength;
  for (const id of ["width", "height"]) { $(id).max = info.limits.max_side; $(id).step = info.limits.multiple_of; }
  $("steps").max = info.limits.max_steps;
  $("sampler").replaceChildren(...info.samplers.map((name) => new Option(name, name, false, name === d.sampler)));
  // only the inputs of the request keys this server's generator takes (an editor has no width/height)
  // a hidden input is also disabled: the browser would otherwise refuse the form over its value
  // (the job's default 512 above max_side) without saying why
  for (const key of PARAMS) $(key).disabled = $(key).closest("label").hidden = !info.keys.includes(key);
  const extra = $("extra");
  extra.hidden = info.extra.length === 0;
  for (const { key, label: help } of info.extra) { // the generator's own keys, e.g. image_guidance_scale
    const label = document.createElement("label");
    label.textContent = key + " ";
    label.title = help;
    const input = document.createElement("input");
    input.type = "number"; input.step = "any"; input.dataset.key = key; input.value = d[key] ?? "";
    label.append(input);
    extra.append(label);
  }
  const box = $("uploads");
  box.hidden = info.uploads.length === 0;
  for (const upload of info.uploads) {
    const label = document.createElement("label");
    label.textContent = upload.label + " ";
    const input = document.createElement("input");
    input.type = "file"; input.accept = "image/*"; input.dataset.field = upload.field; input.required = !!upload.required;
    if (upload.field === "init_image") input.addEventListener("change", () => { $("strength-row").hidden = !input.files.length; });
    label.append(input);
    box.append(label);
  }
  $("queue").textContent = `queue ${info.queue.waiting}/${info.queue.size}`;
}

function requestBody() {
  const params = {};
  for (const key of PARAMS) {
    const value = $(key).value;
    if (value === "" || !info.keys.includes(key)) continue;
    params[key] = NUMBERS.has(key) ? Number(value) : value;
  }
  for (const input of $("extra").querySelectorAll("input")) {
    if (input.value !== "") params[input.dataset.key] = Number(input.value);
  }
  const form = new FormData();
  let hasInit = false;
  for (const input of $("uploads").querySelectorAll("input[type=file]")) {
    if (input.files.length) {
      form.append(input.dataset.field, input.files[0]);
      hasInit ||= input.dataset.field === "init_image";
    }
  }
  if (hasInit) params.strength = Number($("strength").value);
  form.append("params", JSON.stringify(params));
  return form;
}

async function follow(id) {
  const response = await api(`/api/generations/${id}/events`);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data && onEvent(event, JSON.parse(data))) { reader.cancel(); return; }
    }
  }
}

// Returns true on the generation's last event.
function onEvent(event, data) {
  if (event === "queued") setStatus(`queued (position ${data.position})`, 0, 1);
  else if (event === "started") setStatus(`step 0 of ${data.total}`, 0, data.total);
  else if (event === "step") {
    setStatus(`step ${data.step} of ${data.total}`, data.step, data.total);
    if (data.preview) { $("preview").src = data.preview; $("preview").hidden = false; }
  } else if (event === "done") {
    imageUrl(data.image).then((url) => { $("preview").src = url; $("preview").hidden = false; });
    setStatus("done", 1, 1);
  } else if (event === "failed") { setStatus("failed", 0, 1); $("error").textContent = data.message; }
  else if (event === "cancelled") setStatus("cancelled", 0, 1);
  const last = ["done", "failed", "cancelled"].includes(event);
  if (last) { $("submit").disabled = false; $("cancel").disabled = true; current = null; refreshGallery(); }
  return last;
}

async function submit(ev) {
  ev.preventDefault();
  $("error").textContent = "";
  if ($("token").value) sessionStorage.setItem("t2i-token", $("token").value);
  $("submit").disabled = true;
  try {
    const job = await (await api("/api/generations", { method: "POST", body: requestBody() })).json();
    current = job.id;
    $("cancel").disabled = false;
    setStatus("queued", 0, 1);
    await follow(job.id);
  } catch (e) {
    $("error").textContent = e.message;
    $("submit").disabled = false;
    $("cancel").disabled = true;
  }
}

async function cancel() {
  if (!current) return;
  try { await api(`/api/generations/${current}`, { method: "DELETE" }); } catch (e) { $("error").textContent = e.message; }
}

function card(job) {
  const div = document.createElement("div");
  div.className = "card";
  div.dataset.id = job.id;
  div.dataset.state = job.state;
  const img = document.createElement("img");
  img.alt = job.params.prompt;
  if (job.image) imageUrl(job.image).then((url) => { img.src = url; });
  div.append(img);
  const caption = document.createElement("p");
  caption.className = "prompt";
  caption.textContent = job.params.prompt;
  div.append(caption);
  const dl = document.createElement("dl");
  const { prompt, ...rest } = job.params;
  for (const [key, value] of Object.entries({ state: job.state, ...rest })) {
    if (value === "" || value === null || value === undefined) continue;
    const dt = document.createElement("dt"); dt.textContent = key;
    const dd = document.createElement("dd"); dd.textContent = value;
    dl.append(dt, dd);
  }
  div.append(dl);
  if (job.inputs.length) {
    const inputs = document.createElement("div");
    inputs.className = "inputs";
    for (const field of job.inputs) {
      const small = document.createElement("img");
      small.title = field;
      imageUrl(`/api/generations/${job.id}/inputs/${encodeURIComponent(field)}`).then((url) => { small.src = url; });
      inputs.append(small);
    }
    div.append(inputs);
  }
  if (job.error) { const p = document.createElement("p"); p.className = "error"; p.textContent = job.error; div.append(p); }
  return div;
}

async function refreshGallery() {
  try {
    const list = await (await api("/api/generations")).json();
    $("gallery").replaceChildren(...list.generations.filter((j) => j.state !== "queued" && j.state !== "running").map(card));
    const queue = await (await api("/api/info")).json();
    $("queue").textContent = `queue ${queue.queue.waiting}/${queue.queue.size}`;
  } catch (e) { $("error").textContent = e.message; }
}

async function connect() {
  try {
    await loadInfo();
    $("error").textContent = "";
    await refreshGallery();
  } catch (e) {
    if (String(e.message).includes("token")) $("token-row").hidden = false;
    $("error").textContent = e.message;
  }
}

$("form").addEventListener("submit", submit);
$("cancel").addEventListener("click", cancel);
$("token").addEventListener("change", () => { sessionStorage.setItem("t2i-token", $("token").value); if (!info) connect(); });
connect();
