"""The Open Inference Protocol (/v2) as Triton's own client speaks it, against a real uvicorn server on
127.0.0.1: health and metadata, the three models in JSON and binary tensors, bit for bit equal to /encode,
/decode and /anomaly-score on the same inputs, and a 4xx ``{"error": ...}`` for every malformed tensor."""

import gzip
import io
import socket
import threading
import time
from typing import Iterator

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as triton
import uvicorn
from tritonclient.utils import InferenceServerException

from tests.helpers import png, variant
from service.app import create_app

KEY = "open-inference-test-key"
NPY = {"accept": "application/x-npy", "X-API-Key": KEY}


def auth() -> dict:
    """A new headers dict per call: tritonclient's infer adds Inference-Header-Content-Length to the dict it is
    given, and a shared one would carry a stale length into the next request."""
    return {"X-API-Key": KEY}


@pytest.fixture(scope="module")
def url(settings) -> Iterator[str]:
    """The app behind a real uvicorn server on a loopback port (in a thread), with an API key."""
    app = create_app(variant(settings, api_key=KEY))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = "http://127.0.0.1:%d" % sock.getsockname()[1]
    try:
        deadline = time.monotonic() + 120
        while not server.started or httpx.get(f"{base}/readyz").status_code != 200:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.05)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def tc(url) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def http(url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, headers=auth(), timeout=60) as client:
        yield client


def npy(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.load(io.BytesIO(response.content), allow_pickle=False)


def tensor(name: str, array: np.ndarray, datatype: str, binary: bool) -> triton.InferInput:
    return triton.InferInput(name, list(array.shape), datatype).set_data_from_numpy(array, binary_data=binary)


def outputs(*names: str, binary: bool) -> list:
    return [triton.InferRequestedOutput(name, binary_data=binary) for name in names]


def files(images: np.ndarray) -> list:
    return [("file", (f"{i}.png", png(image), "image/png")) for i, image in enumerate(images)]


# -- health and metadata -----------------------------------------------------------------------------------
def test_health_and_server_metadata(tc, url):
    assert tc.is_server_live() and tc.is_server_ready()
    meta = tc.get_server_metadata(headers=auth())
    assert meta["name"] == "vae-service" and "binary_tensor_data" in meta["extensions"]
    # Probes need no key, as /livez and /readyz; everything else does, and says why in the protocol's body.
    assert httpx.get(f"{url}/v2/health/ready").json() == {"ready": True}
    refused = httpx.get(f"{url}/v2")
    assert refused.status_code == 401 and isinstance(refused.json()["error"], str)


def test_model_metadata_and_readiness(tc, http, digit_images):
    c, h, w = digit_images.shape[1:]
    d = http.get("/v1/model").json()["latent_dim"]
    image, latent = [-1, c, h, w], [-1, d]
    expected = {
        "encoder": ({"images": ("FP32", image)}, {"mu": ("FP32", latent), "logvar": ("FP32", latent)}),
        "decoder": ({"z": ("FP32", latent)}, {"pixels": ("FP32", image)}),
        "scorer": ({"images": ("FP32", image)}, {"score": ("FP64", [-1]), "p_value": ("FP64", [-1]),
                                                   "is_anomaly": ("BOOL", [-1]), "elbo": ("FP64", [-1])}),
    }
    for name, (inputs, outs) in expected.items():
        assert tc.is_model_ready(name, headers=auth()) and tc.is_model_ready(name, "1", headers=auth())
        for meta in (tc.get_model_metadata(name, headers=auth()), tc.get_model_metadata(name, "1", headers=auth())):
            assert meta["name"] == name and meta["versions"] == ["1"] and meta["platform"] == "pytorch_torchscript"
            assert {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]} == inputs
            got = {t["name"]: (t["datatype"], t["shape"]) for t in meta["outputs"]}
            assert got.items() >= outs.items()
    assert not tc.is_model_ready("nope", headers=auth()) and not tc.is_model_ready("encoder", "2", headers=auth())
    with pytest.raises(InferenceServerException) as missing:
        tc.get_model_metadata("nope", headers=auth())
    assert missing.value.status() == "404" and "encoder" in missing.value.message()


