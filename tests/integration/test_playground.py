"""The web playground (issue 32) in a real headless browser: Debian's chromium driven by
Selenium (`browser.py`), against the session's server and its HTTP API. Every test acts as a
user would (typing, clicking, painting with the mouse) and checks what the page shows against
the server: the gRPC API's pixels, the Denoiser's counters, the built-in model's checker.

SDSERVE_PLAYGROUND_SCREENSHOT=docs/playground.png refreshes the README's screenshot.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
from browser import (
    by_id,
    card_png,
    cards,
    chromium,
    data_url_bytes,
    error_beside,
    fill,
    generate,
    job_rows,
    known_jobs,
    open_page,
    paint,
    wait_for,
)
from helpers import API_KEYS, denoiser_stats
from PIL import Image
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from sdserve.shapes.adherence import (
    background_color,
    foreground_color,
    foreground_mask,
    nearest_color,
)
from sdserve.v1 import diffusion_pb2

pytestmark = pytest.mark.integration

KEY = API_KEYS["tenant-a"]
PROMPT = "a red circle on a blue background"  # test_default_model.py's first caption
RECORD = """
window.seen = [];
const note = (what) => new MutationObserver((records) => {
  for (const r of records) for (const n of r.addedNodes) window.seen.push(what);
});
note("partial").observe(document.getElementById("partials"), {childList: true});
note("final").observe(document.getElementById("gallery"), {childList: true});
"""
"""Records, in order, each partial image and each final image the page adds."""


@pytest.fixture(scope="module")
def base_url(server) -> str:
    return f"http://127.0.0.1:{server.config.server.http_port}"


@pytest.fixture(scope="module")
def driver():
    browser = chromium()
    yield browser
    browser.quit()


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def test_a_wrong_key_shows_the_error_then_the_right_one_opens_the_page(driver, base_url):
    open_page(driver, base_url, key=None)
    dialog = wait_for(lambda: (d := by_id(driver, "key-dialog")).is_displayed() and d,
                      what="the key dialog")  # fmt: skip
    by_id(driver, "api-key").send_keys("not-a-key")
    by_id(driver, "api-key-save").click()
    error = wait_for(lambda: by_id(driver, "api-key-error").text, what="the key's error")
    assert error == "unknown API key" and dialog.is_displayed()
    fill(driver, api_key=KEY)
    by_id(driver, "api-key-save").click()
    wait_for(lambda: by_id(driver, "model").get_attribute("value"), what="the models")
    assert not dialog.is_displayed()
    assert driver.execute_script("return sessionStorage.getItem('sdserve.apiKey')") == KEY
    served = [o.get_attribute("value") for o in Select(by_id(driver, "model")).options]
    assert {"default", "shapes", "sdxl", "sd3", "flux"} <= set(served)
    # every asset came from the server itself: nothing from the network (no CDN, no fonts)
    loaded = driver.execute_script(
        "return performance.getEntriesByType('resource').map((e) => e.name)")  # fmt: skip
    assert loaded and all(url.startswith((base_url, "data:")) for url in loaded), loaded


def test_a_generation_streams_partials_and_ends_with_the_grpc_apis_image(driver, base_url,
                                                                          stub):  # fmt: skip
    open_page(driver, base_url, KEY)
    fill(driver, model="shapes", prompt=PROMPT, steps=24, scheduler="ddim", guidance=7.5,
          seed=5, width=64, height=64)  # fmt: skip
    driver.execute_script(RECORD)
    png = generate(driver)
    seen = driver.execute_script("return window.seen")
    assert seen[-1] == "final" and seen.count("final") == 1
    assert seen.count("partial") >= 2, seen  # rendered before the final one
    assert "step 24 / 24" in by_id(driver, "progress-text").text
    assert by_id(driver, "seed-used").text == "seed used: 5"
    reply = stub.Generate(diffusion_pb2.GenerateRequest(
        prompt=PROMPT, model="shapes", steps=24, scheduler="ddim", guidance_scale=7.5, seed=5,
        width=64, height=64), timeout=60)  # fmt: skip
    assert np.array_equal(_pixels(png), _pixels(reply.images[0].png))
    image = Image.open(io.BytesIO(png))
    assert (foreground_color(image), background_color(image)) == ("red", "blue")
    params = cards(driver)[0].find_element(By.CSS_SELECTOR, ".params").text
    assert params.startswith(PROMPT) and "Seed: 5" in params and "Model: shapes" in params


def test_use_these_settings_fills_the_form_from_the_png(driver, base_url):
    open_page(driver, base_url, KEY)
    fill(driver, model="shapes", prompt="a green square on a white background", steps=3,
          scheduler="euler", seed=77, guidance=4)  # fmt: skip
    generate(driver)
    fill(driver, model="default", prompt="something else", steps=9, seed=1)
    cards(driver)[0].find_element(By.CSS_SELECTOR, ".use-settings").click()
    values = {k: by_id(driver, k).get_attribute("value")
              for k in ("model", "prompt", "steps", "scheduler", "seed", "guidance")}  # fmt: skip
    assert values == {
        "model": "shapes",
        "prompt": "a green square on a white background",
        "steps": "3",
        "scheduler": "euler",
        "seed": "77",
        "guidance": "4",
    }


def test_a_lora_and_the_cheaper_step_knobs_reach_the_image(driver, base_url, stub):
    """The built-in model's `cyan` adapter at scale 0.8, guidance stop and DeepCache from the
    form: the PNG says so, and its pixels are the gRPC API's for the same fields."""
    prompt = "a yellow square on a cyan background"  # docs/models-and-adapters.md's
    open_page(driver, base_url, KEY)
    fill(driver, model="shapes", prompt=prompt, steps=8, scheduler="ddim", seed=2,
          guidance_stop=0.5, cache_interval=2)  # fmt: skip
    by_id(driver, "lora-cyan").click()
    fill(driver, lora_cyan_scale=0.8)
    png = generate(driver)
    params = Image.open(io.BytesIO(png)).text["parameters"]
    for field in ("LoRA: cyan:0.8", "Guidance stop: 0.5", "DeepCache interval: 2"):
        assert field in params, params
    reply = stub.Generate(diffusion_pb2.GenerateRequest(
        prompt=prompt, model="shapes", steps=8, scheduler="ddim", seed=2, width=64, height=64,
        guidance_scale=7.5, guidance_stop=0.5, cache_interval=2,
        loras=[diffusion_pb2.LoraWeight(name="cyan", scale=0.8)]), timeout=60)  # fmt: skip
    assert np.array_equal(_pixels(png), _pixels(reply.images[0].png))


