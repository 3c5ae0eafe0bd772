"""The page of ``hrnetdet serve`` in a real browser: headless Chromium (the system's, driven by
Playwright) against a real server on loopback, with an API key so the page must ask for it. The page
lists what the API answers, its slider filters without a new request, it fits a phone's width, and
its COCO RLE decoder paints exactly pycocotools' pixels."""
import json
import os
import shutil
import urllib.request
import uuid

import numpy as np
import pytest
import torch
from PIL import Image

CHROMIUM = os.environ.get("HRNETDET_CHROMIUM", "/usr/bin/chromium")
if not shutil.which(CHROMIUM):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed (pip install playwright)")

from test_serve import KEY, Server  # noqa: E402  (skips without the serve extra)

ARCH = "mask_rcnn_hrnetv2p_w18"
CATEGORIES = ["__background__", "circle", "square", "triangle"]
SMALL = dict(num_classes=len(CATEGORIES), categories=CATEGORIES, min_size=96, max_size=128,
             rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100, box_detections_per_img=12)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory, rgb):
    path = tmp_path_factory.mktemp("images") / "blocks.png"
    Image.fromarray(rgb).save(path)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, rgb):
    """A calibrated W18 Mask R-CNN (seeded weights; 12 detections with masks on the test image,
    its class logits sharpened so that their scores spread over 0.4-0.8 as a trained model's do) served
    by ``hrnetdet serve`` with an API key, in test_serve's subprocess on 127.0.0.1; stopped at the end."""
    import hrnetdet
    from calibrate import calibrate
    from hrnetdet.inference import load_image
    from hrnetdet.zoo.checkpoint import save_pretrained

    torch.manual_seed(0)
    model = calibrate(hrnetdet.create_model(ARCH, **SMALL), [load_image(rgb)])
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight *= 25
        model.roi_heads.box_predictor.cls_score.bias *= 25
    folder = tmp_path_factory.mktemp("served")
    save_pretrained(model, str(folder))
    server = Server(str(folder), str(tmp_path_factory.mktemp("logs") / "server.log"), "--api-key", KEY)
    server.wait_until_up()
    yield server.url
    server.stop()


def _post_image(url: str, path) -> dict:
    """The API's answer to a multipart upload, as the page sends it."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{os.path.basename(path)}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + open(path, "rb").read() + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url + "/predict", data=body, method="POST", headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}", "X-API-Key": KEY})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser):
    """A fresh page; any script error on it fails the test."""
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, errors


def _rows(page):
    return page.eval_on_selector_all("tbody tr", "rows => rows.map(r => [r.dataset.label, Number(r.dataset.score)])")


def _canvas_pixels(page):
    return page.eval_on_selector("canvas", "c => c.toDataURL()")


def test_the_page_asks_for_the_key_then_draws_and_lists_the_api_detections(server, page, image_path, tmp_path):
    expected = _post_image(server, image_path)
    detections = expected["detections"]
    scores = [d["score"] for d in detections]
    assert len(detections) >= 4 and len(set(scores)) >= 2 and all("mask" in d for d in detections)

    page.goto(server + "/")
    page.wait_for_selector("#key-form:not([hidden])")  # /info answered 401: the page asks
    page.fill("#key-input", KEY)
    page.click("#key-form button[type=submit]")
    page.wait_for_function(f"document.getElementById('model').textContent.includes({ARCH!r})")

    page.set_input_files("#files", str(image_path))
    page.wait_for_selector("article.result[data-state=done]", timeout=60_000)
    page.fill("#score", "0")  # everything the server sent
    page.wait_for_function(f"document.querySelectorAll('tbody tr').length === {len(detections)}")
    rows = _rows(page)
    assert [label for label, _ in rows] == [d["label"] for d in detections]
    np.testing.assert_allclose([score for _, score in rows], scores, atol=1e-5)
    page.screenshot(path=str(tmp_path / "all.png"), full_page=True)

    before = _canvas_pixels(page)
    cut = round(float(np.median(scores)), 2)  # on the slider's 0.01 steps
    kept = sum(s >= cut for s in scores)
    assert 0 < kept < len(detections)
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    page.fill("#score", str(cut))
    page.wait_for_function(f"document.querySelectorAll('tbody tr').length === {kept}")
    assert [score for _, score in _rows(page)] == pytest.approx([s for s in scores if s >= cut], abs=1e-5)
    assert _canvas_pixels(page) != before  # the drawing follows the slider
    assert requests == []  # filtered in the page, not asked again
    page.screenshot(path=str(tmp_path / "filtered.png"), full_page=True)
    assert (tmp_path / "filtered.png").stat().st_size > 10_000

    with page.expect_download() as download:
        page.click("#download")
    saved = json.loads(open(download.value.path()).read())
    assert saved == [{"file": image_path.name, **expected}]

    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a picture")
    page.set_input_files("#files", str(not_an_image))
    page.wait_for_selector("article.result[data-state=error]")
    message = page.inner_text("article.result[data-state=error] .error")
    assert message.startswith("400: ") and "image" in message  # the server's one line, shown on its card

    page.reload()  # the key is kept for the session: no second prompt
    page.wait_for_function(f"document.getElementById('model').textContent.includes({ARCH!r})")
    assert page.is_hidden("#key-form")


def test_the_page_fits_a_phone(server, page, image_path, tmp_path):
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(server + "/")
    page.evaluate(f"sessionStorage.setItem('hrnetdet.apiKey', {KEY!r})")
    page.reload()
    page.set_input_files("#files", str(image_path))
    page.wait_for_selector("article.result[data-state=done]", timeout=60_000)
    sizes = page.evaluate("""() => ({page: document.documentElement.scrollWidth,
                                     canvas: document.querySelector('canvas').getBoundingClientRect().width,
                                     font: parseFloat(getComputedStyle(document.querySelector('td')).fontSize)})""")
    assert sizes["page"] <= 390  # nothing wider than the screen: the table scrolls inside its box
    assert 300 <= sizes["canvas"] <= 390  # the image takes the screen's width
    assert sizes["font"] >= 12
    page.screenshot(path=str(tmp_path / "phone.png"), full_page=True)


def test_the_page_decodes_coco_rle_as_pycocotools(server, page):
    """The page's decoder on masks whose run lengths need one to five 5-bit groups, negative
    differences and runs up to the image's edge: the same pixels as pycocotools encoded."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(0)
    masks = [np.zeros((7, 5), np.uint8), np.ones((9, 4), np.uint8),
             (rng.random((61, 47)) < 0.5).astype(np.uint8)]
    blob = np.zeros((300, 420), np.uint8)
    blob[40:260, 30:400] = 1
    blob[100:120, 50:60] = 0
    tail = np.zeros((800, 1000), np.uint8)
    tail[:, 950:] = 1  # a first run of 760,000 pixels: five 5-bit groups
    masks += [blob, tail]
    page.goto(server + "/")
    for mask in masks:
        rle = mask_utils.encode(np.asfortranarray(mask))
        h, w = mask.shape
        painted = page.evaluate("""([text, h, w]) => {
            const data = new Uint8ClampedArray(w * h * 4);
            paintMask(data, w, h, rleCounts(text), [1, 2, 3]);
            return Array.from(data.filter((_, i) => i % 4 === 3), (a) => (a ? "1" : "0")).join("");
        }""", [rle["counts"].decode("ascii"), h, w])
        np.testing.assert_array_equal(np.frombuffer(painted.encode(), np.uint8).reshape(h, w) - ord("0"), mask)
