"""A zoo of tiny, randomly initialised Hugging Face models: one per ``model_type`` of the auto mappings.

``tiny_model(model_type, head)`` builds a model of that family from its own config class
(``CONFIG_MAPPING``) with every size shrunk (vocabulary 97, hidden 64, 2 layers, 4 heads, 2 KV
heads, head_dim 16, FFN 96, few small experts, no dropout, ``initializer_range`` 0.2) and returns
``(model, None)``, or ``(None, reason)`` when the family cannot be built tiny (multimodal, needs an
extra package, construction fails, ...). Nothing downloads and nothing is cached.

The shrinking is generic: standard names (resolved through each config's ``attribute_map``) and
name patterns (``*dropout*``, ``*intermediate_size``, ``*_token_id``, ...) are set where the config
class has such a field, per-layer lists are cut to two layers (keeping one of each distinct value),
and nested sub-configs are shrunk the same way. ``OVERRIDES`` holds the few family-specific fields.

``python tests/zoo.py`` builds every type of both mappings, runs a padded forward (and ``generate``
for causal LMs) and prints what was skipped, the slowest builds and the largest parameter counts.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import warnings

import torch

V = 97  # vocabulary size
HEADS = ("causal_lm", "seq_cls")

# Standard name -> tiny value; the name is resolved through the config's attribute_map, and every
# alias that is a field of the config class gets the value too.
SIZES = {
    "vocab_size": V,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 96,
    "max_position_embeddings": 128,
    "initializer_range": 0.2,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
}
ALIASES = {
    "hidden_size": ("n_embd", "n_embed", "d_model", "dim", "embed_dim", "model_dim", "embedding_size",
                    "word_embed_proj_dim"),
    "num_hidden_layers": ("n_layer", "n_layers", "num_layers", "num_blocks", "decoder_layers", "encoder_layers"),
    "num_attention_heads": ("n_head", "n_heads", "num_heads", "decoder_attention_heads",
                            "encoder_attention_heads"),
    "num_key_value_heads": ("n_kv_heads", "num_kv_heads", "multi_query_group_num", "n_head_kv"),
    "intermediate_size": ("ffn_dim", "n_inner", "decoder_ffn_dim", "encoder_ffn_dim", "d_ff",
                          "ffn_hidden_size", "inner_hidden_size", "mlp_dim", "dff", "d_inner"),
    "max_position_embeddings": ("n_positions", "n_ctx", "max_seq_len", "seq_length", "max_sequence_length"),
    "initializer_range": ("init_std",),
}
# Other fields set wherever the config class has them (MoE, MLA, SSM / linear attention, ...).
FIELDS = {
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "moe_k": 2, "moe_top_k": 2, "num_selected_experts": 2,
    "top_k": 2, "n_shared_experts": 1, "num_shared_experts": 1, "moe_num_shared_experts": 1,
    "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "num_dense_layers": 1,
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "state_size": 8, "ssm_state_size": 8, "mamba_d_state": 8, "mamba_n_heads": 4, "mamba_d_head": 32,
    "mamba_expand": 2, "mamba_n_groups": 1, "n_groups": 1, "time_step_rank": 8, "mamba_dt_rank": 8,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
    "linear_value_head_dim": 16, "rotary_dim": 8, "num_kv_shared_layers": 0, "mamba_d_ssm": 128,
    "hidden_size_global": 64, "zero_expert_num": 2,
    "vocab_size_per_layer_input": V, "hidden_size_per_layer_input": 8,
}
# (regex on a numeric field's name, value, shrink_only) for the fields not named above.
PATTERNS = (
    (re.compile(r"dropout|pdrop|drop_rate|drop_path|dropout_p$"), 0.0, False),
    (re.compile(r"(^|_)head_dim$|^dim_head$|^d_head$"), 16, True),
    (re.compile(r"(^|_)head_size$"), 16, True),
    (re.compile(r"attention_heads$|(^|_)n_heads$"), 4, True),
    (re.compile(r"num_key_value_heads$"), 2, True),
    (re.compile(r"intermediate_size$|ffn_dim$|ffn_hidden_size$|expert_dim$|^dim_ff$|feed_forward_size$"), 32, True),
    (re.compile(r"vocab_size$|_vocab$"), V, True),
    (re.compile(r"sliding_window(_size)?$|attention_window$|rel_extent$|chunk_size$"), 64, True),
    (re.compile(r"rank$"), 8, True),
    (re.compile(r"num_buckets$"), 32, True),
    (re.compile(r"(embed|embedding)_dim$"), 64, True),
)
# Fields implied by the presence of another field (MLA attention has one KV head per query head).
IMPLIED = {"kv_lora_rank": {"num_key_value_heads": 4, "head_dim": 8}}
QWEN4_EXP = {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
             "indexer_compress_ratio": 4}
# Family-specific fields (data only; nested dicts are merged into the sub-config kwargs).
OVERRIDES: dict[str, dict] = {
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "mamba2": {"head_dim": 32},
    "zaya": {"num_experts_per_tok": 1},
    "dory": {"n_input_layers": 1, "n_recurrent_layers": 1, "n_output_layers": 0},
    "dbrx": {"attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0}},
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    "zamba": {"layers_block_type": ["hybrid", "hybrid"], "attention_hidden_size": 128},
    "xmod": {"default_language": "en_XX"},
    "mistral4": {"head_dim": 16},  # partial_rotary_factor 0.5 of head_dim is qk_rope_head_dim
    "perceiver": {"num_latents": 16, "d_latents": 64, "num_self_attends_per_block": 2},
    "funnel": {"block_sizes": [1, 1], "block_repeats": [1, 1], "num_decoder_layers": 1},
    "lilt": {"hidden_size": 96},  # six 2-D position embeddings of hidden_size // 6 and 4 layout heads
    "layoutlmv3": {"coordinate_size": 8, "shape_size": 16},  # 4 * coordinate + 2 * shape == hidden
    "esmc": {"num_key_value_heads": 4},
    "distilbert": {"hidden_dim": 96},
    "canine": {"num_hash_buckets": 128},
    "markuplm": {"max_xpath_tag_unit_embeddings": 16, "max_xpath_subs_unit_embeddings": 16, "tag_pad_id": 15,
                 "subs_pad_id": 15, "max_depth": 8},
    "xlstm": {"qk_dim_factor": 1.0},  # the recurrent step's state assumes equal qk / v head dims
    "prophetnet": {"use_cache": False},  # generate() with a cache fails upstream (position_ids check)
    "reformer": {"is_decoder": True, "axial_pos_shape": (8, 16), "axial_pos_embds_dim": (32, 32)},
    "blt": {"num_hidden_layers": 2},  # generate() reads it from the top-level config
    "dots3_note_text": {"num_key_value_heads": 4, "per_layer_config": {1: {  # layer 1: sliding attention
        "head_dim": 16, "kv_lora_rank": 16, "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 32,
        "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 16}}},
    "qwen4_exp_text": QWEN4_EXP, "qwen4_exp": {"text_config": QWEN4_EXP},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    "cohere_compass_text": {"rope_parameters": {t: {"rope_type": "default", "rope_theta": 10000.0}
                                                for t in ("full_attention", "sliding_attention")}},
}
SKIP: dict[str, str] = {
    "musicgen": "audio: input_ids are codebook tokens",
    "musicgen_melody": "audio: input_ids are codebook tokens",
    "moshi": "audio: needs audio codes",
    "gemma4_assistant": "draft model: needs the target model's shared KV states",
    "gemma4_unified_assistant": "draft model: needs the target model's shared KV states",
}
_EOS = "seq-cls head pools the hidden state at <eos>: random input_ids have none"
SKIP_SEQ_CLS = dict.fromkeys(("bart", "bigbird_pegasus", "mbart", "mvp", "plbart", "t5", "mt5", "umt5"), _EOS)
MULTIMODAL = re.compile(r"vision|audio|image|video|speech|visual|(^|_)vq")


def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def seq_cls_types() -> list[str]:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    return list(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)


def _defaults(cls) -> dict:
    """Default attribute values of a config class (a default instance is cheap to build)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return dict(vars(cls()))
        except Exception:  # noqa: BLE001 - some defaults are invalid on their own
            return {f.name: f.default for f in dataclasses.fields(cls)
                    if f.default is not dataclasses.MISSING}


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()


