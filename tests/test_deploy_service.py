"""The HTTP service: the API through FastAPI's TestClient, a real uvicorn process on loopback (with a burst of
concurrent requests and bad requests it must survive), and the web page driven in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import os
import select
import shutil
import subprocess
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from resnetlab.deployment.export_cache import cached_export
from resnetlab.deployment.predictor import load_predictor
from tests.test_deploy_export import tiny_checkpoint  # noqa: F401  (the shared trained model)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's TestClient warns that it will move to httpx2
    from fastapi.testclient import TestClient

from resnetlab.deployment.service import create_app  # noqa: E402

PARITY = 1e-4
SMALL_LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def export_dir(tiny_checkpoint):
    """The export the default path makes (and `serve CHECKPOINT` below reuses from the cache)."""
    return cached_export(tiny_checkpoint)


@pytest.fixture(scope="module")
def sign_files(tiny_signs):
    return sorted((tiny_signs / "Test").glob("*.png"))[:3]


@pytest.fixture(scope="module")
def client(export_dir):
    return TestClient(create_app(load_predictor(export_dir), max_upload_bytes=SMALL_LIMIT, max_files=4))


@pytest.fixture(scope="module")
def eager_predictions(tiny_checkpoint, sign_files):
    """What `predict --backend torch` (the eager checkpoint, as evaluated) says about the test files."""
    predictor = load_predictor(tiny_checkpoint, backend="torch")
    return {p.path: p for p in predictor.predict_paths([str(f) for f in sign_files], topk=5)}


def _assert_matches(api_prediction, expected):
    assert [t["index"] for t in api_prediction["top"]][:1] == expected.indices[:1]
    assert [t["class"] for t in api_prediction["top"]][0] == expected.classes[0]
    np.testing.assert_allclose([t["confidence"] for t in api_prediction["top"]], expected.confidences, atol=PARITY)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# The API, in process
# ---------------------------------------------------------------------------------------------------------------


def test_health_model_and_page(client, export_dir):
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    model = client.get("/model").json()
    record = json.loads((export_dir / "preprocessing.json").read_text())
    assert model["classes"] == record["classes"]
    assert model["preprocessing"] == record["preprocessing"]
    assert model["output"]["kind"] == "logits"
    assert model["runtime"]["backend"] == "onnxruntime"
    assert model["limits"]["max_upload_bytes"] == SMALL_LIMIT
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'type="file"' in page.text and "predict" in page.text


def test_multipart_several_files_and_base64_agree_with_the_checkpoint(client, sign_files, eager_predictions):
    first = sign_files[0]
    data = first.read_bytes()
    single = client.post("/predict", files={"file": (first.name, data, "image/png")})
    assert single.status_code == 200
    body = single.json()
    assert body["backend"] == "onnxruntime" and body["latency_ms"]["total"] >= body["latency_ms"]["inference"] >= 0
    _assert_matches(body["predictions"][0], eager_predictions[str(first)])

    several = client.post("/predict?topk=5", files=[("files", (f.name, f.read_bytes(), "image/png")) for f in sign_files])
    assert several.status_code == 200
    for prediction, path in zip(several.json()["predictions"], sign_files):
        assert prediction["filename"] == path.name
        _assert_matches(prediction, eager_predictions[str(path)])

    encoded = base64.b64encode(data).decode()
    for payload in ({"image": encoded}, {"image": f"data:image/png;base64,{encoded}"},
                    {"images": [{"filename": first.name, "data": encoded}, encoded]}):
        response = client.post("/predict", json=payload)
        assert response.status_code == 200, response.text
        for prediction in response.json()["predictions"]:
            _assert_matches(prediction, eager_predictions[str(first)])

    top2 = client.post("/predict?topk=2", files={"file": (first.name, data, "image/png")}).json()
    assert len(top2["predictions"][0]["top"]) == 2


def _bomb() -> bytes:
    # 9000 x 9000 one-bit pixels: a PNG of about 10 kB that would decode to 81 megapixels
    return _png(Image.new("1", (9000, 9000)))


FORM_WITHOUT_FILES = b'--xyz\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n--xyz--\r\n'
BAD_REQUESTS = {
    "text file": (lambda: {"files": {"file": ("notes.txt", b"just some text", "text/plain")}}, 415, "notes.txt"),
    "decompression bomb": (lambda: {"files": {"file": ("bomb.png", _bomb(), "image/png")}}, 413, "bomb.png"),
    "oversized upload": (lambda: {"files": {"file": ("huge.png", b"\0" * (SMALL_LIMIT + 1), "image/png")}}, 413,
                         "upload limit"),
    "empty file": (lambda: {"files": {"file": ("empty.png", b"", "image/png")}}, 400, "empty.png"),
    "bad base64": (lambda: {"json": {"image": "not base64 at all!"}}, 400, "base64"),
    "JSON without image": (lambda: {"json": {"picture": "x"}}, 400, "'image'"),
    "broken JSON": (lambda: {"content": b"{broken", "headers": {"content-type": "application/json"}}, 400, "JSON"),
    "raw bytes": (lambda: {"content": b"raw", "headers": {"content-type": "application/octet-stream"}}, 415,
                  "multipart"),
    "form without files": (lambda: {"content": FORM_WITHOUT_FILES,
                                    "headers": {"content-type": "multipart/form-data; boundary=xyz"}}, 400, "no image"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_a_clear_4xx_and_the_service_goes_on(client, sign_files, case):
    make_request, status, fragment = BAD_REQUESTS[case]
    response = client.post("/predict", **make_request())
    assert response.status_code == status, response.text
    assert fragment in response.json()["detail"]
    assert client.get("/health").status_code == 200
    good = client.post("/predict", files={"file": ("ok.png", sign_files[0].read_bytes(), "image/png")})
    assert good.status_code == 200


def test_truncated_image_too_many_files_and_bad_topk(client, sign_files):
    data = sign_files[0].read_bytes()
    truncated = client.post("/predict", files={"file": ("cut.png", data[: len(data) // 2], "image/png")})
    assert truncated.status_code == 400 and "cut.png" in truncated.json()["detail"]
    too_many = client.post("/predict", files=[("files", (f"{i}.png", data, "image/png")) for i in range(5)])
    assert too_many.status_code == 413 and "4" in too_many.json()["detail"]
    assert client.post("/predict?topk=0", files={"file": ("a.png", data, "image/png")}).status_code == 422


def test_streamed_body_without_length_is_limited_too(client):
    def chunks():
        for _ in range(8):
            yield b"\0" * (SMALL_LIMIT // 4)

    response = client.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413


# ---------------------------------------------------------------------------------------------------------------
# A real uvicorn process on loopback
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live_server(tiny_checkpoint, tmp_path_factory):
    """`resnetlab serve CHECKPOINT` in its own process: the default path (ONNX Runtime through the export cache)."""
    from tests.test_service_load import running_server

    log_path = tmp_path_factory.mktemp("server") / "serve.log"
    with running_server(tiny_checkpoint, log_path, default_host=True) as (url, _process):
        yield url, log_path


def test_real_server_binds_loopback_and_answers_a_burst(live_server, sign_files, eager_predictions):
    url, log_path = live_server
    assert f"Uvicorn running on {url}" in log_path.read_text()
    payloads = [(path, path.read_bytes()) for path in sign_files]

    def one_request(i: int):
        path, data = payloads[i % len(payloads)]
        with httpx.Client(timeout=60) as http:
            response = http.post(f"{url}/predict", files={"file": (path.name, data, "image/png")})
        return path, response.status_code, response.json()

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one_request, range(24)))
    for path, status, body in results:
        assert status == 200, body
        _assert_matches(body["predictions"][0], eager_predictions[str(path)])


def test_real_server_survives_bad_requests(live_server, sign_files):
    url, _ = live_server
    with httpx.Client(timeout=60) as http:  # a 413 closes its connection: each block below opens a fresh one
        oversized = http.post(f"{url}/predict", files={"file": ("big.png", os.urandom(11 * 1024 * 1024), "image/png")})
        assert oversized.status_code == 413
    with httpx.Client(timeout=60) as http:  # the same without a Content-Length: a chunked upload
        chunks = (b"\0" * (1024 * 1024) for _ in range(11))
        streamed = http.post(f"{url}/predict", content=chunks, headers={"content-type": "application/json"})
        assert streamed.status_code == 413 and "upload limit" in streamed.json()["detail"]
    with httpx.Client(timeout=60) as http:
        assert http.post(f"{url}/predict", files={"file": ("x.txt", b"hello", "text/plain")}).status_code == 415
        assert http.post(f"{url}/predict", content=b"{", headers={"content-type": "application/json"}).status_code == 400
    with httpx.Client(timeout=60) as http:
        assert http.get(f"{url}/health").json()["status"] == "ok"
        ok = http.post(f"{url}/predict", files={"file": ("a.png", sign_files[0].read_bytes(), "image/png")})
        assert ok.status_code == 200


# ---------------------------------------------------------------------------------------------------------------
# The page in headless Chromium, driven over the DevTools protocol (on a pipe: no extra package needed)
# ---------------------------------------------------------------------------------------------------------------


def _chromium() -> str | None:
    for candidate in (os.environ.get("RESNETLAB_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


class DevTools:
    """A minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe`` (JSON messages ending in NUL)."""

    def __init__(self, binary: str, profile: Path):
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()
        # The browser reads commands on fd 3 and writes replies on fd 4.
        command = (f'exec "$0" --headless --no-sandbox --disable-gpu --disable-dev-shm-usage --no-first-run '
                   f'--remote-debugging-pipe --user-data-dir="$1" about:blank '
                   f'3<&{to_browser_read} 4>&{from_browser_write}')
        self.process = subprocess.Popen(["bash", "-c", command, binary, str(profile)],
                                        pass_fds=(to_browser_read, from_browser_write),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._buffer = b""
        self._next_id = 0
        self.session: str | None = None

    def call(self, method: str, params: dict | None = None, *, timeout: float = 30, browser: bool = False) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if self.session and not browser:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._next_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
            ready, _, _ = select.select([self._from_browser], [], [], 0.5)
            if ready:
                chunk = os.read(self._from_browser, 1 << 16)
                if not chunk:
                    raise RuntimeError("the browser closed the DevTools pipe")
                self._buffer += chunk
        raise TimeoutError(f"no reply to {method} within {timeout} s")

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", {"url": url}, browser=True)["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 browser=True)["sessionId"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"the page never satisfied: {expression}")

    def choose_file(self, selector: str, path: Path) -> None:
        root = self.call("DOM.getDocument")["root"]["nodeId"]
        node = self.call("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
        self.call("DOM.setFileInputFiles", {"files": [str(path)], "nodeId": node})

    def close(self) -> None:
        try:
            self.call("Browser.close", browser=True, timeout=10)
            self.process.wait(timeout=10)
        except (RuntimeError, TimeoutError, OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        finally:
            os.close(self._to_browser)
            os.close(self._from_browser)


def test_page_in_headless_chromium_shows_the_top5_and_latency(live_server, sign_files, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("no Chromium found (install Debian's chromium or set RESNETLAB_CHROMIUM): the page test needs one")
    url, _ = live_server
    image = sign_files[1]
    expected = httpx.post(f"{url}/predict?topk=5", files={"file": (image.name, image.read_bytes(), "image/png")},
                          timeout=60).json()["predictions"][0]["top"]
    browser = DevTools(binary, tmp_path / "profile")
    try:
        browser.open(f"{url}/")
        browser.wait_for("document.readyState === 'complete' && "
                         "document.getElementById('model').textContent.includes('classes')")
        browser.choose_file("#file", image)
        browser.wait_for("!document.getElementById('result').hidden && "
                         "document.querySelectorAll('#classes li').length > 0")
        shown = browser.evaluate("JSON.stringify([...document.querySelectorAll('#classes li')].map(li => "
                                 "[li.querySelector('.name').textContent, li.querySelector('.pct').textContent, "
                                 "li.querySelector('.bar span').style.width]))")
        latency = browser.evaluate("document.getElementById('latency').textContent")
        screenshot = browser.call("Page.captureScreenshot", {"format": "png"})["data"]
        (tmp_path / "page.png").write_bytes(base64.b64decode(screenshot))

        browser.choose_file("#file", Path(__file__))  # not an image: the page shows the service's message
        error = browser.wait_for("document.getElementById('error').textContent")
    finally:
        browser.close()
    rows = json.loads(shown)
    assert [name for name, _, _ in rows] == [t["class"] for t in expected]
    assert [pct for _, pct, _ in rows] == [f"{t['confidence'] * 100:.1f} %" for t in expected]
    widths = [float(width.rstrip("%")) for _, _, width in rows]
    assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1]
    assert "ms" in latency and "server" in latency
    assert error.startswith("415") and Path(__file__).name in error


def test_serve_workers_inherit_the_precision_and_bad_ones_stop_before_binding(tiny_checkpoint, sign_files,
                                                                              monkeypatch, tmp_path, capsys):
    from resnetlab.cli.main import main
    from resnetlab.deployment.service import ENVIRONMENT_PREFIX, app_from_environment

    # what `serve --workers N --precision bf16` hands each uvicorn worker process
    for key, value in {"SOURCE": str(tiny_checkpoint), "BACKEND": "auto", "THREADS": "1", "PRECISION": "bf16",
                       "MAX_UPLOAD_BYTES": str(1 << 20), "MAX_FILES": "4"}.items():
        monkeypatch.setenv(ENVIRONMENT_PREFIX + key, value)
    with TestClient(app_from_environment()) as client:
        assert client.get("/model").json()["runtime"]["precision"] == "bf16"
        path = sign_files[0]
        body = client.post("/predict", files={"file": (path.name, path.read_bytes(), "image/png")}).json()
        assert body["backend"] == "aoti" and body["precision"] == "bf16" and body["predictions"][0]["top"]
    capsys.readouterr()
    assert main(["serve", str(tiny_checkpoint), "--precision", "fp8", "--port", "1"]) == 2
    assert "--precision 'fp8'" in capsys.readouterr().err
