"""Tiny Hugging Face models built from configs (no downloads) and PEFT configs for the tests."""
from __future__ import annotations

import copy

import torch

V = 97  # vocabulary size of the tiny models

CAUSAL = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "opt")
SEQ_CLS = ("bert", "roberta")
METHODS = ("prefix", "prefix_proj", "ptuning_mlp", "ptuning_lstm", "prompt")


def tiny_model(kind: str, dtype=torch.float32, seed: int = 0):
    import transformers as T

    torch.manual_seed(seed)
    common = dict(vocab_size=V, max_position_embeddings=128)
    if kind in ("llama", "mistral", "qwen2", "qwen3"):
        cls = {"llama": (T.LlamaConfig, T.LlamaForCausalLM), "mistral": (T.MistralConfig, T.MistralForCausalLM),
               "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM), "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM)}[kind]
        cfg = cls[0](hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, initializer_range=0.2, **common)
        model = cls[1](cfg)
    elif kind == "gpt2":
        cfg = T.GPT2Config(vocab_size=V, n_positions=128, n_embd=64, n_layer=2, n_head=4, initializer_range=0.2,
                           attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)
        model = T.GPT2LMHeadModel(cfg)
    elif kind == "opt":
        cfg = T.OPTConfig(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                          word_embed_proj_dim=64, init_std=0.2, dropout=0.0, attention_dropout=0.0, **common)
        model = T.OPTForCausalLM(cfg)
    elif kind in ("bert", "roberta"):
        cls = {"bert": (T.BertConfig, T.BertForSequenceClassification),
               "roberta": (T.RobertaConfig, T.RobertaForSequenceClassification)}[kind]
        cfg = cls[0](hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     initializer_range=0.2, pad_token_id=1, **common)
        model = cls[1](cfg)
    else:
        raise KeyError(kind)
    return model.to(dtype).eval()


def peft_config(method: str, task_type: str, n: int = 5):
    import peft

    if method in ("prefix", "prefix_proj"):
        return peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=n,
                                       prefix_projection=method == "prefix_proj", encoder_hidden_size=32)
    if method in ("ptuning_mlp", "ptuning_lstm"):
        return peft.PromptEncoderConfig(task_type=task_type, num_virtual_tokens=n, encoder_hidden_size=32,
                                        encoder_reparameterization_type="MLP" if method == "ptuning_mlp" else "LSTM")
    if method == "prompt":
        return peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=n, prompt_tuning_init="RANDOM")
    raise KeyError(method)


def peft_model(kind: str, method: str, dtype=torch.float32, n: int = 5, seed: int = 0):
    import peft

    base = tiny_model(kind, dtype, seed)
    task = "CAUSAL_LM" if kind in CAUSAL else "SEQ_CLS"
    torch.manual_seed(seed + 1)
    pm = peft.get_peft_model(base, peft_config(method, task, n))
    # Non-trivial encoder weights (PEFT's zero/small inits would hide layout bugs).
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad and "prompt_encoder" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    return pm.eval()


def batch(kind: str, B: int, S: int, padding: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    if B > 1 and padding != "none":
        for b in range(1, B):
            k = min(S - 1, 2 * b)
            if padding == "left":
                mask[b, :k] = 0
            else:
                mask[b, S - k:] = 0
    pad_id = 1
    ids = ids.masked_fill(mask == 0, pad_id)
    if kind in SEQ_CLS:
        labels = torch.randint(0, 3, (B,), generator=g)
    else:
        labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def clone(model):
    return copy.deepcopy(model)
