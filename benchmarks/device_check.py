"""GPU check (run on a machine with CUDA): exactness of the engine on the device, then timings.

    PYTHONPATH=src:tests python benchmarks/device_check.py

1. On tiny float64 models of several architectures, moved to CUDA: integrated gradients equal the naive reference
   (per layer, per step, full recompute), do not depend on the batch size, and prompts sharing passes
   (``attribute(..., batch_prompts=True)``) equal prompts run alone; suppress through the hook changes the
   probability; updates (paper's vectors, and head-space vectors computed on the device in float64 and bfloat16)
   revert bit-exactly.
2. GPT-2-small and BERT-base shapes (random weights) on CUDA: seconds per prompt, kneurons vs the naive loop.
"""

from __future__ import annotations

import sys
import time

import torch

sys.path.insert(0, "tests")
from helpers import word_tokenizer  # noqa: E402
from reference import naive_ig  # noqa: E402
from tiny import tiny_model  # noqa: E402

from kneurons import ModelHandle, integrated_gradients  # noqa: E402
from kneurons.attribution import attribute  # noqa: E402
from kneurons.architectures import ARCHITECTURES  # noqa: E402
from kneurons.interventions import score, suppress, target_vectors, update_fact, weights_digest  # noqa: E402


def handle(model_type, device, dtype=torch.float64):
    m = tiny_model(model_type).to(device=device, dtype=dtype)
    return ModelHandle.from_model(m, word_tokenizer(ARCHITECTURES[model_type].kind))


def exactness(device) -> bool:
    ok = True
    for t in ["bert", "roberta", "gpt2", "llama", "qwen3", "gemma3_text", "opt", "gpt_neox"]:
        h = handle(t, device)
        prompt, target = ("the capital of [MASK] is paris .", "france") if h.is_masked else (
            "the capital of france is ___ .", "paris")
        ref = naive_ig(h, prompt, target, steps=8)
        errs = []
        for bs in (9, 1000):
            a = integrated_gradients(h, prompt, target, steps=8, batch_size=bs)
            errs.append(float((a.scores - ref.cpu()).abs().max() / ref.cpu().abs().max()))
        paras = ([prompt, "[MASK] has paris as its capital city .", "paris is in [MASK] ."] if h.is_masked else
                 ["the capital of france is ___", "france has as its capital city ___", "a city called ___"])
        alone = [integrated_gradients(h, p, target, steps=4) for p in paras]
        shared = attribute(h, paras, target, steps=4, batch_prompts=True)  # rows of 3 prompts in shared passes
        errs.append(max(float((a.scores - b.scores).abs().max() / b.scores.abs().max()) for a, b in zip(shared, alone)))
        p0 = score(h, [prompt], target)[0].prob
        with torch.no_grad():
            p1 = score(h, [prompt], target, suppress(h, [(0, 1), (1, 2)]))[0].prob
        d = weights_digest(h.model)
        if not h.is_masked:
            update_fact(h, [(0, 1)], "paris", "berlin", prompt=prompt).revert()
        # head-space vectors computed on the device (and in bfloat16): finite, unit norm, the edit reverts exactly
        pair = ("france", "italy") if h.is_masked else ("paris", "berlin")
        head_ok = True
        for hh in (h, handle(t, device, torch.bfloat16)):
            dd = weights_digest(hh.model)
            vecs = target_vectors(hh, list(pair), prompt, "head")
            head_ok &= all(bool(torch.isfinite(v).all()) and abs(float(v.norm()) - 1) < 1e-6 for v in vecs)
            update_fact(hh, [(0, 1)], *pair, prompt=prompt, space="head", vectors=vecs).revert()
            head_ok &= weights_digest(hh.model) == dd
        good = max(errs) <= 1e-4 and weights_digest(h.model) == d and p1 != p0 and head_ok
        ok &= good
        print(f"  {t:<12} rel err vs naive {max(errs):.1e}  suppress changes p: {p1 != p0}  revert exact: "
              f"{weights_digest(h.model) == d}  head space (fp64, bf16): {head_ok}  {'OK' if good else 'FAIL'}")
    return ok


def timing(device):
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    words = "the capital city of the european country of france is paris".split()
    for name, model, kind, prompt in [
        ("GPT-2-small shape", GPT2LMHeadModel(GPT2Config()), "causal",
         "the capital city of the european country of france is ___"),
        ("BERT-base shape", BertForMaskedLM(BertConfig()), "masked", "the capital city of france is [MASK] ."),
    ]:
        h = ModelHandle.from_model(model.to(device).eval(), word_tokenizer(kind, words))
        integrated_gradients(h, prompt, "paris", steps=2)
        sync = torch.cuda.synchronize
        sync()
        res = {}
        for bs in (None, 252):
            t = time.time()
            for _ in range(3):
                integrated_gradients(h, prompt, "paris", steps=20, batch_size=bs)
            torch.cuda.synchronize()
            res[bs] = (time.time() - t) / 3
        t = time.time()
        naive_ig(h, prompt, "paris", steps=20)
        torch.cuda.synchronize()
        naive = time.time() - t
        print(f"  {name:<18} kneurons default {res[None]:.3f}s, all rows in one pass {res[252]:.3f}s, "
              f"naive (per step) {naive:.2f}s -> {naive / min(res.values()):.0f}x")


if __name__ == "__main__":
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {dev} ({torch.cuda.get_device_name(0) if dev == 'cuda' else 'no GPU'}), torch {torch.__version__}")
    print("exactness on the device:")
    good = exactness(dev)
    if dev == "cuda":
        print("timing:")
        timing(dev)
    sys.exit(0 if good else 1)
