from __future__ import annotations

import json

import pytest
from transformers import AutoModelForSequenceClassification

from mlpruning.core.errors import UserError
from pipeline.adapters import adapter_for, geometry, layer_linears
from pipeline.models import load_config, load_for_task, resolve_model
from pipeline.tasks import get_task


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_adapter_finds_the_six_linears_with_the_right_shapes(tiny_models, family):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models[family], num_labels=2)
    g = geometry(model)
    assert (g.num_layers, g.num_heads, g.head_dim, g.hidden, g.intermediate) == (2, 4, 8, 32, 64)
    for lin in layer_linears(model):
        for m in (lin.query, lin.key, lin.value, lin.attn_out):
            assert tuple(m.weight.shape) == (32, 32)
        assert tuple(lin.ffn_in.weight.shape) == (64, 32)
        assert tuple(lin.ffn_out.weight.shape) == (32, 64)
    # the linears are the model's own modules, not copies
    ids = {id(m) for m in model.modules()}
    assert all(id(getattr(lin, f)) in ids for lin in layer_linears(model) for f in ("query", "ffn_out"))


def test_adapter_works_on_bare_encoder_and_task_model(tiny_bert):
    from transformers import AutoModel

    bare = AutoModel.from_pretrained(tiny_bert)
    task = load_for_task(str(tiny_bert), get_task("sst2"))
    assert geometry(bare) == geometry(task)


def test_unsupported_model_type_fails_before_loading_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    with pytest.raises(UserError, match="model type 'gpt2' has no mlpruning adapter.*bert"):
        load_config(str(tmp_path))
    assert adapter_for(load_config("minilm")).family == "bert"


def test_model_resolution_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="has no config.json"):
        resolve_model(str(tmp_path))
    assert resolve_model("bert-base-uncased") == "bert-base-uncased"  # a hub id is passed through


def test_classifier_with_other_label_count_is_refused(tiny_bert, tmp_path):
    model = load_for_task(str(tiny_bert), get_task("mnli"))
    model.save_pretrained(tmp_path / "mnli")
    with pytest.raises(UserError, match="classifier with 3 labels but task sst2 has 2"):
        load_for_task(str(tmp_path / "mnli"), get_task("sst2"))
    reg = load_for_task(str(tiny_bert), get_task("stsb"))
    assert reg.config.num_labels == 1 and reg.config.problem_type == "regression"


@pytest.mark.slow
def test_minilm_geometry():
    model = load_for_task("minilm", get_task("sst2"))
    g = geometry(model)
    assert (g.num_layers, g.num_heads, g.head_dim, g.hidden, g.intermediate) == (6, 12, 32, 384, 1536)
