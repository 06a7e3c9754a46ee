"""Bad input gets a ValueError that says how to fix it."""
import numpy as np
import pytest
import torch

from mmaccel import AccelConfig, accelerate_vlm
from conftest import make_inputs


def test_unknown_method_lists_the_choices(tiny_models):
    model, _ = tiny_models("llava")
    with pytest.raises(ValueError, match=r"unknown method 'fastvv'.*fastv.*pool"):
        accelerate_vlm(model, method="fastvv")


@pytest.mark.parametrize("retention", [0.0, -0.1, 1.5])
def test_retention_out_of_range(tiny_models, retention):
    model, _ = tiny_models("llava")
    with pytest.raises(ValueError, match=r"retention must be in \(0, 1\]"):
        accelerate_vlm(model, method="fastv", retention=retention)
    assert getattr(model, "_mmaccel_handle", None) is None


def test_unknown_method_parameter_and_config_key(tiny_models):
    model, _ = tiny_models("llava")
    with pytest.raises(ValueError, match=r"no parameter\(s\) kk.*k, ratio"):
        accelerate_vlm(model, method="fastv", kk=3)
    with pytest.raises(ValueError, match=r"unknown config key 'retentoin'"):
        accelerate_vlm(model, config={"method": "fastv", "retentoin": 0.5})
    with pytest.raises(ValueError, match="no config file or preset named 'nope'"):
        accelerate_vlm(model, config="nope")


@pytest.mark.parametrize("knobs, message", [
    ({"prune": "flase"}, r"aim prune must be true or false, got 'flase' \(str\)"),
    ({"tau": "0.1"}, r"aim tau must be a number, got '0.1'"),
    ({"iters": 2.5}, r"aim iters must be an integer, got 2.5"),
    ({"pass_fraction": "half"}, r"aim pass_fraction must be a number, got 'half'"),
    ({"proportional_attention": 1}, r"aim proportional_attention must be true or false, got 1 \(int\)"),
])
def test_knob_of_the_wrong_type(tiny_models, knobs, message):
    """A typo'd value in a config is a string; it must not be read as true or reach a kernel."""
    model, _ = tiny_models("llava")
    with pytest.raises(ValueError, match=message):
        accelerate_vlm(model, method="aim", **knobs)
    assert getattr(model, "_mmaccel_handle", None) is None


def test_knob_types_through_yaml_and_method_specs(tmp_path):
    from mmaccel.config import parse_method_spec
    from mmaccel.methods import make_method

    (tmp_path / "bad.yaml").write_text("method: fastv\nparams:\n  k: true\n")
    with pytest.raises(ValueError, match=r"fastv k must be an integer, got True"):
        AccelConfig.load(str(tmp_path / "bad.yaml"))
    name, params = parse_method_spec("stc:similarity_threshold=high")
    with pytest.raises(ValueError, match=r"stc similarity_threshold must be a number or null"):
        make_method(name, **params)
    # what a well-typed caller passes still goes through: ints for floats, numpy scalars, None
    aim = make_method("aim", retention=1, tau=np.float32(0.2), iters=np.int64(3), prune=np.bool_(False))
    assert (aim.retention, aim.iters, bool(aim.prune)) == (1, 3, False)
    assert make_method("stc", similarity_threshold=None).similarity_threshold is None
    with pytest.raises(ValueError, match=r"aim retention must be a number or null"):
        make_method("aim", retention="0.5")


@pytest.mark.parametrize("text", ['"0.5"', "true", "'1'"])
def test_a_config_retention_that_is_not_a_number_is_refused(tmp_path, text):
    """pydantic alone reads "0.5" as 0.5 and true as 1.0 (no reduction at all); a config file is
    held to the rule every method knob is."""
    (tmp_path / "bad.yaml").write_text(f"method: fastv\nretention: {text}\n")
    with pytest.raises(ValueError, match=r"retention must be a number or null, got"):
        AccelConfig.load(str(tmp_path / "bad.yaml"))
    assert AccelConfig.load({"method": "fastv", "retention": np.float32(0.25)}).retention == 0.25


def test_model_without_vision_tower_names_supported_classes():
    from transformers import LlamaConfig, LlamaForCausalLM

    text_only = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match=r"LlamaForCausalLM.*vision tower.*LlavaForConditionalGeneration.*Qwen2VL"):
        accelerate_vlm(text_only, method="fastv")


def test_fastv_layer_beyond_depth(tiny_models):
    model, _ = tiny_models("llava")
    with pytest.raises(ValueError, match="only 4 layers"):
        accelerate_vlm(model, method="fastv", k=4)


@pytest.mark.parametrize("use_generate", [False, True])
def test_placeholder_feature_mismatch(tiny_models, use_generate):
    model, proc = tiny_models("llava")
    inputs = make_inputs(proc)
    ids = inputs["input_ids"].clone()
    first = (ids[0] == model.config.image_token_id).nonzero()[0, 0]
    ids[0, first] = proc.tokenizer.convert_tokens_to_ids("the")  # one placeholder too few
    inputs["input_ids"] = ids
    with accelerate_vlm(model, method="pool", retention=0.5):
        with pytest.raises(ValueError, match=r"15 image placeholder tokens but the images give 16 features.*processor"):
            with torch.no_grad():
                model.generate(**inputs, max_new_tokens=2) if use_generate else model(**inputs)


def test_double_acceleration_is_refused(tiny_models):
    model, _ = tiny_models("llava")
    with accelerate_vlm(model, method="pool"):
        with pytest.raises(ValueError, match="already accelerated"):
            accelerate_vlm(model, method="fastv")


def test_config_sources_agree(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: fastv\nretention: 0.3\nparams: {k: 3}\n")
    a = AccelConfig.load(path)
    b = AccelConfig.load({"method": "fastv", "retention": 0.3, "params": {"k": 3}})
    assert a == b and a.build_method().k == 3 and a.build_method().keep_fraction() == 0.3
    assert AccelConfig.load("fastv-50").build_method().keep_fraction() == 0.5
    assert AccelConfig.load(path, retention=0.5).retention == 0.5  # explicit arguments win


def test_every_bundled_preset_loads():
    from mmaccel.config import list_presets

    presets = list_presets()
    assert {"fastv-50", "aim-7x", "mustdrop-64", "hired-20", "visionzip-64"} <= set(presets)
    for name in presets:
        assert AccelConfig.load(name).build_method().name in name
