"""The diffusion transformers served by the session's app: "sd3" (its T5 in a TextEncoderT5
deployment of its own) and "flux" (T5 in its TextEncoder), neither with a VaeEncoder."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from sdserve.v1 import diffusion_pb2

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("model", ["sd3", "flux"])
def test_generate_returns_a_png_of_the_requested_size(stub, model):
    request = diffusion_pb2.GenerateRequest(prompt="a red circle", negative_prompt="blurry",
                                            steps=3, seed=1, width=64, height=32,
                                            model=model)  # fmt: skip
    reply = stub.Generate(request, timeout=120)
    (image,) = reply.images
    assert image.png.startswith(b"\x89PNG")
    assert Image.open(io.BytesIO(image.png)).size == (64, 32)
    assert reply.parameters.model == model


def test_list_models_shows_the_transformer_families(stub):
    reply = stub.ListModels(diffusion_pb2.ListModelsRequest(), timeout=30)
    families = {m.name: m.family for m in reply.models}
    assert (families["sd3"], families["flux"]) == ("sd3", "flux")
