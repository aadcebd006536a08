"""ControlNet requests (`GenerateRequest.controls`): validation answers each bad input by its
field, the Canny preprocessor, the control images the request path prepares, and a controlled
request through the request path over the in-process stage client (the tiny model's random
`edges` and `depth` nets)."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from sdserve.api.proto import control_from_pb, controls_to_pb, fields_from_pb, params_to_pb
from sdserve.api.types import ControlFields, GenerateFields
from sdserve.api.validate import check_controls, validate_fields
from sdserve.config import DefaultsConfig, LimitsConfig
from sdserve.errors import InvalidArgument
from sdserve.pipeline.control_images import canny, control_pixels, from_pixels

LIMITS = LimitsConfig()


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _square(size: int = 64) -> Image.Image:
    """A white square on black: a shape whose only edges are its outline."""
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    return Image.fromarray(pixels)


SQUARE = _png(_square())


def _refused(controls, limits=LIMITS) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        check_controls(tuple(controls), limits)
    return caught.value


@pytest.mark.parametrize(
    ("control", "field", "says"),
    [
        (ControlFields("edges", b""), "controls[0].image", "required"),
        (ControlFields("edges", b"not an image"), "controls[0].image", "cannot be decoded"),
        (ControlFields("edges", SQUARE[:60]), "controls[0].image", "cannot be decoded"),
        (ControlFields("no/such", SQUARE), "controls[0].name", "not a ControlNet name"),
        (ControlFields("edges", SQUARE, scale=2.5), "controls[0].scale", "within 0..2"),
        (ControlFields("edges", SQUARE, scale=-0.1), "controls[0].scale", "within 0..2"),
        (ControlFields("edges", SQUARE, start=1.0), "controls[0].start", "[0, 1)"),
        (ControlFields("edges", SQUARE, start=0.5, end=0.5), "controls[0].end", "(start, 1]"),
        (ControlFields("edges", SQUARE, end=1.5), "controls[0].end", "(start, 1]"),
        (ControlFields("edges", SQUARE, preprocess="depth"), "controls[0].preprocess", "canny"),
        (ControlFields("edges", SQUARE, preprocess="canny", canny_low=300, canny_high=200),
         "controls[0].canny_low", "above canny_high"),
        (ControlFields("edges", SQUARE, canny_high=2000), "controls[0].canny_high", "0..1000"),
    ],
)  # fmt: skip
def test_a_bad_control_is_refused_by_its_field(control, field, says):
    error = _refused([ControlFields("depth", SQUARE), control])
    assert error.field == field.replace("[0]", "[1]")
    assert says in error.reason


def test_too_many_controls_and_oversized_images_are_refused():
    error = _refused([ControlFields("edges", SQUARE)] * 5)
    assert error.field == "controls" and error.reason.startswith("at most 4 ControlNets")
    small = LIMITS.model_copy(update={"max_image_bytes": 1024, "max_pixels": 32 * 32})
    big = _png(Image.effect_noise((64, 64), 50).convert("RGB"))
    assert "max_image_bytes" in _refused([ControlFields("edges", big)], small).reason
    error = _refused([ControlFields("edges", SQUARE)], small.model_copy(
        update={"max_image_bytes": 2**20}))  # fmt: skip
    assert error.field == "controls[0].image" and "over the budget" in error.reason


def test_defaults_fill_in_and_survive_the_stored_request():
    """Unset fields take their defaults; a job's stored request (`params_to_pb`) validates back
    to the same entries (float32 fields as the client wrote them)."""
    depth = ControlFields("depth", SQUARE, scale=0.7, start=0.1, end=0.9, guess_mode=True,
                          preprocess="canny", canny_low=50)  # fmt: skip
    fields = GenerateFields(prompt="a square", controls=(ControlFields("edges", SQUARE), depth))
    kwargs = dict(limits=LIMITS, defaults=DefaultsConfig(), native_size=(64, 64))
    params = validate_fields(fields, **kwargs)
    first, second = params.controls
    assert (first.scale, first.start, first.end, first.preprocess) == (1.0, 0.0, 1.0, "")
    assert (second.scale, second.start, second.end, second.guess_mode) == (0.7, 0.1, 0.9, True)
    assert (second.canny_low, second.canny_high) == (50.0, 200.0)
    again = validate_fields(fields_from_pb(params_to_pb(params)), **kwargs)
    assert again.controls == params.controls
    assert "ControlNet: edges:1:0:1 depth:0.7:0.1:0.9" in params.png_parameters(params.seed)
    assert control_from_pb(controls_to_pb(params.controls, images=False)[0]).image == b""


def test_canny_finds_the_outline_only():
    edges = np.asarray(canny(_square()))
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    assert (edges[..., 0] == edges[..., 2]).all()
    assert edges[32, 32].tolist() == [0, 0, 0] and edges[2, 2].tolist() == [0, 0, 0]
    assert edges[16:48, 15:17].any()  # the square's left side
    faint = Image.fromarray(np.asarray(_square()) // 16)  # a step of 15 grey levels
    assert not np.asarray(canny(faint)).any() and np.asarray(canny(faint, 10, 20)).any()


def test_control_pixels_preprocess_and_resize():
    """What the Denoiser gets: RGB uint8 at the output size; Canny first when asked."""
    plain = from_pixels(control_pixels(SQUARE, 32, 48), 32, 48)
    assert plain.size == (32, 48)
    assert np.asarray(plain)[24, 16].tolist() == [255, 255, 255]
    edges = np.asarray(from_pixels(control_pixels(SQUARE, 64, 64, "canny"), 64, 64))
    assert np.array_equal(edges, np.asarray(canny(_square())))
    with pytest.raises(ValueError, match="unknown preprocess"):
        control_pixels(SQUARE, 64, 64, "sketch")


@pytest.fixture(scope="module")
def path(in_process_path):
    return in_process_path


def _run(path, **fields):
    async def main():
        params = await path.validate(GenerateFields(prompt="a square", width=64, height=64,
                                                    steps=3, seed=7, **fields))  # fmt: skip
        return [event async for event in path.run(params)][-1]

    result = asyncio.run(main())
    return np.asarray(Image.open(io.BytesIO(result.pngs[0])).convert("RGB")).astype(int)


def test_a_control_steers_the_image_through_the_request_path(path):
    plain = _run(path)
    edges = _run(path, controls=(ControlFields("edges", SQUARE),))
    assert np.abs(edges - plain).max() > 10
    both = _run(path, controls=(ControlFields("edges", SQUARE),
                                ControlFields("depth", SQUARE, scale=0.5)))  # fmt: skip
    assert np.abs(both - edges).max() > 10
    off = _run(path, controls=(ControlFields("edges", SQUARE, scale=0.0),))
    assert np.abs(off - plain).max() <= 2
    nets = {n.name: n for n in asyncio.run(path.controlnets())[1]}
    assert set(nets) == {"edges", "depth"} and nets["edges"].loaded and not nets["edges"].misfit


def test_an_unknown_controlnet_lists_the_served_ones(path):
    with pytest.raises(InvalidArgument) as caught:
        _run(path, controls=(ControlFields("edges", SQUARE), ControlFields("pose", SQUARE)))
    assert caught.value.field == "controls[1].name"
    assert "'pose'" in caught.value.reason and "depth, edges" in caught.value.reason


# --- The edges: the CLI's --control, the HTTP body, the Python client ---------------------


def test_the_cli_control_option(tmp_path):
    from sdserve.cli import build_parser
    from sdserve.cli.options import request_options

    image = tmp_path / "a:b.png"  # a colon in the path: numbers are read from the right
    image.write_bytes(SQUARE)
    args = build_parser().parse_args([
        "generate", "a square", "--control", f"edges={image}", "--control",
        f"depth={image}:0.5:0.1:0.8", "--control-preprocess", "canny", "--control-guess-mode",
    ])  # fmt: skip
    edges, depth = request_options(args)["controls"]
    assert (edges.name, edges.image, edges.scale, edges.start, edges.end) == (
        "edges", SQUARE, None, None, None)  # fmt: skip
    assert (depth.scale, depth.start, depth.end) == (0.5, 0.1, 0.8)
    assert edges.preprocess == depth.preprocess == "canny" and depth.guess_mode
    assert request_options(build_parser().parse_args(["generate", "x"]))["controls"] is None
    for bad in ("edges", f"={image}", f"edges={image}:0.5:0.1", "edges=/no/such.png"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["generate", "x", "--control", bad])


def test_the_http_body_carries_controls_and_names_bad_fields():
    import base64

    from sdserve.http.openai_images import generation_body, parse_generation

    image = base64.b64encode(SQUARE).decode()
    body = {"prompt": "a square", "controls": [
        {"name": "edges", "image": image},
        {"name": "depth", "image": image, "scale": 0.5, "start": 0.25, "end": 1,
         "guess_mode": True, "preprocess": "canny", "canny_low": 50}]}  # fmt: skip
    request = parse_generation(body).request
    assert [c.name for c in request.controls] == ["edges", "depth"]
    assert request.controls[0].image == SQUARE and not request.controls[0].HasField("scale")
    assert request.controls[1].guess_mode and request.controls[1].canny_low == 50
    assert parse_generation(generation_body(request)).request == request
    for controls, field in (
        ("edges", "controls"),
        ([{"name": "edges"}], "controls[0]"),
        ([{"name": "edges", "image": "%%%"}], "controls[0].image"),
        ([{"name": "edges", "image": image, "scale": "big"}], "controls[0].scale"),
        ([{"name": "edges", "image": image, "guess_mode": 1}], "controls[0].guess_mode"),
        ([{"name": "edges", "image": image, "weight": 1}], "controls[0].weight"),
    ):
        with pytest.raises(InvalidArgument) as caught:
            parse_generation({"prompt": "x", "controls": controls})
        assert caught.value.field == field


def test_the_client_sends_controls(tmp_path):
    from sdserve.client import Control
    from sdserve.client._calls import generate_request

    (tmp_path / "c.png").write_bytes(SQUARE)
    request = generate_request("x", {"controls": [
        Control("edges", tmp_path / "c.png", scale=0.5), {"name": "depth", "image": _square(),
                                                          "preprocess": "canny"}]})  # fmt: skip
    edges, depth = request.controls
    assert edges.image == SQUARE and edges.scale == 0.5 and not edges.HasField("start")
    assert Image.open(io.BytesIO(depth.image)).size == (64, 64) and depth.preprocess == "canny"


def test_the_loadtest_conditions_every_kth_request(tmp_path):
    from sdserve.cli import build_parser
    from sdserve.cli.options import controls
    from sdserve.client._calls import control_pb
    from sdserve.loadtest import Mix

    (tmp_path / "c.png").write_bytes(SQUARE)
    args = build_parser().parse_args(["loadtest", "--control", f"edges={tmp_path / 'c.png'}:0.5",
                                      "--control-every", "2"])  # fmt: skip
    mix = Mix(controls=tuple(map(control_pb, controls(args))), control_every=args.control_every)
    assert [len(mix.request(i).controls) for i in range(4)] == [1, 0, 1, 0]
    assert mix.request(0).controls[0].scale == 0.5 and mix.request(0).controls[0].image == SQUARE


def test_the_net_cache_evicts_the_least_recent_free_net():
    """Within its bound, the least recently used net goes first; a net a live request holds
    stays even above the bound, until that request is gone."""
    import gc

    import torch

    from sdserve.pipeline.held_cache import hold_while_alive
    from sdserve.stages.controlnets import NetCache, nbytes

    nets = {name: torch.nn.Linear(16, 16) for name in "abcd"}
    cache = NetCache(max_bytes=2 * nbytes(nets["a"]))
    loads = []

    def get(name):
        return cache.get(name, lambda: loads.append(name) or nets[name])

    get("a"), get("b"), get("a")  # b is now the least recent
    get("c")
    assert cache.names() == ["a", "c"] and loads == ["a", "b", "c"]

    class Job:
        pass

    job = Job()
    hold_while_alive(job, [nets["a"], nets["c"]])
    get("b")  # over the bound: both others are held
    assert cache.names() == ["a", "c", "b"]
    del job
    gc.collect()
    get("d")  # the released a and c go, least recent first
    assert cache.names() == ["b", "d"] and loads == ["a", "b", "c", "b", "d"]
