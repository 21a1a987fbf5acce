"""Cloze prompts, target tokenization and batched assessing on tiny models with real HF tokenizers."""

from __future__ import annotations

import pytest
import torch

from kneurons.architectures import ARCHITECTURES

from helpers import handle_for
from kneurons import assess, encode, parse_cloze
from kneurons.errors import KneuronsError


@pytest.mark.parametrize("text", ["a [MASK] b", "a [Y] b", "a ___ b", "a _____ b"])
def test_blank_forms(text):
    c = parse_cloze(text)
    assert c.before == "a " and c.after == " b"


@pytest.mark.parametrize("text, match", [
    ("no blank here", "no blank"), ("two [MASK] and ___", "2 blanks"), ("", "empty prompt"), ("   ", "empty prompt"),
])
def test_bad_prompts(text, match):
    with pytest.raises(KneuronsError, match=match):
        parse_cloze(text)


def test_masked_encoding_one_mask_per_target_token():
    h = handle_for("bert")
    e = encode(h, "the capital of [MASK] is paris .", "france germany")
    tok = h.tokenizer
    assert [tok.convert_ids_to_tokens(i) for i in e.input_ids].count("[MASK]") == 2
    assert e.blank == e.score_positions[0] and e.score_positions[1] == e.blank + 1
    assert e.target_ids == tok("france germany", add_special_tokens=False)["input_ids"]
    assert e.input_ids[0] == tok.cls_token_id


def test_causal_encoding_cuts_at_blank_and_teacher_forces():
    h = handle_for("gpt2")
    e = encode(h, "the capital of france is ___.", "paris berlin")
    tok = h.tokenizer
    prefix = tok("the capital of france is")["input_ids"]
    assert e.input_ids == prefix + e.target_ids[:1]
    assert e.blank == len(prefix) - 1 and e.score_positions == [e.blank, e.blank + 1]


@pytest.mark.parametrize("prompt", ["the capital of ___ is paris.", "___ is the capital of france.",
                                    "the capital of france is ___ and more"])
def test_causal_blank_must_end_the_prompt(prompt):
    h = handle_for("gpt2")
    with pytest.raises(KneuronsError, match="blank must end|text before the blank"):
        encode(h, prompt, "paris")


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_empty_target(kind):
    h = handle_for(kind)
    with pytest.raises(KneuronsError, match="empty target"):
        encode(h, "the capital of france is ___.", "  ")


def test_target_with_zero_tokens(tmp_path):
    from transformers import BertTokenizerFast

    from kneurons import ModelHandle
    from tiny import tiny_model

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "capital", "of", "is", "."]))
    tok = BertTokenizerFast(vocab_file=str(vocab))
    h = ModelHandle.from_model(tiny_model("bert"), tok)
    with pytest.raises(KneuronsError, match="zero tokens"):
        encode(h, "the capital of [MASK] .", "\u200b")


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama", "opt", "gemma2"])  # gemma2: padding -> NaN
def test_batched_assessing_equals_one_by_one(model_type):
    h = handle_for(model_type, dtype=torch.float64)
    if h.is_masked:
        prompts = ["the capital of [MASK] is paris .", "[MASK] is a country .", "rome is in [MASK] , a country ."]
        targets = ["france", "italy", "italy spain"]
    else:
        prompts = ["the capital of france is ___ .", "paris is the capital of ___", "a b c d e f g h was born in ___"]
        targets = ["paris", "france", "rome madrid"]
    together = assess(h, prompts, targets, batch_size=8)
    alone = [assess(h, [p], [t])[0] for p, t in zip(prompts, targets)]
    for a, b in zip(together, alone):
        # padded vs alone: eager attention computes its softmax in float32 (rounding ~1e-8 relative)
        assert a.prob == pytest.approx(b.prob, rel=1e-7) and a.rank == b.rank
        assert [p.token_id for p in a.top] == [p.token_id for p in b.top]
    assert together[2].n_target_tokens == 2


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_assess_head_on_scored_positions_equals_full_logits(model_type):
    """assess runs the final norm + LM head only at the scored positions; the numbers equal the full logits'."""
    h = handle_for(model_type, dtype=torch.float64)
    if h.is_masked:
        prompts, targets = ["the capital of [MASK] is paris .", "rome is in [MASK] , a country ."], ["france", "italy spain"]
    else:
        prompts, targets = ["the capital of france is ___ .", "a b c d e f g h was born in ___"], ["paris", "rome madrid"]
    got = assess(h, prompts, targets, batch_size=8)
    for a, p, t in zip(got, prompts, targets):
        e = encode(h, p, t)
        with torch.no_grad():
            logp = torch.log_softmax(h.model(input_ids=torch.tensor([e.input_ids])).logits[0].double(), -1)
        lp = sum(float(logp[pos, tid]) for pos, tid in zip(e.score_positions, e.target_ids))
        assert a.logprob == pytest.approx(lp, rel=1e-7, abs=1e-12)  # padded batch: float32 softmax rounding
        first = logp[e.score_positions[0]]
        assert a.rank == int((first > first[e.target_ids[0]]).sum()) + 1


def test_assess_probability_matches_model_softmax():
    h = handle_for("llama", dtype=torch.float64)
    a = assess(h, "the capital of france is ___ .", "paris")[0]
    ids = torch.tensor([h.tokenizer("the capital of france is")["input_ids"]])
    with torch.no_grad():
        p = torch.softmax(h.model(input_ids=ids).logits[0, -1], -1)
    tid = h.tokenizer("paris", add_special_tokens=False)["input_ids"][0]
    assert a.prob == pytest.approx(float(p[tid]), rel=1e-9)
    assert a.rank == int((p > p[tid]).sum()) + 1
    assert a.top[0].token_id == int(p.argmax()) and a.correct == (a.rank == 1)


def test_assess_input_checks():
    h = handle_for("gpt2")
    with pytest.raises(KneuronsError, match="targets"):
        assess(h, ["a ___", "b ___"], ["x", "y", "z"])
    with pytest.raises(KneuronsError, match="batch_size"):
        assess(h, ["the ___"], "paris", batch_size=0)
