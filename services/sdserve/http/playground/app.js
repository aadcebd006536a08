// The playground's main module: the form, a generation (streamed), the gallery and the wiring
// of the other modules. Read top to bottom:
//   1. start-up: the API key, the models and their samplers, LoRAs and sizes;
//   2. the form -> a POST /v1/images/generations body;
//   3. generating: one stream per image, partial images, progress, cancel;
//   4. the gallery: images with their PNG parameters, "use these settings";
//   5. errors beside the field they name, and the API key dialog.

import { ApiError, apiKey, call, setApiKey, stream } from "./api.js";
import { JobsPanel } from "./jobs.js";
import { MaskEditor } from "./mask.js";
import { base64ToBytes, bytesToDataUrl, parseParameters, pngText } from "./png.js";

const $ = (id) => document.getElementById(id);
const FALLBACK_SCHEDULERS = ["ddim", "ddpm", "pndm", "euler", "euler_ancestral", "dpmpp_2m"];
const PARTIAL_IMAGES = 3; // the most the API streams (OpenAI's limit)
const MAX_IMAGES = 8; // images (streams) one click starts

let models = new Map(); // model id -> its /v1/models entry
let running = null; // the AbortController of the generation in flight
let editor; // the MaskEditor of the init image
let jobs; // the JobsPanel
let progress = []; // the generation's images: {step, total} each

// --- 1. Start-up ----------------------------------------------------------------------------

async function main() {
  editor = new MaskEditor({
    image: $("init-canvas"), mask: $("mask-canvas"), brush: $("brush-size"), erase: $("brush-erase"),
  });
  jobs = new JobsPanel({
    list: $("jobs"), request: readForm, onImage: (bytes) => addToGallery(bytes),
    onError: (e) => showError(e, $("jobs-error")),
  });
  wireEvents();
  await withKey(loadModels);
  await jobs.refresh();
}

function wireEvents() {
  $("generate-form").addEventListener("submit", (e) => {
    e.preventDefault();
    generate();
  });
  $("cancel").addEventListener("click", cancel);
  $("seed-random").addEventListener("click", () => ($("seed").value = ""));
  $("model").addEventListener("change", () => showModel(models.get($("model").value)));
  $("init-image").addEventListener("change", () => loadInitFile($("init-image").files[0]));
  $("mask-clear").addEventListener("click", () => editor.clear());
  $("init-clear").addEventListener("click", clearInit);
  $("change-key").addEventListener("click", () => askForKey(""));
  $("jobs-form").addEventListener("submit", (e) => {
    e.preventDefault();
    submitJobs();
  });
}

async function loadModels() {
  const { data } = await call("/v1/models");
  models = new Map(data.map((m) => [m.id, m]));
  $("model").replaceChildren(...data.map((m) => new Option(`${m.id} (${m.family})`, m.id)));
  showModel(data[0]);
  $("status").textContent = `${data.length} model${data.length === 1 ? "" : "s"} served`;
}

/** Fills the parts of the form that depend on the model: samplers, size, LoRAs, image inputs. */
function showModel(model) {
  if (!model) return;
  const schedulers = model.schedulers || FALLBACK_SCHEDULERS;
  $("scheduler").replaceChildren(...schedulers.map((s) => new Option(s, s)));
  $("scheduler").value = model.default_scheduler || schedulers[0];
  const [width, height] = model.native_size || [model.native_width, model.native_height];
  $("width").value = width;
  $("height").value = height;
  const loras = model.loras || [];
  $("loras").replaceChildren(...loras.map(loraRow));
  if (!loras.length) $("loras").innerHTML = '<span class="muted">this model has none</span>';
  // image inputs need the model's VaeEncoder stage (SDXL, SD3 and FLUX have none here)
  const stages = (model.stages || []).map((s) => s.stage);
  const noEncoder = stages.length > 0 && !stages.includes("vae_encoder");
  $("image-input").disabled = model.image_inputs === false || noEncoder;
}

function loraRow(name) {
  const row = document.createElement("div");
  row.className = "row lora";
  row.innerHTML = `<label class="inline"><input type="checkbox" class="lora-on"> <span></span></label>
    <label>scale <input type="number" class="lora-scale" step="0.1" value="1"></label>`;
  row.dataset.lora = name;
  row.querySelector("span").textContent = name;
  row.querySelector(".lora-on").id = `lora-${name}`;
  row.querySelector(".lora-scale").id = `lora-${name}-scale`;
  return row;
}

// --- 2. The form -> the request body --------------------------------------------------------