def _cut(seq, n: int = 2) -> list:
    """First element, then the first one that differs (if any), ..., up to ``n`` elements, in order."""
    picked, seen = [], []
    for i, x in enumerate(seq):
        if x not in seen:
            picked.append(i)
            seen.append(x)
    picked = (picked + [i for i in range(len(seq)) if i not in picked])[:n]
    return [seq[i] for i in sorted(picked)]


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def tiny_kwargs(cls, model_type: str | None = None) -> dict:
    """Constructor kwargs that make a config of class ``cls`` tiny (sub-configs included)."""
    defaults, amap = _defaults(cls), dict(getattr(cls, "attribute_map", {}))
    names = _fields(cls) | {k for k in defaults if not k.startswith("_")}
    kw: dict = {}
    for std, value in SIZES.items():
        for name in {std, amap.get(std, std), *ALIASES.get(std, ())}:
            if name in names:
                kw[name] = value
    for name in sorted(names - set(kw)):
        v = defaults.get(name)
        if name in FIELDS:
            kw[name] = FIELDS[name]
        elif name.endswith("token_id") and _is_num(v) and v >= V:
            kw[name] = V - 1 - sum(k.endswith("token_id") and k not in SIZES for k in kw)
        elif _is_num(v):
            for pat, value, shrink_only in PATTERNS:
                if pat.search(name):
                    kw[name] = type(v)(min(v, value) if shrink_only else value)
                    break
    for name, implied in IMPLIED.items():
        if name in names:
            kw.update({k: v for k, v in implied.items() if k in names})
    # Per-layer lists: cut to two layers.
    n_layers = next((defaults[n] for n in ("num_hidden_layers", amap.get("num_hidden_layers"),
                                           *ALIASES["num_hidden_layers"]) if _is_num(defaults.get(n))), None)
    if n_layers and n_layers > 2:
        for name in names - set(kw):
            v = defaults.get(name)
            if isinstance(v, (list, tuple)) and len(v) == n_layers:
                kw[name] = _cut(list(v))
    # Nested configs: shrink them the same way (an AutoConfig entry: the class of its default).
    for name, sub in getattr(cls, "sub_configs", {}).items():
        if not dataclasses.is_dataclass(sub):
            sub = type(defaults.get(name))
            if not dataclasses.is_dataclass(sub):
                continue
            kw[name] = {"model_type": sub.model_type, **tiny_kwargs(sub, sub.model_type)}
        else:
            kw[name] = tiny_kwargs(sub, getattr(sub, "model_type", None))
    return _merge(kw, OVERRIDES.get(model_type, {}))


