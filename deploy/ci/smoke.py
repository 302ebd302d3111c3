"""Black-box checks of a running service container, for scripts/check_deploy.sh. Standard library only.

    python3 deploy/ci/smoke.py wait-ready --url http://127.0.0.1:18000 --timeout 300
    python3 deploy/ci/smoke.py check --url http://127.0.0.1:18000 [--jpeg digit.jpg]
    python3 deploy/ci/smoke.py drain --url http://127.0.0.1:18000 --stop-cmd "podman kill --signal TERM NAME"
    python3 deploy/ci/smoke.py prometheus --url http://127.0.0.1:19090 --dashboard deploy/grafana/dashboards/vae-service.json

Each check prints one PASS or FAIL line; the exit status is the number of failures (capped at 100).
"""

import argparse
import base64
import json
import math
import shlex
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zlib

failures = 0


def report(ok: bool, name: str, detail: str = "") -> bool:
    global failures
    failures += not ok
    print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    return ok


def request(url: str, data: bytes = None, headers: dict = None, timeout: float = 60.0):
    """(status, headers, body) of one request; HTTP errors are answers too, not exceptions."""
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def post_json(url: str, payload: dict, timeout: float = 60.0):
    status, headers, body = request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"}, timeout)
    try:
        return status, json.loads(body)
    except ValueError:
        return status, {"raw": body[:200].decode("latin-1")}