def test_an_image_the_safety_checker_flags_is_marked(driver, base_url):
    """helpers.SAFETY_REQUEST on the "default" model (safety: flag): the checker flags seed 40
    and passes seed 41; the page marks the first card only."""
    open_page(driver, base_url, KEY)
    fill(driver, model="default", prompt="a safety test", steps=4, scheduler="dpmpp_2m",
         guidance=7.5, seed=40, n=2, width=64, height=64)  # fmt: skip
    by_id(driver, "generate").click()
    wait_for(lambda: len(cards(driver)) == 2, 60, what="2 images")
    marks = {_seed(card_png(driver, c)): c.get_attribute("data-safety") for c in cards(driver)}
    assert marks == {40: "flagged", 41: None}
    flagged = next(c for c in cards(driver) if c.get_attribute("data-safety"))
    assert "flagged by the safety checker" in flagged.text


def test_random_seed_shows_the_seed_used(driver, base_url):
    open_page(driver, base_url, KEY)
    fill(driver, model="shapes", steps=2, seed="")
    png = generate(driver)
    used = by_id(driver, "seed-used").text.removeprefix("seed used: ")
    assert used.isdigit() and _seed(png) == int(used)


def test_several_images_get_consecutive_seeds(driver, base_url):
    open_page(driver, base_url, KEY)
    fill(driver, model="shapes", steps=3, seed=40, n=3)
    by_id(driver, "generate").click()
    wait_for(lambda: len(cards(driver)) == 3, 60, what="3 images")
    assert sorted(_seed(card_png(driver, card)) for card in cards(driver)) == [40, 41, 42]
    used = by_id(driver, "seed-used").text.removeprefix("seed used: ").split(", ")
    assert sorted(map(int, used)) == [40, 41, 42]
    assert "step 9 / 9" in by_id(driver, "progress-text").text


def test_errors_are_shown_beside_the_field_they_name(driver, base_url):
    open_page(driver, base_url, KEY)
    fill(driver, model="shapes", steps=100000)  # the server's error names the body field
    by_id(driver, "generate").click()
    assert error_beside(driver, "num_inference_steps").startswith("steps: must be within 1..")
    fill(driver, steps=4, width=60)
    by_id(driver, "generate").click()
    assert error_beside(driver, "size") == "width: must be a multiple of 8, got 60"
    fill(driver, width=64, seed="abc")  # the page's own checks, shown the same way
    by_id(driver, "generate").click()
    assert error_beside(driver, "seed") == "seed: must be a whole number (empty: random)"
    assert by_id(driver, "form-error").text == ""
    assert by_id(driver, "generate").is_enabled()


