"""The server over real HTTP on loopback: answers, refusals, concurrency, and batching parity.

Servers run uvicorn in a background thread on a free 127.0.0.1 port with one ORT thread; every
request goes through http.client. Predictions are checked against a direct, unpadded, one-text
ONNX Runtime run with transformers' tokenizer, so the server's tokenizer, its padding and its
batching are all covered by one comparison.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from deploy.batcher import MicroBatcher, QueueFull, ServedModel
from deploy.runtime import open_session
from deploy.serve import (
    BackgroundServer,
    ServeConfig,
    build_metadata,
    compact,
    create_app,
    resolve_target,
)
from mlpruning.core.contract import DEFAULT_VARIANTS, Variant
from mlpruning.core.errors import UserError
from tests.conftest import free_port

TEXTS = [
    "fine",
    "a gripping , beautifully shot film",
    "the plot never comes together and the jokes fall flat for most of the two hours .",
    "it is a sweet , funny , and ultimately moving story about growing up in a small town where "
    "nothing much happens",
    "dull",
    "an utterly charming , warm and clever movie",
]
PAIRS = [
    ["the cat sat on the mat", "a cat was sitting on a mat"],
    ["stocks fell sharply on monday", "the weather was sunny and warm all week long in the city"],
    ["yes", "no"],
]
LIMITS = dict(max_batch=8, max_wait_ms=5.0, max_texts=8, max_chars=300, max_tokens=48, max_body_bytes=4096)


def call(server: BackgroundServer, method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
    """One request on its own connection: (status, decoded JSON body)."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    try:
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def direct_scores(folder: Path, items: list[Any]) -> list[np.ndarray]:
    """Class probabilities from ORT on each item alone (no padding), tokenized by transformers."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    session = open_session(folder, threads=1)
    names = [i.name for i in session.get_inputs()]
    out = []
    for item in items:
        enc = tokenizer(*([item] if isinstance(item, str) else item), return_tensors="np")
        logits = session.run(None, {n: enc[n].astype(np.int64) for n in names})[0][0].astype(np.float64)
        probs = np.exp(logits - logits.max())
        out.append(probs / probs.sum())
    return out


def assert_matches(predictions: list[dict[str, Any]], expected: list[np.ndarray]) -> None:
    assert len(predictions) == len(expected)
    for pred, want in zip(predictions, expected, strict=True):
        got = np.array(list(pred["scores"].values()))
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        assert pred["label"] == list(pred["scores"])[int(want.argmax())]
        assert pred["score"] == pytest.approx(float(want.max()), abs=1e-5)


@pytest.fixture(scope="module")
def folder(stripped: Path) -> Path:
    return stripped / "opt"


@pytest.fixture(scope="module")
def server(folder: Path):
    with BackgroundServer(create_app(ServeConfig(folder, threads=1, **LIMITS))) as srv:
        yield srv


@pytest.fixture(scope="module")
def pair_folder(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model relabelled as an MRPC model, so the server expects text pairs."""
    out = tmp_path_factory.mktemp("pair") / "opt"
    shutil.copytree(folder, out)
    for name in ("pruning.json", "export.json"):
        meta = json.loads((out / name).read_text())
        meta["task"] = "mrpc"
        (out / name).write_text(json.dumps(meta))
    return out


def test_health_and_metadata(server: BackgroundServer, folder: Path) -> None:
    status, health = call(server, "GET", "/health")
    assert status == 200 and health["status"] == "ok"
    status, meta = call(server, "GET", "/metadata")
    assert status == 200
    assert meta["model_dir"] == str(folder) and meta["task"] == "sst2" and meta["run"] is None
    assert meta["labels"] == ["negative", "positive"] and meta["inputs"]
    assert meta["limits"]["max_texts"] == 8 and meta["limits"]["max_tokens"] == 48
    assert meta["manifest"]["task"] == "sst2" and meta["optimize"]["passes"]
    assert meta["verify"] is None and meta["bench"] is None
    assert "_indices" not in json.dumps(meta) and len(json.dumps(meta)) < 50_000


