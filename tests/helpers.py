"""Real Hugging Face tokenizers built in-process (no download) for tests on tiny models."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["[PAD]", "[UNK]", "[MASK]", "[CLS]", "[SEP]"]
WORDS = ("the capital of france is paris . germany berlin italy rome spain madrid city country "
         "lives in a b c d e f g h was born located language speaks french german").split()


def word_tokenizer(kind: str, words=WORDS) -> PreTrainedTokenizerFast:
    """Whitespace/punctuation word-level tokenizer; masked models get [CLS] ... [SEP] and a [MASK] token."""
    vocab = {w: i for i, w in enumerate(SPECIALS + list(dict.fromkeys(words)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if kind == "masked":
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                       mask_token="[MASK]", cls_token="[CLS]", sep_token="[SEP]")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def handle_for(model_type: str, dtype=None, seed: int = 0):
    """A ModelHandle over a tiny random model of ``model_type`` with a word-level tokenizer."""
    from kneurons import ModelHandle
    from kneurons.architectures import ARCHITECTURES
    from tiny import tiny_model

    model = tiny_model(model_type, seed=seed)
    if dtype is not None:
        model = model.to(dtype)
    return ModelHandle.from_model(model, word_tokenizer(ARCHITECTURES[model_type].kind))
