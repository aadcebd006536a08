"""The built-in default model follows its prompts through the running services (issue 6).

The session's server serves it as the model "shapes", beside the tiny model and a tiny SDXL
(requests pick it with `GenerateRequest.model`). Eight prompts go in at once, so that the
Denoiser batches them: an image that shows another prompt's colors means embeddings were mixed
up.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from helpers import sdserve_cli
from PIL import Image

from sdserve.shapes.adherence import background_color, foreground_color
from sdserve.shapes.synthetic import Caption
from sdserve.v1 import diffusion_pb2

pytestmark = pytest.mark.integration

MODEL = "shapes"
# Every color is once a foreground and once a background; shapes and size words vary.
CAPTIONS = [
    Caption("red", "circle", "blue"),
    Caption("green", "square", "white", "large"),
    Caption("blue", "triangle", "yellow"),
    Caption("yellow", "circle", "purple", "small"),
    Caption("purple", "square", "orange"),
    Caption("orange", "triangle", "black", "large"),
    Caption("white", "circle", "red"),
    Caption("black", "square", "green"),
]


def test_eight_concurrent_prompts_get_their_own_colors(stub):
    futures = [
        stub.Generate.future(
            diffusion_pb2.GenerateRequest(
                prompt=caption.prompt,
                steps=25,
                scheduler="ddim",
                seed=i,
                width=64,
                height=64,
                model=MODEL,
            ),
            timeout=60,
        )
        for i, caption in enumerate(CAPTIONS)
    ]
    seen = []
    for future in futures:
        (image,) = future.result(timeout=60).images
        picture = Image.open(io.BytesIO(image.png))
        seen.append((foreground_color(picture), background_color(picture)))
    wanted = [(c.color, c.background) for c in CAPTIONS]
    # The model card's accuracy is about 95% or more per color; allow one miss of each.
    assert sum(s[0] == w[0] for s, w in zip(seen, wanted, strict=True)) >= 7, (seen, wanted)
    assert sum(s[1] == w[1] for s, w in zip(seen, wanted, strict=True)) >= 7, (seen, wanted)


def test_image_to_image_and_inpainting_follow_the_new_prompt(stub, tmp_path):
    """The demo of docs/image-inputs.md: a red circle repainted green (image-to-image, strength
    0.75), then its background alone repainted yellow (inpainting with the checker's background
    mask), judged by `sdserve check-image`."""

    def generate(prompt: str, **fields) -> Path:
        request = diffusion_pb2.GenerateRequest(prompt=prompt, seed=0, model=MODEL, **fields)
        (image,) = stub.Generate(request, timeout=60).images
        out = tmp_path / f"{len(list(tmp_path.iterdir()))}.png"
        out.write_bytes(image.png)
        return out

    red = generate("a red circle on a blue background")
    mask = tmp_path / "background.png"
    check = sdserve_cli("check-image", str(red), "a red circle on a blue background",
                        "--background-mask", str(mask))  # fmt: skip
    assert check.returncode == 0, check.stdout

    green = generate("a green circle on a blue background", init_image=red.read_bytes(),
                     strength=0.75)  # fmt: skip
    check = sdserve_cli("check-image", str(green), "a green circle on a blue background")
    assert "foreground color: green (as prompted)" in check.stdout, check.stdout
    assert "background color: blue (as prompted)" in check.stdout, check.stdout

    yellow = generate("a red circle on a yellow background", init_image=red.read_bytes(),
                      mask_image=mask.read_bytes(), strength=1.0)  # fmt: skip
    check = sdserve_cli("check-image", str(yellow), "a red circle on a yellow background")
    assert "foreground color: red (as prompted)" in check.stdout, check.stdout
    assert "background color: yellow (as prompted)" in check.stdout, check.stdout