# -- the models equal our endpoints, bit for bit -----------------------------------------------------------
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_encoder_equals_encode(tc, http, digit_images, binary):
    images = digit_images[:7]
    encoded = npy(http.post("/encode", files=files(images), headers=NPY))  # (N, 2, D): mu, logvar
    as_float = (images / np.float32(255.0)).astype(np.float32)
    for sent, datatype in ((images, "UINT8"), (as_float, "FP32")):
        result = tc.infer("encoder", [tensor("images", sent, datatype, binary)], outputs=outputs("mu", "logvar",
                          binary=binary), headers=auth())
        assert result.as_numpy("mu").dtype == np.float32
        assert np.array_equal(result.as_numpy("mu"), encoded[:, 0]), datatype
        assert np.array_equal(result.as_numpy("logvar"), encoded[:, 1]), datatype


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_decoder_equals_decode(tc, http, binary):
    d = http.get("/v1/model").json()["latent_dim"]
    z = np.random.default_rng(3).standard_normal((5, d)).astype(np.float32)
    decoded = npy(http.post("/decode", json={"z": z.tolist()}, headers=NPY))
    result = tc.infer("decoder", [tensor("z", z, "FP32", binary)], outputs=outputs("pixels", binary=binary),
                      headers=auth())
    assert np.array_equal(result.as_numpy("pixels"), decoded)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_scorer_equals_anomaly_score(tc, http, digit_images, noise_images, binary):
    images = np.concatenate([digit_images[:4], noise_images[:3]])
    kinds = sorted(http.get("/v1/model").json()["metadata"]["scoring"]["kinds"])
    fields = {"score": "score_nats", "nll": "nll_nats", "elbo": "elbo_nats", "kl": "kl_nats",
              "reconstruction": "reconstruction_nats", "ess": "ess", "p_value": "p_value", "percentile": "percentile",
              "is_anomaly": "is_anomaly"}
    per_kind = ("complexity_bits", "neighbour_distance", "latent_density")  # only where the kind has them
    field_of = {"latent_density": "latent_density_nats"}  # the /anomaly-score field each comes from
    seen = set()
    for kind in kinds:
        params = {"alpha": 0.05, "tail": "two-sided", "score": kind}
        reference = http.post("/anomaly-score", params=params, files=files(images)).json()
        has = {name: field_of.get(name, name) for name in per_kind
               if reference["scores"][0][field_of.get(name, name)] is not None}
        seen.update(has)
        result = tc.infer("scorer", [tensor("images", images, "UINT8", binary)], parameters=params, headers=auth(),
                          outputs=None if binary else outputs(*fields, *has, binary=False))
        for name, field in {**fields, **has}.items():
            expected = [row[field] for row in reference["scores"]]
            assert result.as_numpy(name).tolist() == expected, (kind, name)
        sent = {output["name"] for output in result.get_response()["outputs"]}
        assert not sent & (set(per_kind) - set(has)), kind
        if not has:
            with pytest.raises(InferenceServerException) as refused:
                tc.infer("scorer", [tensor("images", images[:1], "UINT8", True)], parameters=params, headers=auth(),
                         outputs=outputs(per_kind[0], binary=True))
            assert refused.value.status() == "400" and "has none" in refused.value.message()
        response = result.get_response()["parameters"]
        assert response["score"] == kind and response["calibrated"] is True and response["alpha"] == 0.05
        assert response.get("threshold_nats") == reference["calibration"]["threshold_nats"]
    assert seen == set(per_kind)  # the artifact has kinds with each (nll-minus-bz2, fisher-bz2-nn, density-bz2)


def test_scorer_at_another_k_has_no_p_values(tc, http, digit_images):
    images = digit_images[:3]
    k = http.get("/v1/model").json()["score_k"] + 1
    reference = http.post("/anomaly-score", params={"k": k}, files=files(images)).json()
    result = tc.infer("scorer", [tensor("images", images, "UINT8", True)], parameters={"k": k}, headers=auth())
    names = {output["name"] for output in result.get_response()["outputs"]}
    assert "score" in names and not names & {"p_value", "percentile", "is_anomaly"}
    assert result.as_numpy("nll").tolist() == [row["nll_nats"] for row in reference["scores"]]
    assert result.get_response()["parameters"]["calibrated"] is False
    with pytest.raises(InferenceServerException) as refused:
        tc.infer("scorer", [tensor("images", images, "UINT8", True)], parameters={"k": k}, headers=auth(),
                 outputs=outputs("p_value", binary=True))
    assert refused.value.status() == "400" and "calibration" in refused.value.message()


def test_only_requested_outputs_are_sent_and_gzip_bodies_are_read(tc, digit_images):
    result = tc.infer("encoder", [tensor("images", digit_images[:2], "UINT8", True)], headers=auth(),
                      outputs=outputs("logvar", binary=False), request_compression_algorithm="gzip")
    assert [output["name"] for output in result.get_response()["outputs"]] == ["logvar"]
    assert result.as_numpy("mu") is None and result.as_numpy("logvar").shape[0] == 2


def test_deflate_bodies_are_read_like_plain_ones(tc, digit_images):
    plain = tc.infer("encoder", [tensor("images", digit_images[:3], "UINT8", True)], headers=auth())
    deflated = tc.infer("encoder", [tensor("images", digit_images[:3], "UINT8", True)], headers=auth(),
                        request_compression_algorithm="deflate")
    np.testing.assert_array_equal(deflated.as_numpy("mu"), plain.as_numpy("mu"))