def test_predict_matches_a_direct_unbatched_run(server: BackgroundServer, folder: Path) -> None:
    expected = direct_scores(folder, TEXTS)
    status, body = call(server, "POST", "/predict", {"texts": TEXTS})  # one padded batch
    assert status == 200, body
    assert_matches(body["predictions"], expected)
    with ThreadPoolExecutor(len(TEXTS)) as pool:  # one text per request, batched across requests
        answers = list(pool.map(lambda t: call(server, "POST", "/predict", {"texts": [t]}), TEXTS))
    for (status, body), want in zip(answers, expected, strict=True):
        assert status == 200, body
        assert_matches(body["predictions"], [want])


def test_pairs(pair_folder: Path) -> None:
    with BackgroundServer(create_app(ServeConfig(pair_folder, threads=1, **LIMITS))) as srv:
        status, body = call(srv, "POST", "/predict", {"texts": PAIRS})
        assert status == 200, body
        assert_matches(body["predictions"], direct_scores(pair_folder, PAIRS))
        status, body = call(srv, "POST", "/predict", {"texts": ["a single text"]})
        assert status == 422 and "takes text pairs" in body["detail"]


def test_engine_needs_a_plan_and_a_plan_only_folder_is_served_as_one(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="has no model.plan: build one"):
        ServedModel(folder, threads=1, engine=True)
    plan_only = tmp_path / "engine"
    plan_only.mkdir()
    (plan_only / "model.plan").write_bytes(b"not built here")
    assert resolve_target(plan_only) == (plan_only, None, None)


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b'{"texts": ["unterminated', 400, "malformed JSON"),
        (b"", 400, "malformed JSON"),
        (b"\xff\xfe\xfa", 400, "malformed JSON"),
        (b'["a list"]', 422, "must be a JSON object"),
        ({}, 422, "missing field 'texts'"),
        ({"texts": []}, 422, "'texts' is empty"),
        ({"texts": "one string"}, 422, "must be a list"),
        ({"texts": [1, 2]}, 422, "texts[0] must be a string or a [text, text_pair] pair"),
        ({"texts": [None]}, 422, "got null"),
        ({"texts": [["one", "two", "three"]]}, 422, "got an array of 3 items"),
        ({"texts": [["pair", 2]]}, 422, "texts[0] must be a string"),
        ({"texts": ["ok", ""]}, 422, "texts[1] is empty"),
        ({"texts": ["ok", "   "]}, 422, "texts[1] is empty"),
        ({"texts": ["ok"], "text": "typo"}, 422, "unknown field 'text'"),
        ({"texts": [["a", "b"]]}, 422, "takes single texts"),
        ({"texts": ["ok"] * 9}, 413, "9 texts, the limit per request is 8"),
        ({"texts": ["x" * 301]}, 413, "texts[0] has 301 characters, the limit is 300"),
        ({"texts": ["ok", "word " * 50]}, 413, "texts[1] is 52 tokens long, the limit is 48"),
        (json.dumps({"texts": ["y" * 100] * 50}).encode(), 413, "the limit is 4096"),
    ],
)
def test_bad_requests_get_a_one_line_4xx(
    server: BackgroundServer, body: Any, status: int, fragment: str
) -> None:
    got, answer = call(server, "POST", "/predict", body)
    assert got == status, answer
    assert isinstance(answer["detail"], str) and "\n" not in answer["detail"]
    assert fragment in answer["detail"], answer["detail"]


def test_unknown_route_and_method(server: BackgroundServer) -> None:
    assert call(server, "GET", "/nope")[0] == 404
    assert call(server, "GET", "/predict")[0] == 405


def test_100_requests_from_8_clients(server: BackgroundServer, folder: Path) -> None:
    expected = dict(zip(TEXTS, direct_scores(folder, TEXTS), strict=True))
    requests = [TEXTS[i % 5 : i % 5 + 1 + i % 3] for i in range(100)]
    _, before = call(server, "GET", "/health")
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda texts: call(server, "POST", "/predict", {"texts": texts}), requests))
    errors = [(status, body) for status, body in answers if status != 200]
    assert not errors, errors[:3]
    for texts, (_, body) in zip(requests, answers, strict=True):
        assert_matches(body["predictions"], [expected[t] for t in texts])
    _, after = call(server, "GET", "/health")
    assert after["items"] - before["items"] == sum(map(len, requests))
    assert after["batches"] - before["batches"] < 100  # requests were batched together
    assert after["largest_batch"] > 1


