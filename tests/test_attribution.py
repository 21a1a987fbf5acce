"""Integrated gradients: the fast engine equals the naive definition, for any batch size, on every architecture."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import PretrainedConfig

from helpers import handle_for, word_tokenizer
from kneurons import ModelHandle
from kneurons.architectures import ARCHITECTURES, register_architecture
from kneurons.attribution import Attribution, attribute, integrated_gradients, rows_per_prompt
from kneurons.errors import KneuronsError
from reference import naive_ig
from tiny import ALL_TYPES

PROMPT = "the capital of france is ___ ."
MLM_PROMPT = "the capital of [MASK] is paris ."


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _prompt(h):
    return MLM_PROMPT if h.is_masked else PROMPT


def _rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("score", ["prob", "logprob"])
@pytest.mark.parametrize("target", ["paris", "paris berlin"])
def test_fast_equals_naive_reference(model_type, score, target):
    h = handle_for(model_type, dtype=torch.float64)
    target = target if not h.is_masked else target.replace("paris", "france")
    ref = naive_ig(h, _prompt(h), target, steps=20, score=score)
    fast = integrated_gradients(h, _prompt(h), target, steps=20, score=score, batch_size=16)
    assert fast.scores.dtype == torch.float64
    assert ref.abs().max() > 0
    assert _rel_err(fast.scores, ref) <= 1e-4
    if h.is_causal:
        assert fast.params["use_cache"] is True  # the KV-cache path was the one checked


FOILS = {"causal": ["berlin", "rome", "madrid"], "masked": ["germany", "italy", "spain"]}


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("target", ["paris", "paris berlin"])
def test_contrastive_equals_naive_reference(model_type, target):
    """log P(t) - log mean P(foil), engine (foil sequences scored at the target's positions, the continuation
    cancelling) = its definition written out at the blank (log p(t_1) - log mean p(f_1)), multi-token too."""
    h = handle_for(model_type, dtype=torch.float64)
    target = target if not h.is_masked else target.replace("paris", "france")
    foils = FOILS[h.kind] + [target.split()[0] + " rome"]  # starts like the target: dropped
    ref = naive_ig(h, _prompt(h), target, steps=20, score="contrastive", foils=foils)
    fast = integrated_gradients(h, _prompt(h), target, steps=20, score="contrastive", foils=foils, batch_size=16)
    assert ref.abs().max() > 0 and _rel_err(fast.scores, ref) <= 1e-4
    assert fast.params["foils"] == FOILS[h.kind] and fast.params["score"] == "contrastive"
    # the contrast is not the target's own score: neurons that raise every answer drop out
    assert _rel_err(fast.scores, naive_ig(h, _prompt(h), target, steps=20, score="logprob")) > 1e-2


def test_contrastive_prompts_batched_equal_alone():
    h = handle_for("llama", dtype=torch.float64)
    prompts = [PROMPT, "the capital of italy is ___ .", "the city of france is ___ ."]
    kw = dict(steps=3, score="contrastive", foils=["rome", "berlin"])
    alone = [integrated_gradients(h, p, "paris", **kw) for p in prompts]
    batched = attribute(h, prompts, "paris", batch_prompts=True, **kw)
    assert batched[0].params["prompts_per_group"] == 3  # the group really shared passes
    assert all(_rel_err(b.scores, a.scores) <= 1e-10 for a, b in zip(alone, batched))


@pytest.mark.parametrize("bad, match", [({"score": "contrastive"}, "needs foils"),
                                        ({"score": "prob", "foils": ["rome"]}, "only by a contrastive"),
                                        ({"score": "contrastive", "foils": "rome"}, "a list"),
                                        ({"score": "contrastive", "foils": ["rome", " "]}, "non-empty"),
                                        ({"score": "contrastive", "foils": ["paris"]}, "no foil starts")])
def test_contrastive_bad_foils(bad, match):
    h = handle_for("gpt2")
    with pytest.raises(KneuronsError, match=match):
        integrated_gradients(h, PROMPT, "paris", steps=2, **bad)


@pytest.mark.parametrize("score", ["prob", "contrastive"])
@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_every_architecture_matches_reference(model_type, score):
    h = handle_for(model_type, dtype=torch.float64)
    target = "france" if h.is_masked else "paris"
    foils = FOILS[h.kind] if score == "contrastive" else None
    ref = naive_ig(h, _prompt(h), target, steps=4, score=score, foils=foils or ())
    # 5 rows = one layer per pass (lower blocks replayed); 1000 = every layer in one pass, so block 0 runs
    # for the rows patched at layer 0 only and is replayed for the others (KV cache cut to match)
    for bs in (5, 1000):
        fast = integrated_gradients(h, _prompt(h), target, steps=4, batch_size=bs, score=score, foils=foils)
        assert _rel_err(fast.scores, ref) <= 1e-4, bs


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama", "gemma3_text"])
def test_batch_size_invariance(model_type):
    h = handle_for(model_type, dtype=torch.float64)
    target = "france" if h.is_masked else "paris"
    runs = [integrated_gradients(h, _prompt(h), target, steps=7, batch_size=bs) for bs in (1, 3, 8, 1000)]
    for other in runs[1:]:
        assert torch.allclose(other.scores, runs[0].scores, rtol=1e-9, atol=1e-14)
        assert torch.allclose(other.baseline_scores, runs[0].baseline_scores, rtol=1e-9)


@pytest.mark.parametrize("model_type", ["llama", "bert", "gpt2"])
def test_shortcuts_do_not_change_results(model_type):
    h = handle_for(model_type, dtype=torch.float64)
    prompt, target = (MLM_PROMPT, "france") if h.is_masked else (PROMPT, "paris berlin")
    a = integrated_gradients(h, prompt, target, steps=5)
    b = integrated_gradients(h, prompt, target, steps=5, use_cache=False, replay=False,
                             head_on_scored_positions=False, fused_head=False)
    assert a.params["use_cache"] == h.is_causal and not b.params["use_cache"]
    assert a.params["head_on_scored_positions"] == h.is_masked and not b.params["head_on_scored_positions"]
    assert a.params["fused_head"] and not b.params["fused_head"]
    assert _rel_err(a.scores, b.scores) <= 1e-10
    assert torch.allclose(a.baseline_scores, b.baseline_scores, rtol=1e-10)
    c = integrated_gradients(h, prompt, target, steps=5, use_cache=False)
    assert _rel_err(c.scores, b.scores) <= 1e-10


@pytest.mark.parametrize("model_type, merged", [("gpt2", True), ("llama", True), ("bloom", False),
                                                ("gpt_neo", False), ("gemma3_text", False)])
def test_prefix_cache_from_the_clean_run(model_type, merged):
    # plain dynamic caches take the prefix's KV cache from the clean run; sliding-window caches (gemma3_text) and
    # blocks returning extra tensors (bloom, gpt_neo: the fallback after a merged attempt) run the prefix apart
    h = handle_for(model_type, dtype=torch.float64)
    got = integrated_gradients(h, PROMPT, "paris", steps=4)
    assert got.params["prefix_from_clean_run"] is merged and got.params["use_cache"] is True
    assert _rel_err(got.scores, naive_ig(h, PROMPT, "paris", steps=4)) <= 1e-6


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("steps", [1, 2, 3])
def test_few_steps_match_reference(model_type, steps):
    # the alpha = 1 term comes from the clean run's backward pass; with m = 1 it is the whole sum
    h = handle_for(model_type, dtype=torch.float64)
    prompt, target = (MLM_PROMPT, "france") if h.is_masked else (PROMPT, "paris berlin")
    ref = naive_ig(h, prompt, target, steps=steps)
    for bs in (1, 1000):
        got = integrated_gradients(h, prompt, target, steps=steps, batch_size=bs)
        assert _rel_err(got.scores, ref) <= 1e-6, bs  # float64 round-off on scores ~1e-8
        assert torch.isfinite(got.baseline_scores).all()


def test_fused_head_over_many_vocabulary_chunks(monkeypatch):
    # chunk the 256-word vocabulary into 16-row pieces (the online log-sum-exp crosses 16 chunks)
    h = handle_for("bert", dtype=torch.float64)
    one = integrated_gradients(h, MLM_PROMPT, "france", steps=4)
    monkeypatch.setattr("kneurons.attribution.head.HEAD_CHUNK_BYTES", 1)
    many = integrated_gradients(h, MLM_PROMPT, "france", steps=4)
    plain = integrated_gradients(h, MLM_PROMPT, "france", steps=4, fused_head=False)
    assert many.params["fused_head"] and not plain.params["fused_head"]
    assert _rel_err(many.scores, plain.scores) <= 1e-12 and _rel_err(one.scores, plain.scores) <= 1e-12
    assert torch.allclose(many.baseline_scores, plain.baseline_scores, rtol=1e-12)


def test_fused_head_function_against_log_softmax():
    from kneurons.attribution.head import HeadLogProb as _HeadLogProb

    torch.manual_seed(0)
    x = torch.randn(5, 8, dtype=torch.float64) * 3
    w, b = torch.randn(37, 8, dtype=torch.float64), torch.randn(37, dtype=torch.float64)
    tgt = torch.tensor([0, 36, 5, 5, 17])
    for chunk, bias in ((7, b), (37, None), (100, b)):
        xa = x.clone().requires_grad_(True)
        ref = torch.log_softmax(torch.nn.functional.linear(xa, w, bias), -1)[torch.arange(5), tgt]
        g_ref, = torch.autograd.grad(ref.sum(), xa)
        xb = x.clone().requires_grad_(True)
        got = _HeadLogProb.apply(xb, w, bias, tgt, chunk, True)
        g_got, = torch.autograd.grad(got.sum(), xb)
        assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)
        assert torch.allclose(g_got, g_ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: _HeadLogProb.apply(t, w, b, tgt, 7, True), (x.clone().requires_grad_(True),))
    # several tokens per row (the seam for scores over several target sequences, e.g. foils): [N, K] -> [N, K]
    many = torch.tensor([[0, 36, 5], [5, 5, 1], [17, 2, 3], [9, 0, 36], [1, 2, 4]])
    xa = x.clone().requires_grad_(True)
    ref = torch.log_softmax(torch.nn.functional.linear(xa, w, b), -1).gather(1, many)
    g_ref, = torch.autograd.grad((ref * torch.arange(1., 4.)).sum(), xa)
    xb = x.clone().requires_grad_(True)
    got = _HeadLogProb.apply(xb, w, b, many, 7, True)
    g_got, = torch.autograd.grad((got * torch.arange(1., 4.)).sum(), xb)
    assert got.shape == (5, 3)
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12) and torch.allclose(g_got, g_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # the subclass's forward(*args, **kwargs) hides `cache`
def test_model_editing_its_logits_in_place_keeps_its_own_head():
    # e.g. Chameleon masks image tokens in the returned logits in place: the head's output seen by the check must
    # not be that same (edited) tensor, or the fused head would be chosen and the rows' placeholder written into
    from transformers import GPT2LMHeadModel

    class Masking(GPT2LMHeadModel):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits[..., 200:] = torch.finfo(out.logits.dtype).min
            return out

    h0 = handle_for("gpt2", dtype=torch.float64)
    model = Masking(h0.model.config).double().eval()
    model.load_state_dict(h0.model.state_dict())
    h = ModelHandle.from_model(model, h0.tokenizer, name="masking")
    got = integrated_gradients(h, PROMPT, "paris", steps=3)
    assert got.params["fused_head"] is False
    assert _rel_err(got.scores, naive_ig(h, PROMPT, "paris", steps=3)) <= 1e-6


def test_model_that_post_processes_logits_keeps_its_own_head():
    # Gemma-2 soft-caps its logits after the LM head: the fused head must not replace it
    h = handle_for("gemma2", dtype=torch.float64)
    assert h.model.config.final_logit_softcapping
    got = integrated_gradients(h, PROMPT, "paris", steps=4)
    assert got.params["fused_head"] is False
    assert _rel_err(got.scores, naive_ig(h, PROMPT, "paris", steps=4)) <= 1e-6  # as before the fused head


def test_completeness_converges_with_steps():
    h = handle_for("gpt2", dtype=torch.float64)
    coarse = integrated_gradients(h, PROMPT, "paris", steps=2).completeness()
    fine = integrated_gradients(h, PROMPT, "paris", steps=200).completeness()
    assert (fine.ratio - 1).abs().max() < 0.01
    assert (fine.ratio - 1).abs().max() < (coarse.ratio - 1).abs().max()


# ---------------------------------------------------------------- a toy model with known attributions

class _ToyConfig(PretrainedConfig):
    model_type = "toy_sigmoid_ig"


class _Block(nn.Module):
    def __init__(self, d_ff):
        super().__init__()
        self.ffn_out = nn.Linear(d_ff, 1, bias=False)


class _ToyLM(nn.Module):
    """logits[v] = 0 for v != target, z = c . x for the target, where x = emb(token) is the FFN activation.

    So P(target) = sigmoid(z - ln(V - 1)) and IG_i = w_i c_i / m sum_k P_k (1 - P_k), P_k at z = (k/m) c . w.
    """

    def __init__(self, vocab, d_ff, target_id):
        super().__init__()
        self.config = _ToyConfig()
        self.emb = nn.Embedding(vocab, d_ff)
        self.layers = nn.ModuleList([_Block(d_ff)])
        self.unembed = nn.Parameter(torch.zeros(vocab, 1))
        self.target_id = target_id

    def get_output_embeddings(self):
        return None

    def forward(self, input_ids, **kw):
        x = self.emb(input_ids)
        z = self.layers[0].ffn_out(x)[..., 0]
        logits = torch.zeros(*input_ids.shape, self.emb.num_embeddings, dtype=z.dtype)
        logits = torch.cat([logits[..., : self.target_id], z[..., None], logits[..., self.target_id + 1:]], -1)

        class Out:
            pass

        out = Out()
        out.logits = logits
        return out


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setattr("kneurons.architectures.ARCHITECTURES", dict(ARCHITECTURES))
    register_architecture("toy_sigmoid_ig", kind="causal", layers="layers", ffn_out="ffn_out", unembedding="unembed")
    tok = word_tokenizer("causal")
    target_id = tok("paris", add_special_tokens=False)["input_ids"][0]
    torch.manual_seed(3)
    model = _ToyLM(len(tok), 6, target_id).double()
    return ModelHandle.from_model(model, tok, name="toy")


@pytest.mark.parametrize("steps", [1, 20])
def test_toy_model_known_attribution(toy, steps):
    enc_ids = toy.tokenizer("the capital of france is", add_special_tokens=False)["input_ids"]
    w = toy.model.emb.weight[enc_ids[-1]].detach()
    c = toy.model.layers[0].ffn_out.weight[0].detach()
    V = toy.model.emb.num_embeddings
    Z = float(c @ w)
    pk = [1 / (1 + math.exp(-(k / steps * Z - math.log(V - 1)))) for k in range(1, steps + 1)]
    expected = w * c / steps * sum(p * (1 - p) for p in pk)
    got = integrated_gradients(toy, PROMPT, "paris", steps=steps)
    assert torch.allclose(got.scores[0], expected, rtol=1e-10, atol=1e-14)
    p1 = 1 / (1 + math.exp(-(Z - math.log(V - 1))))
    assert got.base_score == pytest.approx(p1, rel=1e-12)
    assert float(got.baseline_scores[0]) == pytest.approx(1 / V, rel=1e-12)


# ---------------------------------------------------------------- result object and bad input

def test_attribution_save_load_dataframe(tmp_path):
    h = handle_for("gpt2")
    a = integrated_gradients(h, PROMPT, "paris", steps=3)
    path = a.save(tmp_path / "a.safetensors")
    with pytest.raises(KneuronsError, match="exists"):
        a.save(path)
    a.save(path, overwrite=True)
    b = Attribution.load(path)
    assert torch.equal(a.scores, b.scores) and b.prompt == PROMPT and b.params == a.params
    assert b.model["model_type"] == "gpt2" and b.version
    df = a.to_dataframe()
    assert len(df) == h.n_layers * h.d_ff and set(df.columns) >= {"layer", "neuron", "score", "activation"}
    top = a.top(3)
    assert top[0][2] == float(a.scores.max()) and top[0][2] >= top[1][2] >= top[2][2]
    assert not list(tmp_path.glob(".*tmp*"))


def test_corrupt_or_missing_attribution_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01garbage")
    with pytest.raises(KneuronsError, match="not a readable"):
        Attribution.load(bad)
    with pytest.raises(KneuronsError, match="does not exist"):
        Attribution.load(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": 0}, "steps"), ({"steps": 2.5}, "steps"), ({"score": "logit"}, "score"),
    ({"batch_size": 0}, "batch_size"), ({"layers": [99]}, "layers"), ({"layers": []}, "layers is empty"),
])
def test_bad_parameters(kwargs, match):
    h = handle_for("gpt2")
    with pytest.raises(KneuronsError, match=match):
        integrated_gradients(h, PROMPT, "paris", **kwargs)


def test_target_the_model_cannot_produce():
    h = handle_for("gpt2")
    with pytest.raises(KneuronsError, match="cannot be produced"):
        integrated_gradients(h, PROMPT, "zanzibar", steps=2)


def test_attribute_many_prompts():
    h = handle_for("llama")
    res = attribute(h, [PROMPT, "paris is the capital of ___"], ["paris", "france"], steps=2)
    assert [r.target for r in res] == ["paris", "france"]
    with pytest.raises(KneuronsError, match="targets"):
        attribute(h, [PROMPT], ["a", "b"])


# paraphrases of different lengths (causal: the blank ends each prompt; masked: the blank moves)
CAUSAL_PARAPHRASES = ["the capital of france is ___", "paris is the capital of ___",
                      "a city in europe called france has as its capital ___"]
MASKED_PARAPHRASES = ["the capital of [MASK] is paris .", "[MASK] has paris as its capital city .",
                      "paris is in [MASK] ."]
# prompts run one at a time here: sliding-window KV caches (gemma2, gemma3_text, mistral) are not padded
# together, bloom/falcon/gpt_neo blocks return extra per-prompt tensors that cannot be stacked, and modernbert is
# marked off in the table (NaN at padded positions leaks through its local attention)
NOT_BATCHED = {"gemma2", "gemma3_text", "mistral", "bloom", "falcon", "gpt_neo", "modernbert"}


def _attention(h, impl: str) -> float:
    """Switch the tiny model to ``impl`` attention; the tolerance of padded-vs-unpadded comparisons with it.
    SDPA in float64 is float64 throughout (padding changes nothing beyond 1e-15). Eager attention computes its
    softmax in float32 (transformers 5.2x), so a padded batch and a single prompt differ by float32 rounding
    (measured up to 1.0e-7 relative on llama): 1e-6. Models that cannot switch stay eager."""
    if impl == "sdpa":
        try:
            h.model.set_attn_implementation("sdpa")
            return 1e-10
        except (ValueError, NotImplementedError):
            pass
    return 1e-6


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_prompts_sharing_passes_equal_one_at_a_time(model_type, impl):
    h = handle_for(model_type, dtype=torch.float64)
    tol = _attention(h, impl)
    prompts, target = (MASKED_PARAPHRASES, "france") if h.is_masked else (CAUSAL_PARAPHRASES, "paris")
    alone = [integrated_gradients(h, p, target, steps=3) for p in prompts]
    for bs in (2, 1000):  # pieces of one layer mixing prompts / every row of every prompt in one pass
        shared = attribute(h, prompts, target, steps=3, batch_size=bs, batch_prompts=True)
        for a, b in zip(shared, alone):
            assert a.prompt == b.prompt
            assert _rel_err(a.scores, b.scores) <= tol, bs
            assert torch.allclose(a.baseline_scores, b.baseline_scores, rtol=tol, atol=1e-300), bs
            assert a.base_score == b.base_score
        assert shared[0].params["prompts_per_group"] == (1 if model_type in NOT_BATCHED else 3)


def test_prompt_groups_keep_order_and_progress():
    h = handle_for("gpt2", dtype=torch.float64)
    prompts = ["the capital of france is ___", "paris is the capital of ___", "a city in europe is ___"]
    targets = ["paris", "france", "paris"]  # two targets: two groups, results in the prompts' order
    seen = []
    res = attribute(h, prompts, targets, steps=4, progress=seen.append, batch_prompts=True)
    assert [(r.prompt, r.target) for r in res] == list(zip(prompts, targets))
    assert [r.params["prompts_per_group"] for r in res] == [2, 1, 2]
    assert sum(seen) == 3 * rows_per_prompt(h, 4)
    alone = [integrated_gradients(h, p, t, steps=4) for p, t in zip(prompts, targets)]
    assert all(_rel_err(a.scores, b.scores) <= 1e-10 for a, b in zip(res, alone))
    off = attribute(h, prompts, targets, steps=4)  # default: one prompt at a time
    assert [r.params["prompts_per_group"] for r in off] == [1, 1, 1]
    with pytest.raises(KneuronsError, match="unknown option"):
        attribute(h, prompts, targets, steps=4, bogus=1)


def test_half_precision_keeps_small_probabilities():
    """fp16: the gradient of an unlikely target's probability would underflow; dP = P dlogP does not."""
    h32 = handle_for("llama", dtype=torch.float32)
    h16 = handle_for("llama", dtype=torch.float16)
    target = "paris berlin rome"  # three tokens: a tiny joint probability on a random model
    a32 = integrated_gradients(h32, PROMPT, target, steps=4)
    a16 = integrated_gradients(h16, PROMPT, target, steps=4)
    assert a32.base_prob < 1e-5
    assert (a16.scores != 0).float().mean() > 0.9
    assert _rel_err(a16.scores.double(), a32.scores.double()) < 0.05


def test_works_inside_inference_mode_and_restores_mode():
    h = handle_for("gpt2")
    h.model.train()
    with torch.inference_mode():
        a = integrated_gradients(h, PROMPT, "paris", steps=2)
    assert a.scores.abs().sum() > 0 and h.model.training
    assert all(p.requires_grad for p in h.model.parameters())


def test_model_split_over_devices_is_refused():
    h = handle_for("gpt2")
    h.model.hf_device_map = {"transformer.h.0": 0, "transformer.h.1": 1}
    with pytest.raises(KneuronsError, match="one device"):
        integrated_gradients(h, PROMPT, "paris", steps=2)