def tiny_config(model_type: str, head: str = "causal_lm"):
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    kw = tiny_kwargs(cls, model_type)
    if head == "seq_cls":
        kw["num_labels"] = 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(**kw)


def _model_class_name(model_type: str, head: str) -> str:
    from transformers.models.auto import modeling_auto as ma

    mapping = {"causal_lm": ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
               "seq_cls": ma.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES}[head]
    return mapping.get(model_type, "")


def _why(e: Exception) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    msg = lines[-1] if lines and "validation error" in lines[0] else (lines[0] if lines else "")
    return f"{type(e).__name__}: {msg[:160]}"


def tiny_model(model_type: str, head: str = "causal_lm", seed: int = 0, dtype=torch.float32):
    """Return ``(model, None)`` with a fresh tiny random model of ``model_type`` with the ``head``
    ("causal_lm" or "seq_cls", num_labels=3) in eval mode, or ``(None, reason)``."""
    from transformers import (
        CONFIG_MAPPING,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
    )

    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, not {head!r}")
    name = _model_class_name(model_type, head)
    if not name:
        return None, f"not in the {head} mapping"
    reason = SKIP.get(model_type) or (SKIP_SEQ_CLS.get(model_type) if head == "seq_cls" else None)
    if reason:
        return None, reason
    if model_type not in CONFIG_MAPPING:
        return None, "no config class"
    media = sorted(k for k in getattr(CONFIG_MAPPING[model_type], "sub_configs", {}) if MULTIMODAL.search(k))
    if media and not re.search(r"For(CausalLM|SequenceClassification)$", name):
        return None, f"multimodal ({name}): needs {', '.join(media)}"
    auto = AutoModelForCausalLM if head == "causal_lm" else AutoModelForSequenceClassification
    try:
        config = tiny_config(model_type, head)
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = auto.from_config(config)
    except ImportError as e:
        return None, f"needs an extra package: {_why(e)}"
    except Exception as e:  # noqa: BLE001 - any failure is a reason to skip
        stage = "config" if "config" not in locals() else "construction"
        return None, f"{'multimodal, ' if media else ''}{stage} raised {_why(e)}"
    towers = sorted({n.split(".")[-1] for n, _ in model.named_modules() if MULTIMODAL.search(n.split(".")[-1])})
    if towers:
        return None, f"multimodal: builds {', '.join(towers[:3])}"
    return model.to(dtype).eval(), None


