#!/usr/bin/env python
"""How honest is the engine's memory estimate? Measured peak memory of one attribution against
``params["pass_memory_estimate"]`` (:func:`kneurons.attribution.rows.pass_memory`), on a few shapes.

Run from the repository root (Linux: the peak resident set size is read from ``/proc/self/status``)::

    .venv/bin/python benchmarks/attribution_memory.py            # all shapes, ~6 min on 2 CPU cores
    .venv/bin/python benchmarks/attribution_memory.py --quick    # four shapes
    .venv/bin/python benchmarks/attribution_memory.py --device cuda   # peak allocated GPU memory instead

Each shape runs in a fresh process: a small random model built in-process (no download) with a word-level
tokenizer, a prompt of ``S`` tokens, one ``integrated_gradients`` call over all layers. On CPU the process's
peak RSS is reset just before the call (``/proc/self/clear_refs``) and the growth over the RSS before it is
the measured peak (glibc is told to return large blocks to the system at once, ``MALLOC_MMAP_THRESHOLD_``, so
that RSS follows what is live); on CUDA it is ``torch.cuda.max_memory_allocated`` over the allocated memory
before the call. ``ratio`` = measured / estimated: at most 1 means the estimate is an upper bound.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import warnings

#: (label, model type, d_model, d_ff, layers, heads, tokens S, batch_size, dtype, attention, options)
SHAPES = [
    ("llama cached", "llama", 128, 352, 4, 4, 1024, None, "float32", "sdpa", {}),
    ("llama cached, eager", "llama", 128, 352, 4, 4, 1024, 16, "float32", "eager", {}),
    ("mistral cached, sliding window 256", "mistral", 128, 352, 4, 4, 1024, None, "float32", "sdpa", {}),
    ("mistral no cache, sliding window 256", "mistral", 128, 352, 4, 4, 1024, 4, "float32", "sdpa",
     {"use_cache": False}),
    ("llama cached, float64", "llama", 128, 352, 4, 4, 512, None, "float64", "sdpa", {}),
    ("llama no cache", "llama", 128, 352, 4, 4, 1024, 4, "float32", "sdpa", {"use_cache": False}),
    ("llama no cache, eager", "llama", 128, 352, 4, 4, 1024, 4, "float32", "eager", {"use_cache": False}),
    ("llama no cache, wide FFN", "llama", 128, 1024, 4, 4, 512, 4, "float32", "sdpa", {"use_cache": False}),
    ("bert", "bert", 128, 352, 4, 4, 512, None, "float32", "sdpa", {}),
    ("bert, eager", "bert", 128, 352, 4, 8, 512, 4, "float32", "eager", {}),
    ("bert, float64", "bert", 128, 352, 4, 4, 512, 4, "float64", "sdpa", {}),
    ("gpt2 no cache, own head", "gpt2", 128, 352, 4, 4, 512, 4, "float32", "eager",
     {"use_cache": False, "fused_head": False}),
    ("gpt_neox no cache", "gpt_neox", 256, 352, 4, 4, 512, 4, "float32", "sdpa", {"use_cache": False}),
    ("opt no cache, eager", "opt", 128, 352, 4, 4, 512, 4, "float32", "eager", {"use_cache": False}),
    ("falcon no cache (sdpa keeps the weights)", "falcon", 128, 352, 4, 4, 512, 4, "float32", "sdpa",
     {"use_cache": False}),
    ("llama 8x384 (GQA) cached", "llama", 384, 1024, 8, 6, 2048, None, "float32", "sdpa", {}),
    ("llama 8x384 (GQA) no cache", "llama", 384, 1024, 8, 6, 1024, 2, "float32", "sdpa", {"use_cache": False}),
]
QUICK = ("llama cached", "llama no cache", "bert", "gpt2 no cache, own head")
VOCAB = 2000
STEPS = 4


def _config(model_type: str, d: int, f: int, layers: int, heads: int, positions: int, vocab: int):
    from transformers import AutoConfig

    special = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kv = max(1, heads // 2)
    kwargs = {
        "llama": dict(hidden_size=d, intermediate_size=f, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, max_position_embeddings=positions),
        "mistral": dict(hidden_size=d, intermediate_size=f, num_hidden_layers=layers, num_attention_heads=heads,
                        num_key_value_heads=kv, max_position_embeddings=positions, sliding_window=256),
        "bert": dict(hidden_size=d, intermediate_size=f, num_hidden_layers=layers, num_attention_heads=heads,
                     max_position_embeddings=positions),
        "gpt2": dict(n_embd=d, n_inner=f, n_layer=layers, n_head=heads, n_positions=positions),
        "gpt_neox": dict(hidden_size=d, intermediate_size=f, num_hidden_layers=layers, num_attention_heads=heads,
                         max_position_embeddings=positions),
        "opt": dict(hidden_size=d, ffn_dim=f, num_hidden_layers=layers, num_attention_heads=heads,
                    word_embed_proj_dim=d, max_position_embeddings=positions),
        "falcon": dict(hidden_size=d, ffn_hidden_size=f, num_hidden_layers=layers, num_attention_heads=heads,
                       max_position_embeddings=positions),
    }[model_type]
    return AutoConfig.for_model(model_type, vocab_size=vocab, **special, **kwargs)


def _tokenizer(masked: bool, words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[BOS]", "[EOS]", "[MASK]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if masked:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                       mask_token="[MASK]", cls_token="[CLS]", sep_token="[SEP]")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise SystemExit(f"no {key} in /proc/self/status")


def measure(shape: list, device: str) -> dict:
    """One shape, in this process: measured peak bytes and the engine's estimate."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
    from transformers.utils import logging as hf_logging

    from kneurons import ModelHandle
    from kneurons.attribution import integrated_gradients

    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    label, model_type, d, f, layers, heads, S, batch_size, dtype, attn, options = shape
    masked = model_type == "bert"
    words = [f"w{i}" for i in range(VOCAB - 7)]
    tok = _tokenizer(masked, words)
    config = _config(model_type, d, f, layers, heads, S + 16, len(tok))
    torch.manual_seed(0)
    auto = AutoModelForMaskedLM if masked else AutoModelForCausalLM
    model = auto.from_config(config, attn_implementation=attn).to(getattr(torch, dtype)).to(device).eval()
    handle = ModelHandle.from_model(model, tok)
    body = " ".join(words[i % 50] for i in range(S - (3 if masked else 1)))
    prompt = body + (" [MASK]" if masked else " ___")
    if device == "cpu":
        ctypes.CDLL(None).malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS
        before = _status("VmRSS")
    else:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    att = integrated_gradients(handle, prompt, words[3], steps=STEPS, batch_size=batch_size, **options)
    if device == "cpu":
        peak = _status("VmHWM") - before
    else:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    p = att.params
    return {"label": label, "tokens": S, "rows_per_pass": p["rows_per_pass"], "bound": p["pass_size_bound"],
            "measured": peak, "estimate": p["pass_memory_estimate"],
            "plan": "+".join(k for k in ("use_cache", "fused_head", "head_on_scored_positions") if p[k])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="four shapes only")
    ap.add_argument("--only", default=None, help="the shapes whose label contains this text")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one shape (JSON) in this process
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.one:
        print(json.dumps(measure(json.loads(args.one), args.device)))
        return 0
    if args.device == "cpu" and not os.path.exists("/proc/self/clear_refs"):
        raise SystemExit("measuring peak RSS needs Linux (/proc/self/clear_refs)")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TOKENIZERS_PARALLELISM="false")
    shapes = [s for s in SHAPES if (not args.quick or s[0] in QUICK) and (args.only is None or args.only in s[0])]
    print(f"{'shape':44} {'S':>5} {'rows':>4} {'bound':>13} {'plan':38} {'measured':>9} {'estimate':>9} {'ratio':>6}")
    ratios = []
    for shape in shapes:
        proc = subprocess.run([sys.executable, __file__, "--device", args.device, "--one", json.dumps(shape)],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(f"{shape[0]:44} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        ratio = r["measured"] / r["estimate"]
        ratios.append(ratio)
        print(f"{r['label']:44} {r['tokens']:5d} {r['rows_per_pass']:4d} {r['bound']:>13} {r['plan']:38} "
              f"{r['measured'] / 1e6:7.1f}MB {r['estimate'] / 1e6:7.1f}MB {ratio:6.2f}")
    if ratios:
        print(f"measured / estimated: min {min(ratios):.2f}, max {max(ratios):.2f} (<= 1: the estimate is an upper "
              "bound)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
