// Jobs: bulk submission (one POST /v1/jobs per prompt line and seed), and the live list of
// this tenant's jobs (GET /v1/jobs about once a second while any job is unfinished), each with
// its state, a progress bar, a cancel button and, once it succeeded, its images.

import { call, fetchBytes } from "./api.js";
import { bytesToDataUrl, pngText } from "./png.js";

const UNFINISHED = new Set(["QUEUED", "RUNNING"]);
const POLL_MS = 1000;
const MAX_BULK = 100; // jobs one click may submit

export class JobsPanel {
  /**
   * list: the #jobs element; request(): the generation fields of the form; onImage(bytes):
   * puts a finished job's image in the gallery (a click on its thumbnail); onError(error).
   */
  constructor({ list, request, onImage, onError }) {
    this.list = list;
    this.request = request;
    this.onImage = onImage;
    this.onError = onError;
    this.rows = new Map(); // job id -> its row element
    this.timer = null;
  }

  /** One job per (prompt line, seed): the seeds `from`..`to` (inclusive), or the form's. */
  async submit({ prompts, from, to, priority }) {
    const base = this.request();
    const lines = prompts.split("\n").map((p) => p.trim()).filter(Boolean);
    if (!lines.length) lines.push(base.prompt);
    const seeds = [];
    if (from !== "" && to !== "") {
      for (let s = Number(from); s <= Number(to) && seeds.length <= MAX_BULK; s++) seeds.push(s);
    } else {
      seeds.push(base.seed); // the form's seed, or undefined: random
    }
    if (lines.length * seeds.length > MAX_BULK) {
      throw new Error(`at most ${MAX_BULK} jobs at once (that is ${lines.length * seeds.length})`);
    }
    for (const prompt of lines) {
      for (const seed of seeds) {
        await call("/v1/jobs", { method: "POST", body: { request: { ...base, prompt, seed }, priority } });
      }
    }
    await this.refresh();
  }

  /** Reads the job list once, redraws it, and polls again while a job is unfinished. */
  async refresh() {
    clearTimeout(this.timer);
    let jobs;
    try {
      ({ data: jobs } = await call("/v1/jobs"));
    } catch (error) {
      this.onError(error);
      return;
    }
    jobs.forEach((job, i) => this.render(job, i));
    this.list.dataset.loaded = "1"; // (tests wait for the first listing)
    if (jobs.some((job) => UNFINISHED.has(job.state))) {
      this.timer = setTimeout(() => this.refresh(), POLL_MS);
    }
  }

  async cancel(id) {
    try {
      this.render(await call(`/v1/jobs/${id}/cancel`, { method: "POST" }));
    } catch (error) {
      this.onError(error);
    }
    await this.refresh();
  }

  /** Draws (or updates in place) the row of `job`, at position `index` of the list. */
  render(job, index = 0) {
    let row = this.rows.get(job.id);
    if (!row) {
      row = this.newRow(job);
      this.rows.set(job.id, row);
    }
    if (this.list.children[index] !== row) this.list.insertBefore(row, this.list.children[index] || null);
    row.dataset.state = job.state;
    row.querySelector(".job-state").textContent = job.state;
    const bar = row.querySelector("progress");
    bar.max = job.total_steps || 1;
    bar.value = job.state === "SUCCEEDED" ? bar.max : job.step || 0;
    const steps = job.total_steps ? `${job.step || 0}/${job.total_steps}` : "";
    row.querySelector(".job-steps").textContent = steps;
    row.querySelector(".job-error").textContent = job.error || "";
    row.querySelector(".job-cancel").hidden = !UNFINISHED.has(job.state);
    if (job.state === "SUCCEEDED" && !row.dataset.loaded) {
      row.dataset.loaded = "1";
      this.loadImages(job, row.querySelector(".job-images"));
    }
  }

  newRow(job) {
    const row = document.createElement("div");
    row.className = "job";
    row.dataset.jobId = job.id;
    row.innerHTML = `<span class="job-prompt"></span> <span class="job-state"></span>
      <progress></progress> <span class="job-steps muted"></span>
      <button type="button" class="job-cancel">Cancel</button>
      <div class="job-error error"></div><div class="job-images"></div>`;
    row.querySelector(".job-prompt").textContent = job.prompt || job.id;
    row.querySelector(".job-cancel").addEventListener("click", () => this.cancel(job.id));
    return row;
  }

  /** The job's images as thumbnails (their parameters as the tooltip); a click puts one in
   * the gallery, where "use these settings" works on it. */
  async loadImages(job, where) {
    for (const image of job.images || []) {
      try {
        const bytes = await fetchBytes(image.url);
        const img = new Image();
        img.src = bytesToDataUrl(bytes);
        img.title = pngText(bytes).parameters || "";
        img.addEventListener("click", () => this.onImage(bytes));
        where.append(img);
      } catch (error) {
        this.onError(error);
      }
    }
  }
}
