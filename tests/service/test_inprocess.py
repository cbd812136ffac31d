"""The server's pieces in process: the served predictive against a per-sample loop, the registry's
projection sharing and LRU eviction, and settings from the environment."""

from __future__ import annotations

import time
from pathlib import Path

import anyio.to_thread
import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModel, AutoTokenizer

from adapters import LoraXSClassifier, inject_lora_xs, lora_xs_layers
from adapters.bundle import load_bundle
from adapters.posteriors import make_generator
from service.app import create_app
from service.settings import Settings, settings_from
from tests.service.bundles import make_bundle, running_app


@pytest.mark.parametrize("family", ["diag", "matrix_normal"])
def test_served_predictive_equals_the_per_sample_loop(tiny_base: Path, tmp_path: Path, family: str) -> None:
    path = make_bundle(tiny_base, tmp_path / "adapters" / "alpha", name="alpha", variance=0.3, family=family)
    texts = ["a gorgeous, witty, seductive movie.", "it is a dull film", "meh"]
    client = running_app(tiny_base, tmp_path / "adapters")
    try:
        served = client.post("/v1/predict", json={"adapter": "alpha", "inputs": texts, "num_samples": 5, "seed": 9})
    finally:
        client.__exit__(None, None, None)
    bundle = load_bundle(path)
    samples = bundle.posterior.sample(5, make_generator(9))
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    base = AutoModel.from_pretrained(tiny_base).eval()
    spec = bundle.manifest.adapter
    inject_lora_xs(base, spec.target_modules, bundle.projections, alpha=spec.alpha)
    model = LoraXSClassifier(base, num_labels=2).eval()
    model.head.load_state_dict({"weight": bundle.head_weight, "bias": bundle.head_bias})
    expected = torch.zeros(len(texts), 2)
    with torch.no_grad():
        for s in range(5):
            for name, layer in lora_xs_layers(model.base).items():
                layer.core.weight.copy_(samples[name][s])
            for i, text in enumerate(texts):  # one input at a time: no padding at all
                batch = tokenizer([text], truncation=True, max_length=64, return_tensors="pt")
                expected[i] += torch.softmax(model(**batch)[0], -1) / 5
    got = torch.tensor([r["probs"] for r in served.json()["results"]])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_identical_projections_are_stored_once(tiny_base: Path, tmp_path: Path) -> None:
    make_bundle(tiny_base, tmp_path / "adapters" / "one", name="one", seed=3)
    make_bundle(tiny_base, tmp_path / "adapters" / "two", name="two", seed=3, variance=0.1)
    client = running_app(tiny_base, tmp_path / "adapters")
    try:
        registry = client.app.state.caveat.registry
        one, two = (registry.entry(n).resident for n in ("one", "two"))
        assert one.weights.projections.keys() == two.weights.projections.keys()
        assert all(one.weights.projections[m] is two.weights.projections[m] for m in one.weights.projections)
        alone = registry.used_bytes(without="two")
        assert registry.used_bytes() - alone == two.own_bytes  # the second adapter's projections cost nothing
        listed = {a["name"]: a["own_bytes"] for a in client.get("/v1/adapters").json()["adapters"]}
        assert listed == {"one": one.own_bytes, "two": two.own_bytes} and min(listed.values()) > 0
    finally:
        client.__exit__(None, None, None)


def test_lru_eviction_under_the_memory_budget_spares_pinned_adapters(tiny_base: Path, tmp_path: Path) -> None:
    adapters = tmp_path / "adapters"
    for index, name in enumerate(("a", "b")):
        make_bundle(tiny_base, adapters / name, name=name, seed=index)
    make_bundle(tiny_base, adapters / "staged" / "c", name="c", seed=2)
    bundle = load_bundle(adapters / "a")  # SVD projections depend on the base only: all three share them
    shared = sum(t.numel() * t.element_size() for p in bundle.projections.values() for t in (p.A, p.B))
    own = bundle.tensor_bytes() - shared
    budget = shared + 2.5 * own  # two adapters fit, three do not
    client = running_app(tiny_base, adapters, memory_budget_mb=budget / 2**20, pinned=["a"])
    try:
        registry = client.app.state.caveat.registry
        assert [e.state for e in registry.entries()] == ["ready", "ready"]
        assert client.post("/v1/predict", json={"adapter": "b", "inputs": ["x"]}).status_code == 200
        assert client.post("/v1/adapters", json={"path": "staged/c"}).status_code == 201
        states = {a["name"]: a["state"] for a in client.get("/v1/adapters").json()["adapters"]}
        assert states == {"a": "ready", "b": "evicted", "c": "ready"}  # b was least recently used, a is pinned
        reloaded = client.post("/v1/predict", json={"adapter": "b", "inputs": ["x"], "seed": 1})
        assert reloaded.status_code == 200 and reloaded.json()["adapter"]["name"] == "b"
        states = {a["name"]: a["state"] for a in client.get("/v1/adapters").json()["adapters"]}
        assert states == {"a": "ready", "b": "ready", "c": "evicted"}
        assert registry.used_bytes() <= registry.budget_bytes
        metrics = client.get("/metrics").text
        assert 'caveat_adapters_loaded{state="evicted"} 1.0' in metrics
        sized = {
            s.labels["adapter"]: s.value
            for family in text_string_to_metric_families(metrics)
            if family.name == "caveat_adapter_own_bytes"
            for s in family.samples
        }
        assert sized == {"a": own, "b": own}  # per resident adapter; evicted c has no series
    finally:
        client.__exit__(None, None, None)