def png(pixels, width: int, height: int, channels: int) -> bytes:
    """An 8-bit grey (1 channel) or RGB (3) PNG from a row-major list of 0..255 values per channel."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    color_type = {1: 0, 3: 2}[channels]
    stride = width * channels
    raw = b"".join(b"\x00" + bytes(pixels[y * stride:(y + 1) * stride]) for y in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def drawn_zero(width: int, height: int, channels: int) -> bytes:
    """A hand-drawn '0': a bright ring on black, the shape of the digits the default model was trained on."""
    cx, cy, rx, ry = (width - 1) / 2, (height - 1) / 2, width * 0.3, height * 0.4
    pixels = []
    for y in range(height):
        for x in range(width):
            d = math.hypot((x - cx) / rx, (y - cy) / ry)
            pixels.extend([255 if 0.6 <= d <= 1.15 else 0] * channels)
    return png(pixels, width, height, channels)


def multipart(files) -> tuple:
    boundary = uuid.uuid4().hex
    parts = []
    for name, content, ctype in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
                     f"Content-Type: {ctype}\r\n\r\n".encode() + content + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def finite_matrix(value, rows: int, cols: int) -> bool:
    return (isinstance(value, list) and len(value) == rows
            and all(isinstance(r, list) and len(r) == cols and all(math.isfinite(v) for v in r) for r in value))


def wait_ready(url: str, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if request(url + "/readyz", timeout=2)[0] == 200:
                return time.monotonic() - started
        except OSError:
            pass  # not listening yet
        time.sleep(0.1)
    raise TimeoutError(f"{url}/readyz not 200 after {timeout:.0f}s")


def protocol(url: str, timeout: float) -> None:
    """As KServe's ServingRuntime runs the image: ready on the protocol's readiness route, and the encoder model
    answering an infer request, naming the artifact that answered."""
    started = time.monotonic()
    while True:
        try:
            if request(url + "/v2/health/ready", timeout=2)[0] == 200:
                break
        except OSError:
            pass
        if time.monotonic() - started > timeout:
            report(False, "/v2/health/ready answers 200", f"not after {timeout:.0f}s")
            return
        time.sleep(0.2)
    report(True, "/v2/health/ready answers 200", f"after {time.monotonic() - started:.1f}s")
    status, _, body = request(url + "/v2/models/encoder")
    meta = json.loads(body) if status == 200 else {}
    shape = next((t["shape"] for t in meta.get("inputs", []) if t["name"] == "images"), None)
    if not report(status == 200 and shape is not None, "/v2/models/encoder has its input shape", str(shape)):
        return
    images = [1] + shape[1:]
    payload = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": images,
                           "data": [0] * math.prod(images)}]}
    status, headers, body = request(url + "/v2/models/encoder/infer", json.dumps(payload).encode(),
                                    {"Content-Type": "application/json"})
    answer = json.loads(body) if status == 200 else {}
    version = answer.get("model_version", "")
    report(status == 200 and [o["name"] for o in answer.get("outputs", [])] == ["mu", "logvar"],
           "/v2/models/encoder/infer answers mu and logvar", str(status))
    report(len(version) == 64 and headers.get("x-model-sha256") == version,
           "the answer names the artifact (model_version = X-Model-Sha256)", version[:12])


def check(url: str, jpeg: str = None) -> None:
    status, _, body = request(url + "/livez")
    report(status == 200, "/livez answers 200", str(status))
    status, _, body = request(url + "/readyz")
    report(status == 200, "/readyz answers 200", str(status))

    status, _, body = request(url + "/v1/model")
    if not report(status == 200, "/v1/model answers 200", str(status)):
        return
    model = json.loads(body)
    latent, image = model["latent_dim"], model["image"]
    w, h, c = image["width"], image["height"], image["channels"]
    print(f"     model: {w}x{h}x{c}, latent {latent}, device {model['device']}, sha256 {model['sha256'][:12]}")

    status, out = post_json(url + "/sample", {"n": 4, "seed": 0})
    ok = (status == 200 and len(out.get("images", [])) == 4 and finite_matrix(out.get("z"), 4, latent)
          and all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in out["images"]))
    report(ok, "/sample n=4 returns 4 PNG images and their latents", f"status {status}")
    status2, out2 = post_json(url + "/sample", {"n": 4, "seed": 0})
    report(status2 == 200 and out2.get("images") == out.get("images"), "/sample with the same seed repeats itself")
    sampled_png = base64.b64decode(out["images"][0]) if ok else drawn_zero(w, h, c)

    # Multipart: a drawn digit at the model's size, one of the model's own samples, and (when given) a JPEG
    # of another size that the service has to convert.
    files = [("zero.png", drawn_zero(w, h, c), "image/png"), ("sample.png", sampled_png, "image/png")]
    if jpeg:
        with open(jpeg, "rb") as fh:
            files.append(("zero.jpg", fh.read(), "image/jpeg"))
    body, ctype = multipart(files)
    status, _, raw = request(url + "/encode", body, {"Content-Type": ctype})
    out = json.loads(raw) if raw[:1] == b"{" else {}
    report(status == 200 and finite_matrix(out.get("mu"), len(files), latent)
           and finite_matrix(out.get("logvar"), len(files), latent),
           f"/encode multipart ({', '.join(f[0] for f in files)}) returns mu and logvar", f"status {status}")

    status, out = post_json(url + "/encode", {"images": [base64.b64encode(drawn_zero(w, h, c)).decode()]})
    report(status == 200 and finite_matrix(out.get("mu"), 1, latent), "/encode JSON base64 returns mu",
           f"status {status}")

    status, _, raw = request(url + "/encode", b"not an image", {"Content-Type": "application/octet-stream"})
    try:
        error = json.loads(raw).get("error", {})
    except ValueError:
        error = {}
    report(400 <= status < 500 and "code" in error, "/encode with garbage is a JSON 4xx, not a 500", str(status))

    # The packaged page and its assets (package data must reach the image), the protocol and the directions.
    for path, kind in (("/", "text/html"), ("/ui/app.js", "javascript"), ("/ui/style.css", "text/css")):
        status, headers, raw = request(url + path)
        ctype = dict((k.lower(), v) for k, v in headers.items()).get("content-type", "")
        report(status == 200 and kind in ctype and len(raw) > 100, f"GET {path} serves the page's {kind}",
               f"status {status}, {ctype}, {len(raw)} bytes")
    status, _, raw = request(url + "/v2/health/ready")
    report(status == 200, "GET /v2/health/ready (Open Inference Protocol)", f"status {status}")
    status, _, raw = request(url + "/v2/models/encoder")
    meta = json.loads(raw) if status == 200 else {}
    report(status == 200 and [o["name"] for o in meta.get("outputs", [])] == ["mu", "logvar"],
           "GET /v2/models/encoder names its outputs mu, logvar", f"status {status}")
    status, _, raw = request(url + "/directions")
    names = [d.get("name") for d in json.loads(raw).get("directions", [])] if status == 200 else []
    report(status == 200 and any(n.startswith("pixel:") for n in names), "GET /directions lists pixel directions",
           f"status {status}, {names[:4]}")

    status, _, raw = request(url + "/metrics")
    text = raw.decode()
    wanted = ['vae_ready 1.0', 'vae_requests_total{endpoint="/encode",role="model",status="200"}', "vae_model_info{",
              'vae_batch_rows_count{kernel="encode"}', 'vae_queue_capacity{kernel="encode"}']
    missing = [m for m in wanted if m not in text]
    report(status == 200 and not missing, "/metrics exposes the dashboard's series", f"missing {missing}" if missing else "")


def drain(url: str, stop_cmd: str, rows: int) -> None:
    """A request in flight when SIGTERM arrives still gets its full answer; new connections are refused after."""
    status, _, body = request(url + "/v1/model")
    model = json.loads(body)
    image = model["image"]
    k = min(1024, max(model.get("score_k", 32), 256))
    payload = {"images": [base64.b64encode(drawn_zero(image["width"], image["height"], image["channels"])).decode()]
               * rows}
    started = time.monotonic()
    status, out = post_json(url + f"/anomaly-score?k={k}", payload, timeout=120)
    duration = time.monotonic() - started
    if not report(status == 200 and len(out.get("scores", [])) == rows,
                  f"/anomaly-score ({rows} images, k={k}) answers before the stop", f"{status} in {duration:.2f}s"):
        return

    result = {}

    def slow_request():
        try:
            result["status"], result["body"] = post_json(url + f"/anomaly-score?k={k}", payload, timeout=120)
        except Exception as exc:  # noqa: BLE001 - any transport error is the failure being tested for
            result["error"] = repr(exc)
        result["at"] = time.monotonic()

    worker = threading.Thread(target=slow_request)
    worker.start()
    time.sleep(min(0.3, duration / 3))  # the request is now in the model
    signalled = time.monotonic()
    subprocess.run(shlex.split(stop_cmd), check=True, stdout=subprocess.DEVNULL)
    worker.join(150)
    ok = result.get("status") == 200 and len(result.get("body", {}).get("scores", [])) == rows
    report(ok, "a request in flight at SIGTERM completes with 200",
           f"status {result.get('status')}, error {result.get('error')}, "
           f"answered {result.get('at', signalled) - signalled:.2f}s after the signal (request alone: {duration:.2f}s)")
    time.sleep(0.5)
    try:
        status = request(url + "/livez", timeout=2)[0]
        refused = False
    except OSError:
        refused, status = True, None
    report(refused or status == 503, "no new requests are served after SIGTERM", f"status {status}")


def prometheus(prom: str, dashboard_path: str, timeout: float) -> None:
    """A real Prometheus scraping the container: target up, alert rules loaded and healthy, and every dashboard
    query accepted by the server, the traffic panels with data."""
    def query(expr: str):
        url = prom + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        status, _, body = request(url, timeout=10)
        try:
            return status, json.loads(body)
        except ValueError:  # e.g. 503 "Service Unavailable" in plain text while the TSDB opens
            return status, {"error": f"{status}: {body[:200].decode('latin-1')!r}"}

    started, last = time.monotonic(), "no answer"
    while time.monotonic() - started < timeout:
        try:
            # Ready, and scraped often enough that rate() over 1m has points to work with.
            status, out = query('vae_ready == 1 and on(instance) count_over_time(vae_ready[1m]) >= 5'
                                ' and on(instance) up{job="vae-service"} == 1')
            if status == 200 and out.get("data", {}).get("result"):
                break
            last = out.get("error", f"{status}, no ready target yet")
        except OSError:
            pass  # Prometheus still starting: not listening yet
        time.sleep(0.5)
    else:
        report(False, "Prometheus scrapes the service (up == 1, vae_ready == 1)",
               f"not within {timeout:.0f}s; last answer: {last}")
        return
    report(True, "Prometheus scrapes the service (up == 1, vae_ready == 1)")

    _, _, body = request(prom + "/api/v1/rules")
    rules = [r for g in json.loads(body)["data"]["groups"] for r in g["rules"] if r["type"] == "alerting"]
    bad = [r["name"] for r in rules if r.get("health") not in ("ok", "unknown")]
    report(len(rules) >= 5 and not bad, f"Prometheus loaded {len(rules)} alert rules, all healthy",
           f"unhealthy {bad}" if bad else "")

    with open(dashboard_path) as fh:
        dashboard = json.load(fh)
    fill = {"$__rate_interval": "1m", "$job": ".*", "$instance": ".*"}
    errors, with_data = [], set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in fill.items():
                expr = expr.replace(var, value)
            status, out = query(expr)
            if status != 200 or out.get("status") != "success":
                errors.append(f"{panel['title']}: {out.get('error', status)}")
            elif out["data"]["result"]:
                with_data.add(panel["title"])
    report(not errors, "Prometheus evaluates every dashboard query", "; ".join(errors))
    wanted = {"Ready instances", "Request rate by endpoint", "Latency p99 by endpoint", "Queue depth (rows waiting)",
              "Batch size (rows per model call)", "Served model"}
    empty = sorted(wanted - with_data)
    report(not empty, f"the dashboard's traffic panels have data ({len(with_data)} panels with data)",
           f"empty: {empty}" if empty else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["wait-ready", "check", "drain", "prometheus", "protocol"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--jpeg")
    parser.add_argument("--stop-cmd")
    parser.add_argument("--dashboard", help="dashboard JSON whose queries `prometheus` evaluates")
    parser.add_argument("--rows", type=int, default=16, help="images in the in-flight request of `drain`")
    args = parser.parse_args()
    url = args.url.rstrip("/")
    if args.command == "wait-ready":
        try:
            print(f"{wait_ready(url, args.timeout):.2f}")
        except TimeoutError as exc:
            print(exc, file=sys.stderr)
            return 1
        return 0
    if args.command == "check":
        check(url, args.jpeg)
    elif args.command == "protocol":
        protocol(url, args.timeout)
    elif args.command == "prometheus":
        if not args.dashboard:
            parser.error("prometheus needs --dashboard")
        prometheus(url, args.dashboard, args.timeout)
    else:
        if not args.stop_cmd:
            parser.error("drain needs --stop-cmd")
        drain(url, args.stop_cmd, args.rows)
    return min(failures, 100)


if __name__ == "__main__":
    sys.exit(main())