/** The generation fields of the form, as POST /v1/images/generations names them. */
function readForm() {
  const body = {
    prompt: $("prompt").value,
    model: $("model").value,
    scheduler: $("scheduler").value,
    num_inference_steps: Number($("steps").value),
    guidance_scale: Number($("guidance").value),
  };
  if ($("negative-prompt").value) body.negative_prompt = $("negative-prompt").value;
  const seed = $("seed").value.trim();
  if (seed && !/^\d+$/.test(seed)) throw formError("seed", "must be a whole number (empty: random)");
  if (seed) body.seed = Number(seed);
  const loras = [...document.querySelectorAll("#loras .lora")]
    .filter((row) => row.querySelector(".lora-on").checked)
    .map((row) => ({ name: row.dataset.lora, scale: Number(row.querySelector(".lora-scale").value) }));
  if (loras.length) body.loras = loras;
  if (Number($("guidance-stop").value) < 1) body.guidance_stop = Number($("guidance-stop").value);
  if (Number($("cache-interval").value) > 1) body.cache_interval = Number($("cache-interval").value);
  if (editor.source && !$("image-input").disabled) {
    // the output takes the image's size; a painted mask makes it inpainting
    body.init_image = editor.imagePng();
    body.strength = Number($("strength").value);
    if (editor.hasMask()) body.mask_image = editor.maskPng();
  } else {
    body.size = `${$("width").value}x${$("height").value}`;
  }
  return body;
}

// --- 3. Generating --------------------------------------------------------------------------

/**
 * One streamed request per image (so that each shows its own partial images), all at once:
 * the server batches their steps. With a seed, image i gets seed + i, as `n` would give.
 */
async function generate() {
  clearErrors();
  let body, n;
  try {
    body = readForm();
    n = Number($("n").value);
    if (!(n >= 1 && n <= MAX_IMAGES)) throw formError("n", `must be within 1..${MAX_IMAGES}`);
  } catch (error) {
    return showError(error);
  }
  progress = Array.from({ length: n }, () => ({ step: 0, total: body.num_inference_steps }));
  running = new AbortController();
  setRunning(true);
  $("partials").replaceChildren();
  $("seed-used").textContent = "";
  const seeds = [];
  const one = (i) => {
    const request = { ...body, stream: true, partial_images: PARTIAL_IMAGES, stream_progress: true };
    if (body.seed !== undefined) request.seed = body.seed + i;
    return stream("/v1/images/generations", request,
      (type, data) => onStreamEvent(type, data, progress[i], seeds), running.signal);
  };
  showProgress("starting");
  try {
    await withKey(() => Promise.all(progress.map((_, i) => one(i))));
    showProgress("done");
  } catch (error) {
    showProgress(error.name === "AbortError" ? "cancelled" : "failed");
    showError(error);
  } finally {
    running = null;
    setRunning(false);
  }
}

/** One server-sent event of image `mine` (its {step, total}); `seeds` collects the seeds used. */
function onStreamEvent(type, data, mine, seeds) {
  if (type === "image_generation.progress") {
    mine.step = data.step;
    mine.total = data.total_steps;
  } else if (type === "image_generation.partial_image") {
    const img = new Image();
    img.src = `data:image/png;base64,${data.b64_json}`;
    img.className = "partial";
    img.dataset.index = data.partial_image_index;
    $("partials").append(img);
  } else if (type === "image_generation.completed") {
    mine.step = mine.total;
    const bytes = base64ToBytes(data.b64_json);
    const seed = data.seed ?? parseParameters(pngText(bytes).parameters || "").fields.Seed;
    seeds.push(seed);
    $("seed-used").textContent = `seed used: ${seeds.join(", ")}`;
    addToGallery(bytes);
  } else {
    return;
  }
  showProgress();
}

/** The progress bar: the steps done over all the images' steps, and the count as text. */
function showProgress(word = "") {
  const step = progress.reduce((sum, p) => sum + p.step, 0);
  const total = progress.reduce((sum, p) => sum + p.total, 0) || 1;
  $("progress").max = total;
  $("progress").value = step;
  $("progress-text").textContent = `step ${step} / ${total}` + (word && ` · ${word}`);
}

/** Cancel: closing the connection stops the request's steps on the server. */
function cancel() {
  running?.abort();
}

function setRunning(on) {
  $("generate").disabled = on;
  $("cancel").disabled = !on;
  document.body.classList.toggle("generating", on);
}

// --- 4. The gallery -------------------------------------------------------------------------

