"""What the service needs in production, feature by feature: the API key, CORS, /docs, the request timeout, the
concurrency bound, the pixel limit, the access log, /metrics, the settings' way to the workers and the CLI, and the
bounded decoder's parity with `predict`."""

from __future__ import annotations

import io
import json
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from resnetlab.data.preprocessing import Preprocessing, load_image, pil_to_uint8, resize_to_input
from resnetlab.deployment import decode
from resnetlab.deployment.export_cache import cached_export
from resnetlab.deployment.predictor import load_predictor
from resnetlab.deployment.service_settings import ENVIRONMENT_PREFIX, ServiceSettings
from resnetlab.errors import ConfigError
from tests.test_deploy_export import tiny_checkpoint  # noqa: F401  (the shared trained model)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's TestClient warns that it will move to httpx2
    from fastapi.testclient import TestClient

from resnetlab.deployment.service import ACCESS_LOGGER, create_app  # noqa: E402

KEY = "s3cret-key_1"


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint):  # noqa: F811
    return load_predictor(cached_export(tiny_checkpoint))


@pytest.fixture(scope="module")
def sign_file(tiny_signs):
    return sorted((tiny_signs / "Test").glob("*.png"))[0]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _post(client, path, data: bytes, name: str = "sign.png", **kwargs):
    return client.post(path, files={"file": (name, data, "image/png")}, **kwargs)


def _metrics(client, **kwargs) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics", **kwargs)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


