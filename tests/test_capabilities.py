"""Capabilities are detected from the model, features that cannot be served are refused at patch
time with an error naming the model type and the feature, and a refused patch changes nothing."""
import pytest
import torch

import ptune_fast
from ptune_fast.integrations.core import backbone_of, describe
from tests import zoo
from tests.models import batch, peft_model, tiny_model

peft = pytest.importorskip("peft")


def _tiny(model_type, **overrides):
    import transformers

    cfg = zoo.tiny_config(model_type)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def test_detected_behaviour_of_known_families():
    caps = {k: describe(tiny_model(k)) for k in ("llama", "gpt2", "opt", "bert", "roberta")}
    assert caps["llama"].positions == "cache" and caps["llama"].causal and caps["llama"].num_kv_heads == 2
    assert caps["opt"].positions == "mask" and caps["opt"].backbone == "model.decoder"  # the LM head calls the decoder
    assert caps["roberta"].positions == "padding_idx" and caps["roberta"].padding_idx == 1
    assert not caps["bert"].causal and caps["bert"].positions == "cache"
    assert backbone_of(tiny_model("gpt2")) is not None


@pytest.mark.parametrize("model_type,overrides,feature", [
    ("gemma2", {"attn_logit_softcapping": 50.0}, "softcapping"),
    ("bloom", {}, "ALiBi|attention interface"),
])
def test_unservable_features_are_refused_at_patch_time(model_type, overrides, feature):
    base = _tiny(model_type, **overrides)
    pm = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    attn = base.config._attn_implementation
    with pytest.raises(ptune_fast.UnsupportedModel, match=f"{model_type}.*({feature})"):
        ptune_fast.patch(pm)
    assert not ptune_fast.is_patched(pm) and base.config._attn_implementation == attn  # nothing changed


def test_encoder_decoder_is_refused():
    import transformers

    cfg = transformers.T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    with pytest.raises(ptune_fast.UnsupportedModel, match="encoder-decoder"):
        describe(transformers.T5ForConditionalGeneration(cfg))


def test_sliding_window_shorter_than_prefix_plus_context_raises_at_call_time():
    base = _tiny("mistral", sliding_window=6)
    pm = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    ptune_fast.patch(pm)
    ids, mask, _ = batch("llama", 2, 3, "none")
    pm(input_ids=ids, attention_mask=mask)  # 3 + 3 fits the window
    ids, mask, _ = batch("llama", 2, 5, "none")
    with pytest.raises(NotImplementedError, match="sliding window 6 is shorter than prefix \\+ context"):
        pm(input_ids=ids, attention_mask=mask)


def test_patch_twice_with_other_arguments_and_zero_tokens_raise():
    pm = peft_model("llama", "prompt")
    ptune_fast.patch(pm, prompt_pass="auto")
    assert ptune_fast.patch(pm, prompt_pass="auto") is pm
    with pytest.raises(ValueError, match="already patched with prompt_pass='auto'"):
        ptune_fast.patch(pm, prompt_pass="per_row")
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        ptune_fast.prompt_tuning(tiny_model("llama"), 0)