def test_cancel_stops_the_requests_steps_within_a_step(driver, base_url, server):
    """A long request on the tiny SDXL (large, so that a step takes a while); Cancel once it
    runs. Its Denoiser counts one cancellation, finishes nothing, and runs at most the step
    that was in flight when the click returned. (Not the default model: load shedding's
    capacity is in image-steps whatever their size, so a minute of 512x512 steps there would
    make the later tests' 64x64 requests look too slow for their deadlines.)"""
    app, deployment = server.config.server.app_name, "Denoiser-sdxl"
    open_page(driver, base_url, KEY)
    fill(driver, model="sdxl", prompt="a long one", steps=150, seed=1, width=512,
          height=512)  # fmt: skip
    before = denoiser_stats(app, deployment)
    by_id(driver, "generate").click()
    wait_for(lambda: denoiser_stats(app, deployment).unet_steps >= before.unet_steps + 3, 60,
             0.02, "the request's third step")  # fmt: skip
    by_id(driver, "cancel").click()
    at_click = denoiser_stats(app, deployment)

    def dropped():
        stats = denoiser_stats(app, deployment)
        return stats.cancelled > before.cancelled and stats.running == 0 and stats

    freed = wait_for(dropped, 20, what="the Denoiser to drop it")
    late = freed.unet_steps - at_click.unet_steps
    print(
        f"cancel: {at_click.unet_steps - before.unet_steps} steps run at the click, {late} after it"
    )
    assert freed.cancelled - before.cancelled == 1
    assert freed.finished == before.finished  # never finished, so never decoded
    assert late <= 1, f"{late} U-Net steps ran after the click"
    assert "cancelled" in by_id(driver, "progress-text").text


def _strip(original: Image.Image) -> tuple[slice, slice]:
    """The widest band along one side of the image that the shape leaves free, as (rows,
    cols) in image pixels."""
    shape = foreground_mask(original)  # stray pixels of other colours at edges aside:
    rows = np.nonzero(shape.mean(axis=1) > 0.1)[0]
    cols = np.nonzero(shape.mean(axis=0) > 0.1)[0]
    size = original.size[0]
    margins = {"top": rows.min(), "bottom": size - 1 - rows.max(), "left": cols.min(),
               "right": size - 1 - cols.max()}  # fmt: skip
    side = max(margins, key=margins.get)
    depth = min(int(margins[side]) - 2, 24)
    assert depth >= 12, f"the shape leaves no free band: {margins}"
    band = {"top": (slice(0, depth), slice(0, size)),
            "bottom": (slice(size - depth, size), slice(0, size)),
            "left": (slice(0, size), slice(0, depth)),
            "right": (slice(0, size), slice(size - depth, size))}  # fmt: skip
    return band[side]


def test_inpainting_repaints_the_painted_area_and_keeps_the_rest(driver, base_url, stub,
                                                                 tmp_path):  # fmt: skip
    request = diffusion_pb2.GenerateRequest(prompt=PROMPT, model="shapes", seed=0, steps=25,
                                            scheduler="ddim")  # fmt: skip
    reply = stub.Generate(request, timeout=60)
    init = tmp_path / "red.png"
    init.write_bytes(reply.images[0].png)
    original = Image.open(init)
    rows, cols = _strip(original)
    open_page(driver, base_url, KEY)
    fill(driver, model="shapes", prompt="a red circle on a yellow background", steps=25,
          scheduler="ddim", seed=0, strength=1)  # fmt: skip
    by_id(driver, "init-image").send_keys(str(init))
    canvas = wait_for(lambda: (c := by_id(driver, "mask-canvas")).is_displayed() and c)
    paint(driver, canvas, rows, cols, original.size[0])
    painted = driver.execute_script(
        "const c = document.getElementById('mask-canvas');"
        "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data"
        ".filter((v, i) => i % 4 == 3 && v > 0)).length")  # fmt: skip
    assert painted >= 0.8 * (rows.stop - rows.start) * (cols.stop - cols.start)
    after = _pixels(generate(driver))
    before = _pixels(init.read_bytes())
    inside = np.zeros(before.shape[:2], bool)
    inside[rows, cols] = True
    core = np.zeros_like(inside)  # 8 pixels (one latent) in from the band's edges
    core[rows.start + 8 * (rows.start > 0): rows.stop - 8 * (rows.stop < 64),
         cols.start + 8 * (cols.start > 0): cols.stop - 8 * (cols.stop < 64)] = True  # fmt: skip
    core &= inside
    rest = _away(inside, 8)
    assert nearest_color(np.median(before[core], axis=0)) == "blue"
    assert nearest_color(np.median(after[core], axis=0)) == "yellow", "the band was not repainted"
    assert np.abs(after[rest] - before[rest]).mean() < 12, "the unpainted area changed"