def test_tritons_timeout_parameter_sets_the_deadline(tc, digit_images):
    """``timeout`` (microseconds, as tritonclient sends it) lowers the request's deadline: one microsecond has
    passed before any row is computed (504, the rows dropped); a minute is plenty."""
    inputs = [tensor("images", digit_images[:2], "UINT8", True)]
    with pytest.raises(InferenceServerException) as expired:
        tc.infer("encoder", inputs, headers=auth(), timeout=1)
    assert expired.value.status() == "504" and "deadline" in expired.value.message()
    assert tc.infer("encoder", inputs, headers=auth(), timeout=60_000_000).as_numpy("mu").shape == (2, 16)


def test_the_server_limits_apply(tc, digit_images, settings):
    rows = np.repeat(digit_images[:1], settings.max_rows + 1, axis=0)
    with pytest.raises(InferenceServerException) as too_many:
        tc.infer("encoder", [tensor("images", rows, "UINT8", True)], headers=auth())
    assert too_many.value.status() == "413"
    with pytest.raises(InferenceServerException) as high_k:
        tc.infer("scorer", [tensor("images", rows[:1], "UINT8", True)], parameters={"k": settings.max_k + 1},
                 headers=auth())
    assert high_k.value.status() == "413"


# -- malformed requests: 4xx with the protocol's error body, never 5xx -------------------------------------
def binary_body(header: dict, *chunks: bytes) -> tuple:
    head = orjson.dumps(header)
    return head + b"".join(chunks), {"Inference-Header-Content-Length": str(len(head))}


def image_input(n: int = 2, datatype: str = "UINT8", shape=None, **fields) -> dict:
    return {"name": "images", "datatype": datatype, "shape": shape or [n, 1, 8, 8], **fields}