def test_truncate_cuts_long_texts_to_the_limit(folder: Path) -> None:
    model = ServedModel(folder, threads=1, max_tokens=8, truncate=True)
    (enc,) = model.encode(["word " * 50])
    assert len(enc.ids) == 8 and enc.ids[-1] == model.tokenizer.token_to_id("[SEP]")
    assert model.run_batch([enc])[0]["logits"].shape == (2,)
    with pytest.raises(UserError, match="over what"):
        ServedModel(folder, max_tokens=10_000)


def test_an_engine_profile_caps_tokens_and_batch(folder: Path, tmp_path: Path, monkeypatch) -> None:
    """A TensorRT engine takes only its profile's shapes: serve limits itself to them up front."""
    import deploy.batcher

    class Engine:  # the ONNX session stands in for the engine runner (no TensorRT here)
        def __init__(self, folder: Path) -> None:
            self.session = open_session(folder, 1)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.session, name)

        def get_providers(self) -> list[str]:
            return ["TensorRT"]

    real_open = deploy.batcher.open_model

    def fake_open(folder: Path, threads: Any, provider: str, engine: bool) -> Any:
        return Engine(folder) if engine else real_open(folder, threads, provider)

    engine = tmp_path / "engine"
    shutil.copytree(folder, engine)
    (engine / "engine.json").write_text(json.dumps({"profile": {"batch": [1, 4, 8], "seq": [1, 16, 32]}}))
    monkeypatch.setattr(deploy.batcher, "open_model", fake_open)
    model = ServedModel(engine, threads=1, engine=True)
    assert (model.max_batch, model.max_tokens) == (8, 32)
    assert ServedModel(engine, threads=1).max_batch is None  # model.onnx served: no profile
    with pytest.raises(UserError, match="--max-tokens 64 is over what .* takes \\(32\\)"):
        ServedModel(engine, threads=1, max_tokens=64, engine=True)
    with pytest.raises(UserError, match="--max-batch 32 is over the engine's profile \\(8\\)"):
        create_app(ServeConfig(model_dir=engine, threads=1, engine=True))
    (engine / "engine.json").write_text(json.dumps({"profile": {"batch": [2, 4, 8], "seq": [1, 16, 32]}}))
    with pytest.raises(UserError, match="takes batches from 2 .* rebuild with --batch 1,OPT,MAX"):
        ServedModel(engine, threads=1, engine=True)
    (engine / "engine.json").write_text('{"profile": ')  # a truncated copy limits nothing: refused
    with pytest.raises(UserError, match="engine.json is not valid JSON .*: rebuild the engine"):
        ServedModel(engine, threads=1, engine=True)


