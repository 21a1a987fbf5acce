"""Tiny random Hugging Face models, built in-process from their configs, one per entry of the FFN table.

``tiny_model("gpt2")`` returns an eval-mode ``GPT2LMHeadModel`` with a 32-wide residual stream, 2 layers and a
48-wide FFN, seeded and randomly initialised: no download, no tokenizer. ``FFN_DIMS`` names, per model type,
which config field holds the FFN width and which the model width, for tests that check the resolved sizes.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM
from transformers.utils import logging as hf_logging

from kneurons.architectures import ARCHITECTURES

ALL_TYPES = sorted(ARCHITECTURES)

VOCAB = 256
D_MODEL = 32
D_FF = 48  # != D_MODEL and != 4 * D_MODEL, so a wrong default width would show
N_LAYERS = 2
N_HEADS = 4
HEAD_DIM = D_MODEL // N_HEADS
MAX_POS = 64
WINDOW = 4  # sliding-window size: smaller than the 7-token test batches, so it matters

# common shapes for BERT-like / Llama-like configs
_BERTISH = dict(vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
                intermediate_size=D_FF, max_position_embeddings=MAX_POS)
_LLAMAISH = dict(vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
                 num_key_value_heads=2, intermediate_size=D_FF, max_position_embeddings=MAX_POS)

#: model_type -> config kwargs (each config's own field names)
CONFIGS: dict[str, dict] = {
    "bert": dict(_BERTISH),
    "roberta": dict(_BERTISH, max_position_embeddings=MAX_POS + 2),  # positions start after pad_token_id
    "xlm-roberta": dict(_BERTISH, max_position_embeddings=MAX_POS + 2),
    "camembert": dict(_BERTISH, max_position_embeddings=MAX_POS + 2),
    "electra": dict(_BERTISH, embedding_size=16),
    "distilbert": dict(vocab_size=VOCAB, dim=D_MODEL, n_layers=N_LAYERS, n_heads=N_HEADS, hidden_dim=D_FF,
                       max_position_embeddings=MAX_POS),
    "modernbert": dict(_BERTISH, local_attention=WINDOW, global_attn_every_n_layers=2,
                       layer_types=["full_attention", "sliding_attention"][:N_LAYERS]),
    "gpt2": dict(vocab_size=VOCAB, n_embd=D_MODEL, n_layer=N_LAYERS, n_head=N_HEADS, n_inner=D_FF,
                 n_positions=MAX_POS),
    "gpt_neo": dict(vocab_size=VOCAB, hidden_size=D_MODEL, num_layers=N_LAYERS, num_heads=N_HEADS,
                    intermediate_size=D_FF, max_position_embeddings=MAX_POS, window_size=WINDOW,
                    attention_types=[[["global", "local"], N_LAYERS // 2]]),
    "gptj": dict(vocab_size=VOCAB, n_embd=D_MODEL, n_layer=N_LAYERS, n_head=N_HEADS, n_inner=D_FF,
                 n_positions=MAX_POS, rotary_dim=4),
    "gpt_neox": dict(_BERTISH),
    "gpt_bigcode": dict(vocab_size=VOCAB, n_embd=D_MODEL, n_layer=N_LAYERS, n_head=N_HEADS, n_inner=D_FF,
                        n_positions=MAX_POS),
    "opt": dict(vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
                ffn_dim=D_FF, word_embed_proj_dim=D_MODEL, max_position_embeddings=MAX_POS),
    "bloom": dict(vocab_size=VOCAB, hidden_size=D_MODEL, n_layer=N_LAYERS, n_head=N_HEADS),  # FFN fixed at 4x
    "falcon": dict(vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
                   ffn_hidden_size=D_FF, max_position_embeddings=MAX_POS),
    "phi": dict(_BERTISH),
    "llama": dict(_LLAMAISH),
    "mistral": dict(_LLAMAISH, head_dim=HEAD_DIM, sliding_window=WINDOW),
    "qwen2": dict(_LLAMAISH),
    "qwen3": dict(_LLAMAISH, head_dim=HEAD_DIM),
    "olmo2": dict(_LLAMAISH),
    "gemma": dict(_LLAMAISH, head_dim=HEAD_DIM),
    "gemma2": dict(_LLAMAISH, head_dim=HEAD_DIM, sliding_window=WINDOW,
                   layer_types=["sliding_attention", "full_attention"][:N_LAYERS]),
    "gemma3_text": dict(_LLAMAISH, head_dim=HEAD_DIM, sliding_window=WINDOW,
                        layer_types=["sliding_attention", "full_attention"][:N_LAYERS]),
    "phi3": dict(_LLAMAISH, original_max_position_embeddings=MAX_POS),
    "starcoder2": dict(_LLAMAISH),
}

#: model_type -> (config field of the FFN width, config field of the model width); an int is a fixed factor
#: of the model width (BLOOM's FFN is always 4 * hidden_size)
FFN_DIMS: dict[str, tuple[str | int, str]] = {t: ("intermediate_size", "hidden_size") for t in CONFIGS}
FFN_DIMS.update({
    "distilbert": ("hidden_dim", "dim"),
    "gpt2": ("n_inner", "n_embd"),
    "gptj": ("n_inner", "n_embd"),
    "gpt_bigcode": ("n_inner", "n_embd"),
    "opt": ("ffn_dim", "hidden_size"),
    "bloom": (4, "hidden_size"),
    "falcon": ("ffn_hidden_size", "hidden_size"),
})

_SPECIAL_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "cls_token_id": 1, "sep_token_id": 2,
                "mask_token_id": 3, "unk_token_id": 4, "decoder_start_token_id": 1}


def expected_dims(config) -> tuple[int, int]:
    """(d_ff, d_model) as the config states them."""
    ff_field, model_field = FFN_DIMS[config.model_type]
    d_model = getattr(config, model_field)
    d_ff = ff_field * d_model if isinstance(ff_field, int) else getattr(config, ff_field)
    return d_ff, d_model


def tiny_config(model_type: str):
    if model_type not in CONFIGS:
        raise KeyError(f"no tiny model for table entry {model_type!r}: add it to tests/tiny.py CONFIGS")
    kwargs = dict(CONFIGS[model_type])
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # default configs may name special ids outside their own default vocab
    try:
        base = AutoConfig.for_model(model_type)
    finally:
        hf_logging.set_verbosity(verbosity)
    for key, value in _SPECIAL_IDS.items():  # keep special ids inside the tiny vocabulary
        if getattr(base, key, None) is not None:
            kwargs.setdefault(key, value)
    config = AutoConfig.for_model(model_type, **kwargs)
    config._attn_implementation = "eager"
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout",
                 "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)
    return config


def tiny_model(model_type: str, kind: str | None = None, seed: int = 0, dtype: torch.dtype = torch.float32):
    """An eval-mode tiny random model of ``model_type``; ``kind`` defaults to the table's."""
    kind = kind or ARCHITECTURES[model_type].kind
    auto = {"masked": AutoModelForMaskedLM, "causal": AutoModelForCausalLM}[kind]
    config = tiny_config(model_type)
    torch.manual_seed(seed)
    model = auto.from_config(config, attn_implementation="eager")
    model.to(dtype)
    model.eval()
    return model


def random_ids(model, batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    """Random input ids that avoid the special tokens (ids below 5)."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    return torch.randint(5, vocab, (batch, seq), generator=g)