class SlowPredictor:
    """The real predictor whose model call takes ``seconds`` (and counts its calls): a stand-in for a slow model."""

    def __init__(self, inner, seconds: float):
        self._inner, self.seconds, self.calls = inner, seconds, 0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def predict_tensors(self, *args, **kwargs):
        self.calls += 1
        time.sleep(self.seconds)
        return self._inner.predict_tensors(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# The API key
# ---------------------------------------------------------------------------------------------------------------


def test_an_api_key_guards_predict_model_and_metrics_but_not_health_or_the_page(predictor, sign_file):
    data = sign_file.read_bytes()
    client = TestClient(create_app(predictor, api_key=KEY))
    for response in (_post(client, "/predict", data), client.get("/model"), client.get("/metrics"),
                     _post(client, "/predict", data, headers={"Authorization": "Bearer wrong"}),
                     _post(client, "/predict", data, headers={"X-API-Key": KEY[:-1]}),
                     _post(client, "/predict", data, headers={"Authorization": f"Basic {KEY}"})):
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"] == "Bearer"
        assert "API key" in response.json()["detail"] and KEY not in response.text
    assert client.get("/health").status_code == 200
    assert client.get("/").status_code == 200 and 'id="key"' in client.get("/").text
    assert _post(client, "/predict", data, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert _post(client, "/predict", data, headers={"X-API-Key": KEY}).status_code == 200
    model = client.get("/model", headers={"X-API-Key": KEY}).json()
    assert model["api_key_required"] is True
    counts = _metrics(client, headers={"X-API-Key": KEY})
    assert counts[("resnetlab_rejected_requests_total", (("reason", "unauthorized"),))] == 6

    open_client = TestClient(create_app(predictor))  # no key: nothing is asked
    assert _post(open_client, "/predict", data).status_code == 200
    assert open_client.get("/model").json()["api_key_required"] is False


@pytest.mark.parametrize("key", ["", "has space", "naïve", "tab\there"])
def test_an_unusable_api_key_is_refused_with_one_line(key):
    with pytest.raises(ConfigError, match="API key"):
        ServiceSettings(api_key=key)


# ---------------------------------------------------------------------------------------------------------------
# CORS and /docs
# ---------------------------------------------------------------------------------------------------------------


def test_cors_is_off_by_default_and_on_only_for_the_named_origins(predictor):
    origin = "https://app.example.org"
    preflight = {"Origin": origin, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization"}
    closed = TestClient(create_app(predictor))
    assert "access-control-allow-origin" not in closed.get("/health", headers={"Origin": origin}).headers
    assert "access-control-allow-origin" not in closed.options("/predict", headers=preflight).headers

    opened = TestClient(create_app(predictor, cors_origins=(origin, "http://localhost:3000")))
    assert opened.get("/health", headers={"Origin": origin}).headers["access-control-allow-origin"] == origin
    answer = opened.options("/predict", headers=preflight)
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == origin
    assert "authorization" in answer.headers["access-control-allow-headers"].lower()
    other = opened.get("/health", headers={"Origin": "https://evil.example.com"})
    assert "access-control-allow-origin" not in other.headers
    with pytest.raises(ConfigError, match="--cors-origin"):
        ServiceSettings(cors_origins=("app.example.org",))


def test_docs_and_openapi_are_off_unless_asked_for(predictor):
    paths = ("/docs", "/redoc", "/openapi.json")
    closed = TestClient(create_app(predictor))
    assert [closed.get(path).status_code for path in paths] == [404, 404, 404]
    opened = TestClient(create_app(predictor, docs=True))
    assert [opened.get(path).status_code for path in paths] == [200, 200, 200]
    assert "/predict" in opened.get("/openapi.json").json()["paths"]


# ---------------------------------------------------------------------------------------------------------------
# Bounded work: the timeout and the queue
# ---------------------------------------------------------------------------------------------------------------


def test_a_request_over_the_timeout_gets_504_and_its_slot_back(predictor, sign_file):
    data = sign_file.read_bytes()
    slow = SlowPredictor(predictor, seconds=1.5)
    with TestClient(create_app(slow, request_timeout=0.3, max_concurrency=1, max_queue=1)) as client:
        began = time.monotonic()
        response = _post(client, "/predict", data)
        assert response.status_code == 504 and "--request-timeout" in response.json()["detail"]
        assert time.monotonic() - began < 1.2  # answered at the deadline, not when the model finished
        # the slot is held until the model call really ends, then freed
        deadline = time.monotonic() + 10
        while _metrics(client)[("resnetlab_predictions_running", ())] and time.monotonic() < deadline:
            time.sleep(0.05)
        counts = _metrics(client)
        assert counts[("resnetlab_predictions_running", ())] == 0
        assert counts[("resnetlab_predictions_queued", ())] == 0
        assert counts[("resnetlab_rejected_requests_total", (("reason", "timeout"),))] == 1
        slow.seconds = 0
        assert _post(client, "/predict", data).status_code == 200


def test_a_queued_request_that_times_out_never_runs(predictor, sign_file):
    data = sign_file.read_bytes()
    slow = SlowPredictor(predictor, seconds=1.5)
    with TestClient(create_app(slow, request_timeout=0.5, max_concurrency=1, max_queue=1)) as client:
        results = {}
        first = threading.Thread(target=lambda: results.setdefault("first", _post(client, "/predict", data)))
        first.start()
        while slow.calls == 0:
            time.sleep(0.01)
        queued = _post(client, "/predict", data)  # waits behind the first, then times out in the queue
        first.join()
        assert queued.status_code == 504 and results["first"].status_code == 504
        time.sleep(1.6)
        assert slow.calls == 1


def test_a_full_queue_answers_503_with_retry_after_at_once(predictor, sign_file):
    data = sign_file.read_bytes()
    slow = SlowPredictor(predictor, seconds=1.0)
    with TestClient(create_app(slow, max_concurrency=1, max_queue=0)) as client:
        results = {}
        first = threading.Thread(target=lambda: results.setdefault("first", _post(client, "/predict", data)))
        first.start()
        while slow.calls == 0:
            time.sleep(0.01)
        began = time.monotonic()
        busy = _post(client, "/predict", data)
        assert time.monotonic() - began < 0.5
        first.join()
        assert results["first"].status_code == 200
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert "busy" in busy.json()["detail"]
        assert _metrics(client)[("resnetlab_rejected_requests_total", (("reason", "busy"),))] == 1
        assert _post(client, "/predict", data).status_code == 200  # the slot is free again


# ---------------------------------------------------------------------------------------------------------------
# The pixel limit and the bounded decoder
# ---------------------------------------------------------------------------------------------------------------


def test_an_image_over_the_pixel_limit_is_refused_before_decoding(predictor, monkeypatch):
    def must_not_decode(*args, **kwargs):
        raise AssertionError("decoded an image over the pixel limit")

    monkeypatch.setattr(decode, "load_image", must_not_decode)
    monkeypatch.setattr(decode, "_decode_large", must_not_decode)
    client = TestClient(create_app(predictor, max_image_pixels=1_000_000))
    response = _post(client, "/predict", _png(Image.new("L", (1001, 1000))), name="wide.png")
    assert response.status_code == 413
    detail = response.json()["detail"]
    assert "wide.png" in detail and "1001x1000" in detail and "--max-image-pixels" in detail
    assert client.get("/model").json()["limits"]["max_pixels"] == 1_000_000
    assert _metrics(client)[("resnetlab_rejected_requests_total", (("reason", "too_many_pixels"),))] == 1
    # the default limit refuses the 8000 x 7999 PNG, which Pillow's own limit lets through
    assert _post(TestClient(create_app(predictor)), "/predict", _png(Image.new("1", (8000, 7999)))).status_code == 413
    with pytest.raises(ConfigError, match="--max-image-pixels"):
        ServiceSettings(max_image_pixels=Image.MAX_IMAGE_PIXELS + 1)


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour fields with fine noise: something like a photo, at any size."""
    rng = np.random.default_rng(seed)
    fields = Image.fromarray(rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    noise = rng.integers(-12, 13, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(fields, dtype=np.int16) + noise, 0, 255).astype(np.uint8))


def test_ordinary_images_get_exactly_what_predict_computes(predictor, sign_file, tmp_path):
    jpeg = tmp_path / "photo.jpg"
    _photo(640, 480).save(jpeg, quality=90)
    client = TestClient(create_app(predictor))
    for path in (sign_file, jpeg):
        decoded = decode.decode_upload(path.read_bytes(), path.name, predictor.prep)
        assert not decoded.large
        tensor = pil_to_uint8(resize_to_input(decoded.image, predictor.prep))
        assert torch.equal(tensor, predictor.prepare(path))
        expected = predictor.predict_paths([str(path)], topk=5)[0]
        served = _post(client, "/predict", path.read_bytes(), name=path.name).json()["predictions"][0]
        assert [t["index"] for t in served["top"]] == expected.indices
        np.testing.assert_allclose([t["confidence"] for t in served["top"]], expected.confidences, atol=1e-6)


@pytest.mark.parametrize("prep", [Preprocessing(32), Preprocessing(224, resize="shorter_crop"),
                                  Preprocessing(64, contrast="autocontrast")], ids=["squash32", "crop224", "contrast"])
def test_large_images_decode_without_copies_and_a_large_jpeg_at_reduced_scale(prep):
    photo = _photo(2600, 1800)  # 4.7 MP: over decode.LARGE_IMAGE_PIXELS
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees by the camera
    buffers = {}
    for fmt in ("PNG", "JPEG"):
        buffers[fmt] = io.BytesIO()
        photo.save(buffers[fmt], fmt, quality=92, exif=exif.tobytes())
    for fmt, buffer in buffers.items():
        data = buffer.getvalue()
        decoded = decode.decode_upload(data, f"big.{fmt.lower()}", prep)
        exact = load_image(decode._NamedBytes(data, "x"), None, roi_crop=False)
        assert decoded.large and (decoded.width, decoded.height) == exact.size == (1800, 2600)
        ours, theirs = (pil_to_uint8(resize_to_input(image, prep)).int() for image in (decoded.image, exact))
        if fmt == "PNG":  # no reduced decode exists: the same pixels, one buffer
            assert decoded.image.size == exact.size and torch.equal(ours, theirs)
        else:  # DCT scaling to no less than twice the resize target, then the same resize
            assert min(decoded.image.size) >= decode.DRAFT_MARGIN * decode.resize_target(prep)
            assert decoded.image.width * decoded.image.height * 4 <= exact.width * exact.height
            difference = (ours - theirs).abs().float()
            assert difference.mean() < 1.0 and difference.max() <= 6, (difference.mean(), difference.max())


def test_damaged_and_non_image_uploads_still_get_their_4xx(predictor):
    client = TestClient(create_app(predictor))
    photo = io.BytesIO()
    _photo(2600, 1800).save(photo, "JPEG")
    truncated = photo.getvalue()[: len(photo.getvalue()) // 3]
    response = _post(client, "/predict", truncated, name="cut.jpg")  # large: the reduced path
    assert response.status_code == 400 and "cut.jpg" in response.json()["detail"]
    assert _post(client, "/predict", b"not an image", name="x.txt").status_code == 415
    counts = _metrics(client)
    assert counts[("resnetlab_rejected_requests_total", (("reason", "bad_image"),))] == 2
    assert client.get("/health").status_code == 200


# ---------------------------------------------------------------------------------------------------------------
# Observability: the access log and /metrics
# ---------------------------------------------------------------------------------------------------------------


def test_each_request_leaves_one_json_access_log_line(predictor, sign_file, caplog):
    data = sign_file.read_bytes()
    client = TestClient(create_app(predictor, api_key=KEY))
    with caplog.at_level("INFO", logger=ACCESS_LOGGER):
        _post(client, "/predict?topk=3", data, headers={"X-API-Key": KEY})
        _post(client, "/predict", b"text", name="notes.txt", headers={"X-API-Key": KEY})
        client.get("/health")
    lines = [json.loads(record.getMessage()) for record in caplog.records if record.name == ACCESS_LOGGER]
    assert [(line["method"], line["path"], line["status"]) for line in lines] == \
        [("POST", "/predict", 200), ("POST", "/predict", 415), ("GET", "/health", 200)]
    first = lines[0]
    assert first["bytes_in"] > len(data) and first["bytes_out"] > 0 and first["latency_ms"] > 0
    assert first["client"] == "testclient"
    assert lines[1]["rejected"] == "bad_image" and "rejected" not in first
    text = " ".join(record.getMessage() for record in caplog.records)
    assert KEY not in text and "topk" not in text  # no headers, no query string, no image


def test_metrics_count_requests_latency_and_in_flight(predictor, sign_file):
    data = sign_file.read_bytes()
    client = TestClient(create_app(predictor))
    for _ in range(3):
        assert _post(client, "/predict", data).status_code == 200
    client.get("/no/such/page")
    client.get("/another/made-up/path")
    counts = _metrics(client)
    assert counts[("resnetlab_http_requests_total", (("path", "/predict"), ("status", "200")))] == 3
    assert counts[("resnetlab_http_requests_total", (("path", "other"), ("status", "404")))] == 2
    assert counts[("resnetlab_http_request_duration_seconds_count", (("path", "/predict"),))] == 3
    assert counts[("resnetlab_http_request_duration_seconds_bucket", (("le", "+Inf"), ("path", "/predict")))] == 3
    assert counts[("resnetlab_http_requests_in_flight", ())] == 1  # the /metrics request itself
    for reason in ("too_large", "too_many_pixels", "busy", "timeout", "unauthorized", "bad_image"):
        assert counts[("resnetlab_rejected_requests_total", (("reason", reason),))] == 0
    # each app has a registry of its own: a second one starts from zero
    assert _metrics(TestClient(create_app(predictor))).get(
        ("resnetlab_http_requests_total", (("path", "/predict"), ("status", "200")))) is None


def test_an_oversized_body_is_counted_as_too_large(predictor):
    client = TestClient(create_app(predictor, max_upload_bytes=1024))
    assert _post(client, "/predict", b"\0" * 4096).status_code == 413
    assert _metrics(client)[("resnetlab_rejected_requests_total", (("reason", "too_large"),))] == 1


# ---------------------------------------------------------------------------------------------------------------
# Settings: to the workers and from the command line
# ---------------------------------------------------------------------------------------------------------------


def test_settings_reach_each_worker_through_the_environment(tiny_checkpoint, predictor, sign_file, monkeypatch):  # noqa: F811
    from resnetlab.deployment.service import app_from_environment

    settings = ServiceSettings(max_upload_bytes=123456, max_files=3, max_image_pixels=2_000_000, max_concurrency=3,
                               max_queue=5, request_timeout=7.5, api_key=KEY, cors_origins=("https://a.example",),
                               docs=True)
    environment = settings.to_environment()
    assert ServiceSettings.from_environment(environment) == settings and settings.api_key == KEY
    assert KEY not in repr(settings)
    for key, value in {**environment, "SOURCE": str(predictor.artifact_dir), "BACKEND": "auto", "THREADS": "1",
                       "PRECISION": "auto"}.items():
        monkeypatch.setenv(key if key.startswith(ENVIRONMENT_PREFIX) else ENVIRONMENT_PREFIX + key, value)
    client = TestClient(app_from_environment())
    assert _post(client, "/predict", sign_file.read_bytes()).status_code == 401
    limits = client.get("/model", headers={"X-API-Key": KEY}).json()["limits"]
    assert limits == settings.limits()
    assert client.get("/docs").status_code == 200
    assert client.get("/health", headers={"Origin": "https://a.example"}).headers["access-control-allow-origin"]


def test_serve_flags_and_the_key_from_the_environment(monkeypatch, tiny_checkpoint, capsys):  # noqa: F811
    from resnetlab.cli.main import main
    from resnetlab.deployment import service

    seen = {}
    monkeypatch.setattr(service, "serve", lambda source, **kwargs: seen.update(kwargs))
    assert main(["serve", str(tiny_checkpoint), "--max-image-pixels", "1000000", "--max-concurrency", "3",
                 "--max-queue", "0", "--request-timeout", "2.5", "--cors-origin", "https://a.example",
                 "--cors-origin", "https://b.example", "--docs"]) == 0
    settings = seen["settings"]
    assert (settings.max_image_pixels, settings.max_concurrency, settings.max_queue, settings.request_timeout) == \
        (1_000_000, 3, 0, 2.5)
    assert settings.cors_origins == ("https://a.example", "https://b.example") and settings.docs
    assert settings.api_key is None and seen["host"] == "127.0.0.1"

    monkeypatch.setenv("RESNETLAB_API_KEY", KEY)
    assert main(["serve", str(tiny_checkpoint)]) == 0
    assert seen["settings"].api_key == KEY and not seen["settings"].docs and not seen["settings"].cors_origins

    capsys.readouterr()
    for flags, fragment in ((["--max-concurrency", "0"], "--max-concurrency"), (["--request-timeout", "0"],
                            "--request-timeout"), (["--cors-origin", "example.org"], "--cors-origin"),
                            (["--api-key", "two words"], "API key"), (["--max-image-pixels", "999999999"],
                                                                      "--max-image-pixels")):
        assert main(["serve", str(tiny_checkpoint), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and fragment in err and len(err.splitlines()) == 1, err


# ---------------------------------------------------------------------------------------------------------------
# The page with a key, in headless Chromium
# ---------------------------------------------------------------------------------------------------------------


def test_the_page_asks_for_the_key_and_sends_it(tiny_checkpoint, sign_file, tmp_path):  # noqa: F811
    from tests.test_deploy_service import DevTools, _chromium
    from tests.test_service_load import running_server

    binary = _chromium()
    if binary is None:
        pytest.skip("no Chromium found (install Debian's chromium or set RESNETLAB_CHROMIUM): the page test needs one")
    with running_server(tiny_checkpoint, tmp_path / "serve.log", env={"RESNETLAB_API_KEY": KEY}) as (url, _):
        browser = DevTools(binary, tmp_path / "profile")
        try:
            browser.open(f"{url}/")
            browser.wait_for("document.readyState === 'complete' && !document.getElementById('auth').hidden")
            assert "API key" in browser.evaluate("document.getElementById('model').textContent")
            browser.evaluate("document.getElementById('key').value = 'wrong'; "
                             "document.getElementById('auth').requestSubmit()")
            assert "refused" in browser.wait_for("document.getElementById('error').textContent")
            browser.evaluate(f"document.getElementById('key').value = '{KEY}'; "
                             "document.getElementById('auth').requestSubmit()")
            browser.wait_for("document.getElementById('model').textContent.includes('classes')")
            browser.choose_file("#file", sign_file)
            browser.wait_for("!document.getElementById('result').hidden && "
                             "document.querySelectorAll('#classes li').length > 0")
            assert browser.evaluate("document.getElementById('error').textContent") == ""
        finally:
            browser.close()