@functools.cache
def _skipped(head: str) -> tuple:
    types = causal_lm_types() if head == "causal_lm" else seq_cls_types()
    return tuple((t, r) for t in types for _, r in [tiny_model(t, head)] if r is not None)


def skipped(head: str = "causal_lm") -> dict[str, str]:
    """model_type -> reason for every type of the ``head`` mapping that ``tiny_model`` cannot build."""
    return dict(_skipped(head))


def inputs(batch: int = 2, seq: int = 7, seed: int = 0):
    """``input_ids`` in [3, V) and an ``attention_mask`` whose first row is left-padded with 2 zeros."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, :2] = 0
    return ids.masked_fill(mask == 0, 1), mask


def check(model_type: str, head: str = "causal_lm") -> dict:
    """Build, run a padded forward (and greedy ``generate`` for causal LMs); return a summary."""
    import time

    t0 = time.process_time()
    model, reason = tiny_model(model_type, head)  # cold: includes importing the modeling module
    t1 = time.process_time()
    if model is not None:
        model, reason = tiny_model(model_type, head)
    out = {"type": model_type, "head": head, "cold_s": t1 - t0, "build_s": time.process_time() - t1,
           "reason": reason}
    if model is None:
        return out
    t1 = time.process_time()
    out["params"] = sum(p.numel() for p in model.parameters())
    cfg = model.config.get_text_config()
    out["notes"] = [f"{n}={v}" for n, v in vars(cfg).items()
                    if re.search(PATTERNS[0][0], n) and _is_num(v) and v > 0]
    out["notes"] += [f"{n}: Dropout(p={m.p})" for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Dropout) and m.p > 0][:2]
    if getattr(cfg, "vocab_size", V) != V:
        out["notes"].append(f"vocab_size={cfg.vocab_size}")
    ids, mask = inputs()
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        if not torch.isfinite(logits).all():
            out["error"] = "non-finite logits"
        elif logits.std() < 1e-4:
            out["error"] = f"degenerate logits (std {logits.std():.2e})"
        if head == "causal_lm":
            gen = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=1)
            assert gen.shape[1] >= ids.shape[1] + 1, tuple(gen.shape)
    except Exception as e:  # noqa: BLE001
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    out["run_s"] = time.process_time() - t1
    return out


def _main(argv: list[str]) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(2)
    heads = [h for h in argv if h in HEADS] or list(HEADS)
    only = [t for t in argv if t not in HEADS]
    for head in heads:
        results = [check(t, head) for t in (only or (causal_lm_types() if head == "causal_lm" else seq_cls_types()))]
        built = [r for r in results if r["reason"] is None]
        bad = [r for r in built if "error" in r]
        print(f"== {head}: {len(built)} built ({len(bad)} failed to run), {len(results) - len(built)} skipped")
        for r in results:
            if r["reason"] is not None:
                print(f"  skip {r['type']}: {r['reason']}")
        for r in bad:
            print(f"  FAIL {r['type']}: {r['error']}")
        for r in built:
            if r["notes"]:
                print(f"  note {r['type']}: {', '.join(r['notes'])}")
        print("  slowest builds:", ", ".join(f"{r['type']} {r['build_s']:.2f}s" for r in
                                             sorted(built, key=lambda r: -r["build_s"])[:8]))
        print("  slowest cold builds (with imports):", ", ".join(
            f"{r['type']} {r['cold_s']:.2f}s" for r in sorted(built, key=lambda r: -r["cold_s"])[:8]))
        print("  slowest forward+generate:", ", ".join(
            f"{r['type']} {r['run_s']:.2f}s" for r in sorted(built, key=lambda r: -r["run_s"])[:8]))
        print("  largest:", ", ".join(f"{r['type']} {r['params'] / 1e6:.2f}M" for r in
                                      sorted(built, key=lambda r: -r["params"])[:8]))
        big = [r["type"] for r in built if r["params"] > 3e6]
        if big:
            print("  over 3M params:", ", ".join(big))


if __name__ == "__main__":
    import sys

    _main(sys.argv[1:])
