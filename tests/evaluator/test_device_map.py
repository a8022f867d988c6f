"""A model larger than one device: ``device_map`` (transformers + accelerate) loads it spread over
devices, and the evaluator feeds its first device. On a CPU-only machine the only real split is
CPU + disk offload, which installs the same accelerate hooks a multi-GPU map does."""

from __future__ import annotations

import gc
import importlib.util

import pytest
import torch

from evaluator import ModelError, StreamingEvaluator, load_model

from .helpers import V, full_nll, tiny_gpt2

pytest.importorskip("accelerate")

# Layer 1 lives on disk: accelerate loads its weights for each forward (an AlignDevicesHook).
SPLIT = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu", "transformer.h.0": "cpu",
         "transformer.h.1": "disk", "transformer.ln_f": "cpu", "lm_head": "cpu"}


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "gpt2"
    tiny_gpt2(n_positions=64).save_pretrained(d)
    return d


def test_a_split_model_is_dispatched_and_stays_where_the_map_put_it(folder):
    a = load_model(str(folder), device_map=SPLIT)
    assert a.dispatched and a.input_device() == torch.device("cpu")
    offloaded = a.module.transformer.h[1].attn.c_attn.weight
    assert offloaded.device.type == "meta"  # on disk: loaded per forward by the hook
    a.to(torch.device("cpu"))
    assert a.module.transformer.h[1].attn.c_attn.weight.device.type == "meta"  # not moved by to()
    assert not a.split  # only the whole model answers on its input device
    assert a._layer_devices() == {0: torch.device("cpu"), 1: torch.device("cpu")}
    with pytest.raises(ModelError, match="device map") as e:
        a.to(torch.device("meta"))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("mode,n", [("sliding", 200), ("kv-cache", 60)])
def test_split_model_equals_the_single_device_model_and_the_full_forward(folder, mode, n):
    x = torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(1))
    kw = dict(chunk_size=16, device=None, mode=mode, verbose=False)
    one = StreamingEvaluator(str(folder), **{**kw, "device": "cpu"}).evaluate_streaming(x)
    split = StreamingEvaluator(str(folder), device_map=SPLIT, **kw).evaluate_streaming(x)
    assert split["mode"] == one["mode"] == mode
    assert split["total_tokens"] == one["total_tokens"] == n - 1
    assert split["nll_sum"] == pytest.approx(one["nll_sum"], rel=1e-9)
    if mode == "kv-cache":  # carried cache over 4 chunks == one forward of the whole stream
        ref = full_nll(load_model(str(folder)).module, x)
        assert split["nll_sum"] == pytest.approx(float(ref.sum()), rel=1e-5)


def test_the_offload_folder_is_ours_and_goes_with_the_model(folder, tmp_path):
    # tempfile's folder is tmp_path in these tests (conftest): the offload folder appears there
    a = load_model(str(folder), device_map=SPLIT)
    made = list(tmp_path.glob("streameval-offload-*"))
    assert len(made) == 1  # where accelerate may write layer 1's weights (safetensors are read in place)
    del a
    gc.collect()
    assert not made[0].exists()


def test_a_failed_load_leaves_no_offload_folder(tmp_path):
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(ModelError, match="cannot load model"):
        load_model(str(tmp_path / "not-a-model"), device_map="auto")
    assert not list(tmp_path.glob("streameval-offload-*"))


def test_device_map_needs_a_model_by_name(folder):
    with pytest.raises(ModelError, match="models loaded by name") as e:
        load_model(tiny_gpt2(), device_map="auto")
    assert "\n" not in str(e.value)


def test_device_map_without_accelerate_says_what_to_install(folder, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    with pytest.raises(ModelError, match="needs accelerate") as e:
        load_model(str(folder), device_map="auto")
    assert "\n" not in str(e.value)


def test_cli_device_map_gives_the_single_device_numbers(make_store, folder, tmp_path, capsys):
    import json

    import numpy as np

    from evaluator.cli import main

    rng = np.random.default_rng(3)
    store = make_store([rng.integers(1, V, size=int(n)).tolist() for n in rng.integers(2, 90, size=8)], vocab_size=V)
    common = ["run", str(store), "--model", str(folder), "--chunk-size", "32", "--overlap", "8", "--quiet", "--no-plots"]
    assert main(common + ["--device", "cpu", "--out", str(tmp_path / "one")]) == 0
    assert main(common + ["--device-map", json.dumps(SPLIT), "--out", str(tmp_path / "split")]) == 0
    one, split = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "split"))
    assert split["total_tokens"] == one["total_tokens"]
    assert split["nll_sum"] == pytest.approx(one["nll_sum"], rel=1e-9)
    assert split["config"]["device_map"] == SPLIT
    capsys.readouterr()
    with pytest.raises(SystemExit):  # argparse: exit 2 with one line naming the value
        main(common + ["--device-map", "everywhere"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "'everywhere' is not auto" in err


def test_a_bad_device_map_in_the_api_is_one_line():
    from evaluator import ConfigError, StreamingEvalConfig

    for bad in ("everywhere", {}, 3):
        with pytest.raises(ConfigError, match="is not a device map") as e:
            StreamingEvalConfig(device_map=bad)
        assert "\n" not in str(e.value)


def test_resume_fingerprint_sees_the_values_of_offloaded_layers(folder, tmp_path):
    from evaluator.checkpoint import _model_fingerprint

    other = tmp_path / "other"
    m = load_model(str(folder)).module
    with torch.no_grad():
        m.transformer.h[1].mlp.c_fc.weight[0, 0] += 1.0  # only the layer the map puts on disk differs
    m.save_pretrained(other)
    a, b = load_model(str(folder), device_map=SPLIT), load_model(str(other), device_map=SPLIT)
    b.name = a.name  # same name: only the values can tell them apart
    assert b.module.transformer.h[1].mlp.c_fc.weight.device.type == "meta"
    names = dict(a.parameter_values())
    assert all(t.device.type != "meta" for t in names.values()) and len(names) == len(list(a.module.parameters()))
    assert _model_fingerprint(a) != _model_fingerprint(b)
    assert _model_fingerprint(a) == _model_fingerprint(load_model(str(folder), device_map=SPLIT))