def _away(mask: np.ndarray, margin: int) -> np.ndarray:
    """The pixels farther than `margin` from every True pixel of `mask` (a square dilation)."""
    grown = mask.copy()
    for axis in (0, 1):
        for shift in range(1, margin + 1):
            grown |= np.roll(mask, shift, axis) | np.roll(mask, -shift, axis)
    return ~grown


def test_a_bulk_job_of_eight_seeds_shows_progress_and_eight_results(driver, base_url):
    open_page(driver, base_url, KEY)
    known = known_jobs(driver)
    fill(driver, model="shapes", prompt="a green square on a white background", steps=40,
          scheduler="ddim", width=64, height=64, bulk_seed_from=0, bulk_seed_to=7)  # fmt: skip
    by_id(driver, "bulk-submit").click()
    wait_for(lambda: len(job_rows(driver, known)) == 8, 30, what="8 job rows")
    partway, deadline = set(), time.monotonic() + 120
    while time.monotonic() < deadline:
        rows = job_rows(driver, known)
        states = [r.get_attribute("data-state") for r in rows]
        partway |= {r.find_element(By.CSS_SELECTOR, ".job-steps").text for r in rows
                    if r.get_attribute("data-state") == "RUNNING"}  # fmt: skip
        if all(s == "SUCCEEDED" for s in states) and all(
            r.find_elements(By.CSS_SELECTOR, ".job-images img") for r in rows
        ):
            break
        time.sleep(0.05)
    assert states == ["SUCCEEDED"] * 8, states
    assert any(s and not s.startswith(("0/", "40/")) for s in partway), partway
    thumbnails = [img for row in job_rows(driver, known)
                  for img in row.find_elements(By.CSS_SELECTOR, ".job-images img")]  # fmt: skip
    assert len(thumbnails) == 8
    seeds = sorted(_seed(data_url_bytes(img.get_attribute("src"))) for img in thumbnails)
    assert seeds == list(range(8))
    thumbnails[0].click()  # into the gallery, with its parameters
    params = wait_for(lambda: cards(driver), what="the job's image in the gallery")[0].text
    assert "a green square on a white background" in params and "Steps: 40" in params


def _seed(png: bytes) -> int:
    return int(Image.open(io.BytesIO(png)).text["parameters"].split("Seed: ")[1].split(",")[0])


def test_a_cancelled_job_shows_cancelled(driver, base_url):
    open_page(driver, base_url, KEY)
    known = known_jobs(driver)
    fill(driver, model="default", prompt="a job to cancel", steps=150, width=512, height=512,
          bulk_prompts="a job to cancel", bulk_seed_from="", bulk_seed_to="")  # fmt: skip
    by_id(driver, "bulk-submit").click()
    (row,) = wait_for(lambda: job_rows(driver, known), 30, what="the job's row")
    row.find_element(By.CSS_SELECTOR, ".job-cancel").click()
    wait_for(lambda: row.get_attribute("data-state") == "CANCELLED", 30, what="CANCELLED")
    assert row.find_element(By.CSS_SELECTOR, ".job-state").text == "CANCELLED"
    assert not row.find_element(By.CSS_SELECTOR, ".job-cancel").is_displayed()


def test_a_screenshot_mid_generation(driver, base_url, tmp_path):
    """The README's picture: two images in the gallery, then a long generation with its
    partial images streaming and the progress bar partway. SDSERVE_PLAYGROUND_SCREENSHOT names
    where to keep it."""
    open_page(driver, base_url, KEY)
    for seed, prompt in enumerate(("a green square on a white background",
                                   "a large white circle on a red background")):  # fmt: skip
        fill(driver, model="shapes", prompt=prompt, steps=25, scheduler="ddim", seed=seed)
        generate(driver)
    fill(driver, prompt="a yellow triangle on a purple background", steps=150, seed=3)
    by_id(driver, "generate").click()
    wait_for(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#partials img")) >= 3, 60,
             what="three partial images")  # fmt: skip
    out = Path(os.environ.get("SDSERVE_PLAYGROUND_SCREENSHOT") or tmp_path / "playground.png")
    assert driver.save_screenshot(str(out))
    assert by_id(driver, "cancel").is_enabled()  # still generating after the shot
    by_id(driver, "cancel").click()
    assert Image.open(out).size[0] >= 1000