U8 = np.zeros((2, 1, 8, 8), np.uint8)
F32 = np.zeros((2, 1, 8, 8), np.float32)
MALFORMED = {
    "wrong shape": ("encoder", {"inputs": [image_input(shape=[2, 1, 8, 9], data=[0] * 144)]}),
    "wrong rank": ("encoder", {"inputs": [image_input(shape=[128], data=[0] * 128)]}),
    "no rows": ("encoder", {"inputs": [image_input(shape=[0, 1, 8, 8], data=[])]}),
    "wrong datatype": ("encoder", {"inputs": [image_input(datatype="INT32", data=[0] * 128)]}),
    "unknown datatype": ("encoder", {"inputs": [image_input(datatype="FLOAT", data=[0] * 128)]}),
    "too few elements": ("encoder", {"inputs": [image_input(data=[0] * 127)]}),
    "ragged data": ("encoder", {"inputs": [image_input(data=[[0] * 64, [0] * 63])]}),
    "strings as pixels": ("encoder", {"inputs": [image_input(data=["0"] * 128)]}),
    "uint8 out of range": ("encoder", {"inputs": [image_input(data=[256] * 128)]}),
    "fp32 above 1": ("encoder", {"inputs": [image_input(datatype="FP32", data=[2.0] * 128)]}),
    "unknown output": ("encoder", {"inputs": [image_input(data=[0] * 128)], "outputs": [{"name": "z"}]}),
    "unknown input": ("encoder", {"inputs": [{**image_input(data=[0] * 128), "name": "x"}]}),
    "z of the wrong size": ("decoder", {"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, 3],
                                                    "data": [0.0] * 3}]}),
    "z beyond float32": ("decoder", {"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, "D"],
                                                 "data": [1e39] * 0}]}),  # filled in with the latent size
    "no inputs": ("encoder", {"inputs": []}),
    "bad k": ("scorer", {"inputs": [image_input(data=[0] * 128)], "parameters": {"k": 0}}),
    "bad alpha": ("scorer", {"inputs": [image_input(data=[0] * 128)], "parameters": {"alpha": 1.5}}),
    "bad tail": ("scorer", {"inputs": [image_input(data=[0] * 128)], "parameters": {"tail": "lower"}}),
    "unknown score": ("scorer", {"inputs": [image_input(data=[0] * 128)], "parameters": {"score": "nope"}}),
    "shape of strings": ("encoder", {"inputs": [image_input(shape=["2", "1", "8", "8"], data=[0] * 128)]}),
    "timeout not microseconds": ("encoder", {"inputs": [image_input(data=[0] * 128)], "parameters": {"timeout": "1s"}}),
    "binary_data_output not a bool": ("encoder", {"inputs": [image_input(data=[0] * 128)],
                                                  "parameters": {"binary_data_output": "yes"}}),
}
BINARY = {
    "byte count below the shape": binary_body({"inputs": [image_input(parameters={"binary_data_size": 127})]},
                                              U8.tobytes()[:127]),
    "byte count above the body": binary_body({"inputs": [image_input(parameters={"binary_data_size": 128})]},
                                             U8.tobytes()[:100]),
    "bytes left over": binary_body({"inputs": [image_input(parameters={"binary_data_size": 128})]},
                                   U8.tobytes() + b"\0"),
    "fp32 bytes for a uint8 shape": binary_body({"inputs": [image_input(parameters={"binary_data_size": 128})]},
                                                F32.tobytes()),
    "nan pixels": binary_body({"inputs": [image_input(datatype="FP32", parameters={"binary_data_size": 512})]},
                              np.full((2, 1, 8, 8), np.nan, np.float32).tobytes()),
    "data and bytes": binary_body({"inputs": [image_input(data=[0] * 128, parameters={"binary_data_size": 128})]},
                                  U8.tobytes()),
    "header length past the body": (b'{"inputs": []}', {"Inference-Header-Content-Length": "999"}),
    "header length not a number": (b'{"inputs": []}', {"Inference-Header-Content-Length": "-1"}),
    "not JSON": (b"\x00\x01binary", {}),
    "truncated gzip": (gzip.compress(orjson.dumps({"inputs": [image_input(data=[0] * 128)]}))[:-8],
                       {"Content-Encoding": "gzip"}),
    "unknown content encoding": (b"{}", {"Content-Encoding": "br"}),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_json_tensors_get_a_4xx(http, case):
    model, body = MALFORMED[case]
    if case == "z beyond float32":  # finite in JSON's float64, not in float32; of the right size
        d = http.get("/v1/model").json()["latent_dim"]
        body = {"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, d], "data": [1e39] * d}]}
    response = http.post(f"/v2/models/{model}/infer", json=body)
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    assert set(response.json()) == {"error"} and isinstance(response.json()["error"], str)


@pytest.mark.parametrize("case", sorted(BINARY))
def test_malformed_binary_requests_get_a_4xx(http, case):
    body, headers = BINARY[case]
    response = http.post("/v2/models/encoder/infer", content=body, headers=headers)
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    assert set(response.json()) == {"error"} and isinstance(response.json()["error"], str)


def test_a_bad_request_timeout_is_the_protocols_400(http):
    response = http.post("/v2/models/encoder/infer", json={"inputs": [image_input(data=[0] * 128)]},
                         headers={"X-Request-Timeout": "soon"})
    assert response.status_code == 400 and "x-request-timeout" in response.json()["error"]


def test_tritonclient_sees_the_reason(tc, digit_images):
    with pytest.raises(InferenceServerException) as wrong:
        tc.infer("encoder", [tensor("images", digit_images[:2].astype(np.float64), "FP64", True)], headers=auth())
    assert wrong.value.status() == "400" and "FP32 or UINT8" in wrong.value.message()
    with pytest.raises(InferenceServerException) as unknown:
        tc.infer("nope", [tensor("images", digit_images[:2], "UINT8", True)], headers=auth())
    assert unknown.value.status() == "404"


# -- metrics, OpenAPI ------------------------------------------------------------------------------------------
def requests_total(http: httpx.Client, endpoint: str, status: int) -> float:
    series = f'vae_requests_total{{endpoint="{endpoint}",role="model",status="{status}"}} '
    return next((float(line[len(series):]) for line in http.get("/metrics").text.splitlines()
                 if line.startswith(series)), 0.0)


def test_metrics_count_each_model_on_its_route_template(tc, http, digit_images):
    before = requests_total(http, "/v2/models/encoder/infer", 200), requests_total(http, "/v2/models/{name}/infer", 404)
    tc.infer("encoder", [tensor("images", digit_images[:1], "UINT8", True)], headers=auth())
    for name in ("nope", "x" * 40):
        http.post(f"/v2/models/{name}/versions/7/infer", json={"inputs": []})
    after = requests_total(http, "/v2/models/encoder/infer", 200), requests_total(http, "/v2/models/{name}/infer", 404)
    assert (after[0] - before[0], after[1] - before[1]) == (1, 2)
    text = http.get("/metrics").text
    assert "nope" not in text and "x" * 40 not in text


def test_the_openapi_document_lists_the_protocol(http):
    paths = http.get("/openapi.json").json()["paths"]
    for path in ("/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/{name}", "/v2/models/{name}/ready",
                 "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        assert path in paths, path
    infer = paths["/v2/models/{name}/infer"]["post"]
    assert {"application/json", "application/octet-stream"} <= set(infer["requestBody"]["content"])
    assert {"400", "404", "413", "503", "504"} <= set(infer["responses"])