def test_not_ready_while_loading_and_a_failed_start_says_why(tmp_path: Path) -> None:
    app = create_app(Settings(base_model=str(tmp_path / "no-such-model"), adapter_dir=tmp_path))
    with TestClient(app) as client:
        deadline = time.monotonic() + 30
        while "failed" not in client.get("/health/ready").json()["reason"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        response = client.get("/health/ready")
        assert response.status_code == 503 and "no-such-model" in response.json()["reason"]
        assert client.get("/health/live").status_code == 200
        refused = client.post("/v1/predict", json={"adapter": "a", "inputs": ["x"]})
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "NotReadyError"
        assert client.get("/v1/adapters", headers={}).status_code == 503


def test_admin_routes_are_disabled_without_a_token(tiny_base: Path, tmp_path: Path) -> None:
    app = create_app(Settings(base_model=str(tiny_base), adapter_dir=tmp_path))
    with TestClient(app) as client:
        response = client.post("/v1/adapters", json={"path": "x"}, headers={"Authorization": "Bearer anything"})
    assert response.status_code == 403 and "CAVEAT_ADMIN_TOKEN" in response.json()["error"]["message"]


def test_settings_flags_override_environment_which_overrides_defaults(tmp_path: Path) -> None:
    environ = {"CAVEAT_PORT": "9001", "CAVEAT_MAX_WAIT_MS": "7.5", "CAVEAT_PINNED": "a, b", "CAVEAT_BATCHING": "false"}
    settings = settings_from(["--port", "9002"], environ)
    assert settings.port == 9002 and settings.max_wait_ms == 7.5 and settings.pinned == ["a", "b"]
    assert settings.batching is False and settings.base_model == "minilm"
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    assert settings_from(["--admin-token-file", str(token_file)], {}).resolved_admin_token() == "s3cret"
    for bad in (["--dtype", "float8"], ["--admin-token-file", str(tmp_path / "missing")], ["--port", "-1"]):
        with pytest.raises(SystemExit) as exc:
            settings_from(bad, {})
        assert exc.value.code == 2


@pytest.mark.parametrize("family", ["diag", "matrix_normal"])
def test_glm_predictive_agrees_with_network_sampling_for_a_narrow_posterior(
    tiny_base: Path, tmp_path: Path, family: str
) -> None:
    """For a narrow posterior the linearisation is nearly exact: GLM and network sampling agree."""
    make_bundle(tiny_base, tmp_path / "adapters" / "alpha", name="alpha", variance=0.02, family=family)
    texts = ["a gorgeous, witty, seductive movie.", "it is a dull film", "meh", "the cast is strong but the plot"]
    client = running_app(tiny_base, tmp_path / "adapters")
    try:

        def ask(method: str, samples: int) -> dict:
            body = {"adapter": "alpha", "inputs": texts, "method": method, "num_samples": samples, "seed": 1}
            response = client.post("/v1/predict", json=body)
            assert response.status_code == 200, response.text
            return response.json()

        glm, sampled = ask("glm", 20_000), ask("sample", 128)
        default = client.post("/v1/predict", json={"adapter": "alpha", "inputs": texts[:1], "method": "glm"}).json()
    finally:
        client.__exit__(None, None, None)
    assert glm["method"] == "glm" and default["num_samples"] == 256
    for g, s in zip(glm["results"], sampled["results"], strict=True):
        assert g["probs"] == pytest.approx(s["probs"], abs=4 * s["uncertainty"]["mc_stderr"] + 2e-3)
        assert g["uncertainty"]["mutual_information"] > 0
        mi_g, mi_s = g["uncertainty"]["mutual_information"], s["uncertainty"]["mutual_information"]
        assert mi_g == pytest.approx(mi_s, rel=0.5)


def test_a_prediction_and_an_admin_call_never_enter_the_thread_pool(
    tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FastAPI runs plain ``def`` dependencies and routes in its thread pool: a hop per request, and one more
    thread wanting the GIL beside the model's worker. The request path has none."""
    make_bundle(tiny_base, tmp_path / "adapters" / "a", name="a")
    client = running_app(tiny_base, tmp_path / "adapters")  # admin calls carry its token
    hops = []
    run_sync = anyio.to_thread.run_sync

    async def counted(func, *args, **kwargs):
        hops.append(getattr(func, "__name__", repr(func)))
        return await run_sync(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counted)
    try:
        assert client.post("/v1/predict", json={"adapter": "a", "inputs": ["fine"]}).status_code == 200
        assert client.get("/v1/info").status_code == 200
        assert client.delete("/v1/adapters/a").status_code == 200  # an admin route: the token is checked
    finally:
        client.__exit__(None, None, None)
    assert hops == []
