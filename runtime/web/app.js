// edgesd's page: a form over the A1111 API this server speaks (/sdapi/v1/*) and its model list
// (/edgesd/v1/models). Plain JS, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
let models = {};  // name -> the model's defaults
let polling = null;
let running = false;  // a poll answered after the picture came must not overwrite the page

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const token = sessionStorage.getItem("edgesd-token");
  if (token) h["Authorization"] = "Bearer " + token;
  return h;
}

async function call(method, path, body) {
  const response = await fetch(path, { method, headers: headers(body !== undefined),
                                       body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await response.json().catch(() => ({ error: { message: response.statusText } }));
  if (response.status === 401) {
    $("token-row").hidden = false;
    sessionStorage.removeItem("edgesd-token");
  }
  if (!response.ok) throw new Error((data.error && data.error.message) || response.statusText);
  return data;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function fillDefaults() {
  const m = models[$("model").value];
  if (!m) return;
  $("steps").value = m.steps;
  $("guidance").value = m.guidance;
  $("width").value = m.width;
  $("height").value = m.height;
  $("width").step = $("height").step = $("width").min = $("height").min = m.size_multiple;
}

async function loadChoices() {
  const list = await call("GET", "/edgesd/v1/models");
  $("model").replaceChildren(...list.map((m) => new Option(m.name, m.name)));
  models = Object.fromEntries(list.map((m) => [m.name, m]));
  const samplers = await call("GET", "/sdapi/v1/samplers");
  $("sampler").replaceChildren(new Option("the model's own", ""),
                               ...samplers.map((s) => new Option(s.name, s.name)));
  fillDefaults();
  $("status").textContent = "ready";
}

async function pollProgress(model) {
  try {
    const p = await call("GET", "/sdapi/v1/progress?model=" + encodeURIComponent(model));
    if (!running) return;
    const state = p.state || {};
    if (state.sampling_steps) {
      $("progress").max = state.sampling_steps;
      $("progress").value = state.sampling_step;
      $("status").textContent = `step ${state.sampling_step} of ${state.sampling_steps}`;
    }
    if (p.current_image) {
      $("preview").src = "data:image/png;base64," + p.current_image;
      $("preview").hidden = false;
    }
  } catch (e) { /* a missed poll is retried by the next one */ }
}

async function generate(event) {
  event.preventDefault();
  if ($("token").value) sessionStorage.setItem("edgesd-token", $("token").value);
  const model = $("model").value;
  const body = {
    model, prompt: $("prompt").value, negative_prompt: $("negative_prompt").value,
    steps: Number($("steps").value), cfg_scale: Number($("guidance").value),
    width: Number($("width").value), height: Number($("height").value),
    seed: $("seed").value === "" ? -1 : Number($("seed").value),
  };
  if ($("sampler").value) body.sampler_name = $("sampler").value;
  showError("");
  $("generate").disabled = true;
  $("cancel").disabled = false;
  $("progress").value = 0;
  $("status").textContent = "generating";
  running = true;
  polling = setInterval(() => pollProgress(model), 300);
  try {
    const data = await call("POST", "/sdapi/v1/txt2img", body).finally(() => { running = false; });
    const info = JSON.parse(data.info);
    const url = "data:image/png;base64," + data.images[0];
    $("result").src = url;
    $("result").hidden = false;
    $("preview").hidden = true;
    $("parameters").textContent = info.infotexts[0];
    $("download").href = url;
    $("download").download = `edgesd-${info.seed}.png`;
    $("download").hidden = false;
    $("progress").value = $("progress").max;
    $("status").textContent = "done";
  } catch (e) {
    showError(e.message);
    $("status").textContent = "stopped";
  } finally {
    clearInterval(polling);
    $("generate").disabled = false;
    $("cancel").disabled = true;
  }
}

async function cancel() {
  $("cancel").disabled = true;
  await call("POST", "/sdapi/v1/interrupt?model=" + encodeURIComponent($("model").value)).catch(
    (e) => showError(e.message));
}

document.addEventListener("DOMContentLoaded", () => {
  $("form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancel);
  $("model").addEventListener("change", fillDefaults);
  $("token").addEventListener("change", () => { sessionStorage.setItem("edgesd-token", $("token").value);
                                               loadChoices().then(() => showError("")).catch((e) => showError(e.message)); });
  loadChoices().catch((e) => showError(e.message));
});