/** A card: the image, its parameters (from the PNG), "use these settings", "use as image". */
function addToGallery(bytes) {
  const text = pngText(bytes);
  const card = document.createElement("figure");
  card.className = "card";
  card.innerHTML = `<img alt="generated image"><figcaption><pre class="params"></pre>
    <button type="button" class="use-settings">use these settings</button>
    <button type="button" class="use-as-init">use as image</button></figcaption>`;
  card.querySelector("img").src = bytesToDataUrl(bytes);
  card.querySelector(".params").textContent = text.parameters || "(no parameters)";
  if (text.safety && text.safety !== "passed") {
    // the model's safety checker (PNG text "safety": flagged, or blocked: a black image)
    card.dataset.safety = text.safety;
    card.querySelector("figcaption").insertAdjacentHTML(
      "afterbegin", `<div class="safety">${text.safety} by the safety checker</div>`);
  }
  const png = new Blob([bytes], { type: "image/png" });
  card.querySelector(".use-settings").addEventListener("click", () => useSettings(text.parameters || ""));
  card.querySelector(".use-as-init").addEventListener("click", () => loadInitFile(png));
  $("gallery").prepend(card);
}

/** Fills the form from an image's parameters text. */
function useSettings(parameters) {
  const { prompt, negative_prompt, fields } = parseParameters(parameters);
  if (fields.Model && models.has(fields.Model)) {
    $("model").value = fields.Model;
    showModel(models.get(fields.Model));
  }
  $("prompt").value = prompt;
  $("negative-prompt").value = negative_prompt;
  const set = (id, value) => value !== undefined && ($(id).value = value);
  set("steps", fields.Steps);
  set("scheduler", fields.Sampler);
  set("guidance", fields["CFG scale"]);
  set("seed", fields.Seed);
  set("strength", fields["Denoising strength"]);
  $("guidance-stop").value = fields["Guidance stop"] ?? 1;
  $("cache-interval").value = fields["DeepCache interval"] ?? 1;
  if (fields.Size) [$("width").value, $("height").value] = fields.Size.split("x");
  for (const pair of (fields.LoRA || "").split(" ").filter(Boolean)) {
    const [name, scale] = pair.split(":");
    const row = document.querySelector(`#loras .lora[data-lora="${CSS.escape(name)}"]`);
    if (!row) continue;
    row.querySelector(".lora-on").checked = true;
    row.querySelector(".lora-scale").value = scale;
  }
  $("n").value = 1;
}

async function loadInitFile(file) {
  if (!file) return;
  const bytes = new Uint8Array(await file.arrayBuffer());
  editor.load(await createImageBitmap(file), bytesToDataUrl(bytes, file.type || "image/png"));
  $("mask-editor").hidden = false;
}

function clearInit() {
  editor.source = null;
  $("init-image").value = "";
  $("mask-editor").hidden = true;
}

async function submitJobs() {
  clearErrors();
  try {
    await withKey(() => jobs.submit({
      prompts: $("bulk-prompts").value, from: $("bulk-seed-from").value, to: $("bulk-seed-to").value,
      priority: $("bulk-priority").value,
    }));
  } catch (error) {
    showError(error, $("jobs-error"));
  }
}

// --- 5. Errors and the API key --------------------------------------------------------------

/** Shows an error beside the field it names (`param`), else in `fallback`. */
function showError(error, fallback = $("form-error")) {
  if (error.name === "AbortError") return;
  const where = (error.param && document.querySelector(`.error[data-param="${error.param}"]`)) || fallback;
  where.textContent = error.message;
  where.classList.add("shown");
}

/** An error found before calling the server, shown as the server's would be. */
function formError(param, message) {
  return new ApiError(400, { message: `${param}: ${message}`, param });
}

function clearErrors() {
  for (const el of document.querySelectorAll(".error")) {
    el.textContent = "";
    el.classList.remove("shown");
  }
}

/** Runs `fn`; when the server answers 401, asks for a key (once per tab) and runs it again. */
async function withKey(fn) {
  for (;;) {
    try {
      return await fn();
    } catch (error) {
      if (!(error instanceof ApiError) || error.status !== 401) throw error;
      await askForKey(apiKey() ? error.message : "");
    }
  }
}

/** Opens the key dialog (with `message`, e.g. "unknown API key"); resolves once one is saved. */
function askForKey(message) {
  const dialog = $("key-dialog");
  $("api-key-error").textContent = message;
  $("api-key").value = apiKey();
  if (!dialog.open) dialog.showModal();
  return new Promise((resolve) => {
    $("key-form").addEventListener("submit", () => {
      setApiKey($("api-key").value.trim());
      resolve();
    }, { once: true });
  });
}

main().catch((error) => showError(error));