def test_broken_model_folders_are_refused_at_start(folder: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "tokenizer.json").write_text("{bad")
    with pytest.raises(UserError, match="tokenizer.json is not a readable tokenizer"):
        ServedModel(broken, threads=1)
    for path in [*broken.glob("tokenizer*"), *broken.glob("vocab*")]:
        path.unlink()  # without vocabulary every word would be served as [UNK]
    with pytest.raises(UserError, match="has no tokenizer files .*: re-run export"):
        ServedModel(broken, threads=1)
    (broken / "model.onnx").write_bytes(b"")
    with pytest.raises(UserError, match="onnxruntime cannot load .*model.onnx .*: re-run the export"):
        ServedModel(broken, threads=1)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"max_batch": 0}, "max_batch must be in"),
        ({"port": 70000}, "port must be in"),
        ({"threads": 0}, "threads must be in"),
        ({"max_wait_ms": float("nan")}, "max_wait_ms must be in"),
        ({"provider": "tpu"}, "provider must be one of"),
        ({"max_queue": 4, "max_texts": 8}, "max_queue (4) must be >= max_texts (8)"),
    ],
)
def test_config_is_validated(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        ServeConfig(Path("m"), **kwargs)
    assert fragment in str(info.value)


def make_run(tmp_path: Path, folder: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(folder, run / "opt" / "step1")
    (run / "run.json").write_text("{}")
    for kind, report in (("verify", {"passed": True, "stages": []}), ("bench", {"points": [1] * 100})):
        (run / kind).mkdir()
        (run / kind / "step1.json").write_text(json.dumps(report))
    return run


def test_run_folder_serves_its_best_variant_with_its_reports(tmp_path: Path, folder: Path) -> None:
    run = make_run(tmp_path, folder)
    assert resolve_target(run) == (run / "opt" / "step1", run, "step1")
    assert resolve_target(run / "opt" / "step1")[1:] == (run.resolve(), "step1")
    assert resolve_target(folder) == (folder, None, None)
    cfg = ServeConfig(*resolve_target(run), threads=1)
    meta = build_metadata(cfg, ServedModel(cfg.model_dir, threads=1))
    assert meta["variant"] == "step1" and meta["verify"] == {"passed": True, "stages": []}
    assert meta["bench"] == {}  # a 100-long list is per-point detail: left out
    with pytest.raises(UserError, match="variant 'step2' is not in"):
        resolve_target(run, "step2")
    with pytest.raises(UserError, match="--variant needs a run folder"):
        resolve_target(folder, "step1")
    with pytest.raises(UserError, match="holds neither model.onnx"):
        resolve_target(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        resolve_target(tmp_path / "missing")


def test_an_int8_copy_is_served_only_when_named(tmp_path: Path, folder: Path) -> None:
    run = make_run(tmp_path, folder)
    step1 = Variant("step1", "step1")
    listed = [DEFAULT_VARIANTS[0], step1, step1.int8_copy(), DEFAULT_VARIANTS[0].int8_copy()]
    (run / "run.json").write_text(json.dumps({"variants": [v.to_json() for v in listed]}))
    for name in ("step1-int8", "dense-int8"):
        shutil.copytree(folder, run / "quant" / name)
    assert resolve_target(run)[1:] == (run, "step1")  # the last fp32 variant, listed before the copies
    assert resolve_target(run, "dense-int8")[0] == run / "quant" / "dense-int8"
    shutil.rmtree(run / "opt")
    assert resolve_target(run)[2] == "dense-int8"  # no fp32 model left: what there is


def test_compact_drops_per_index_lists() -> None:
    manifest = {
        "layers": [
            {
                "heads_kept": [0, 1],
                "ffn_rows_kept_indices": [1, 2],
                "blocks": {"q": {"kept_block_cols": [[0]]}},
            }
        ],
        "history": list(range(65)),
        "metric": float("nan"),
    }
    assert compact(manifest) == {"layers": [{"heads_kept": [0, 1], "blocks": {"q": {}}}], "metric": None}


def test_batcher_splits_large_requests_and_isolates_failures() -> None:
    def run_batch(items: list[int]) -> list[int]:
        if -1 in items:
            raise RuntimeError("bad item")
        return [2 * i for i in items]

    async def scenario() -> None:
        batcher = MicroBatcher(run_batch, max_batch=4, max_wait_ms=1.0, max_queue=16)
        batcher.start()
        try:
            assert await batcher.submit(list(range(10))) == [2 * i for i in range(10)]
            assert batcher.stats.largest_batch == 4 and batcher.stats.batches == 3
            with pytest.raises(RuntimeError, match="bad item"):
                await batcher.submit([-1])
            assert await batcher.submit([5]) == [10]  # the worker survived the failed batch
            with pytest.raises(QueueFull):
                await batcher.submit(list(range(17)))
        finally:
            await batcher.stop()

    asyncio.run(scenario())


def test_cli_serves_until_stopped(folder: Path) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "mlpruning.cli", "serve", str(folder), "--port", str(port), "--threads", "1"]
    proc = subprocess.Popen([*cmd, "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1].decode()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                assert conn.getresponse().status == 200
                break
            except OSError:
                assert time.monotonic() < deadline, "mlpruning serve did not answer within 120 s"
                time.sleep(0.2)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert f"serving {folder}" in out.decode()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["{tmp}/missing"], "does not exist"),
        (["{folder}", "--max-batch", "0"], "max_batch must be in"),
        (["{folder}", "--variant", "step1"], "--variant needs a run folder"),
        (["{folder}", "--log-level", "loud"], "--log-level loud"),
    ],
)
def test_cli_user_errors(args: list[str], fragment: str, folder: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mlpruning.cli import app

    argv = ["serve", *(a.format(tmp=tmp_path, folder=folder) for a in args)]
    result = CliRunner().invoke(app, argv)
    assert isinstance(result.exception, UserError), result.output
    assert fragment in str(result.exception)
