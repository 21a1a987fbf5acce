"""Cloze prompts, target tokenization and knowledge assessing.

A cloze prompt holds exactly one blank — ``[MASK]``, ``[Y]`` or ``___`` — where the answer goes.

* **Masked LMs**: the blank becomes one mask token per target token. The score of a target is the joint
  probability of the masks' tokens from *one* forward pass, ``Π_i p(mask_i = t_i)`` (the masks are predicted
  independently, as BERT does). The attributed position (:attr:`Encoded.blank`) is the first mask.
* **Causal LMs**: the prompt is cut at the blank, which must end the sentence (only punctuation, quotes or
  brackets may follow). The score is the teacher-forced joint probability ``Π_i p(t_i | prompt, t_<i)``; the
  attributed position is the last prompt token, where the first target token is predicted.

Targets are tokenized in context: with a leading space when the blank follows whitespace, and, for causal
models, as the tokens that the prompt followed by the target adds to the prompt's own tokens.

Batches are right-padded for both model kinds: logits are only read at real positions, and for a causal model
the pads come after every position read, so they cannot influence it (attention is causal).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from .errors import KneuronsError
from .hooks import at_blanks

BLANKS = ("[MASK]", "[Y]", "___")
_BLANK_RE = re.compile(r"\[MASK\]|\[Y\]|_{3,}")
_TRAILING_OK = re.compile(r"^[\s\.\?\!,;:\"'\)\]\}»”’…\-]*$")


@dataclass(frozen=True)
class Cloze:
    text: str
    before: str
    after: str


def parse_cloze(text: str) -> Cloze:
    """Split a prompt at its one blank; errors on none or several."""
    if not isinstance(text, str) or not text.strip():
        raise KneuronsError("empty prompt")
    found = _BLANK_RE.findall(text)
    if not found:
        raise KneuronsError(f"prompt has no blank ({', '.join(BLANKS)}): {text!r}")
    if len(found) > 1:
        raise KneuronsError(f"prompt has {len(found)} blanks, expected one: {text!r}")
    m = _BLANK_RE.search(text)
    return Cloze(text, text[: m.start()], text[m.end():])


@dataclass
class Encoded:
    """One prompt+target, tokenized for scoring.

    ``input_ids``: the tokens fed to the model. ``blank``: the position whose FFN activations are attributed.
    ``score_positions[i]``: the position whose logits predict ``target_ids[i]``. ``prefix_len`` (causal): the
    number of prompt tokens (positions ``< prefix_len - 1`` never change under an intervention at ``blank``).
    """

    prompt: str
    target: str
    input_ids: list[int]
    blank: int
    score_positions: list[int]
    target_ids: list[int]
    prefix_len: int


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode(handle, prompt: str, target: str) -> Encoded:
    """Tokenize ``prompt`` (with one blank) and ``target`` for the handle's model kind."""
    tok = handle.tokenizer
    cloze = parse_cloze(prompt)
    if not isinstance(target, str) or not target.strip():
        raise KneuronsError(f"empty target for prompt {prompt!r}")
    target = target.strip()
    sep = " " if cloze.before[-1:].isspace() else ""
    if handle.is_masked:
        t_ids = _ids(tok, sep + target, special=False)
        if not t_ids:
            raise KneuronsError(f"target {target!r} becomes zero tokens with this tokenizer")
        mask = tok.mask_token
        if mask is None or tok.mask_token_id is None:
            raise KneuronsError(f"masked model {handle.name!r} has a tokenizer without a mask token")
        before = cloze.before.rstrip() + sep if sep else cloze.before
        ids = _ids(tok, before + mask * len(t_ids) + cloze.after, special=True)
        positions = [i for i, t in enumerate(ids) if t == tok.mask_token_id]
        if len(positions) != len(t_ids):
            raise KneuronsError(f"could not place {len(t_ids)} mask token(s) in prompt {prompt!r}")
        _check_length(handle, prompt, len(ids))
        _check_producible(handle, target, t_ids)
        return Encoded(prompt, target, ids, positions[0], positions, t_ids, len(ids))
    # causal
    if not _TRAILING_OK.match(cloze.after):
        raise KneuronsError(f"for a causal model the blank must end the prompt (only punctuation may follow): {prompt!r}")
    before = cloze.before.rstrip()
    if not before:
        raise KneuronsError(f"for a causal model the prompt needs text before the blank: {prompt!r}")
    core = _ids(tok, before, special=False)
    full = _ids(tok, before + sep + target, special=False)
    if full[: len(core)] == core and len(full) > len(core):
        t_ids = full[len(core):]
    else:
        t_ids = _ids(tok, sep + target, special=False)
    if not t_ids:
        raise KneuronsError(f"target {target!r} becomes zero tokens with this tokenizer")
    prefix = _ids(tok, before, special=True)
    eos = getattr(tok, "eos_token_id", None)
    if eos is not None and len(prefix) > len(core) and prefix[-1] == eos and (not core or core[-1] != eos):
        prefix = prefix[:-1]
    if not prefix:
        raise KneuronsError(f"prompt {prompt!r} becomes zero tokens with this tokenizer")
    ids = prefix + t_ids[:-1]
    _check_length(handle, prompt, len(ids))
    _check_producible(handle, target, t_ids)
    blank = len(prefix) - 1
    return Encoded(prompt, target, ids, blank, [blank + i for i in range(len(t_ids))], t_ids, len(prefix))


#: config fields that hold a model's context length (the first one present is used)
_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def config_int(config, names, default=None):
    """The first of the config fields ``names`` that holds a positive integer, else ``default``."""
    for name in names:
        v = getattr(config, name, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return default


def context_length(handle) -> int | None:
    """The number of positions the model takes, from its config (``None`` if the config does not say)."""
    return config_int(getattr(handle.model, "config", None), _CONTEXT_FIELDS)


def _check_producible(handle, target: str, t_ids: list[int]) -> None:
    """A target the model cannot output is no answer to score: ids beyond the output vocabulary, or a word the
    tokenizer maps to its unknown token (scoring it would score [UNK])."""
    vocab = _vocab_size(handle)
    if any(t >= vocab for t in t_ids):
        raise KneuronsError(f"target {target!r} has token ids outside the model's output vocabulary ({vocab})")
    tok = handle.tokenizer
    unk, unk_tok = getattr(tok, "unk_token_id", None), getattr(tok, "unk_token", None)
    if unk is not None and unk in t_ids and (unk_tok or "") not in target:
        raise KneuronsError(f"target {target!r} cannot be produced by the model: the tokenizer maps it to the "
                            f"unknown token {unk_tok!r}")


def _check_length(handle, prompt: str, n: int) -> None:
    limit = context_length(handle)
    if limit is not None and n > limit:
        short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        raise KneuronsError(f"prompt {short!r} is {n} tokens with its target; {handle.name!r} takes at most {limit}")


def pad_batch(encs: list[Encoded], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a list of encodings; return ``input_ids`` and ``attention_mask``."""
    n = max(len(e.input_ids) for e in encs)
    ids = torch.full((len(encs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encs), n), dtype=torch.long)
    for r, e in enumerate(encs):
        ids[r, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[r, : len(e.input_ids)] = 1
    return ids.to(device), mask.to(device)


def pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0


@dataclass
class Prediction:
    token: str
    token_id: int
    prob: float


@dataclass
class Assessment:
    """How a model answers one cloze prompt.

    ``prob``: joint target probability (see module docstring); ``rank``: 1-based rank of the first target token
    at the first blank position, ties counted against the target (1 + the number of *other* tokens at least as
    probable: a target tied with another token is not ranked first, so a flat distribution ranks it last);
    ``correct``: every target token is strictly more probable than every other token at its position.
    """

    prompt: str
    target: str
    prob: float
    logprob: float
    rank: int
    correct: bool
    n_target_tokens: int
    top: list[Prediction] = field(default_factory=list)
    candidate_rank: int | None = None  # rank of the first target token among the candidates' first tokens

    def as_dict(self) -> dict:
        return {"prompt": self.prompt, "target": self.target, "prob": self.prob, "rank": self.rank,
                "correct": self.correct, "top": ", ".join(f"{p.token.strip() or repr(p.token)} ({p.prob:.3f})" for p in self.top)}


def assess(handle, prompts, targets, top_k: int = 5, batch_size: int = 32, candidates=None) -> list[Assessment]:
    """Score each prompt with its target (``targets`` may be one string for all prompts).

    ``candidates``: answers to rank the target among (one list for all prompts, or one list per prompt), as in
    PARAREL's and LAMA's restricted-candidate evaluation: :attr:`Assessment.candidate_rank` is 1 + the number of
    candidates whose *first* token is more probable at the blank than the target's first token (candidates that
    start with the same token as the target do not count).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(targets, str):
        targets = [targets] * len(prompts)
    if len(targets) != len(prompts):
        raise KneuronsError(f"{len(prompts)} prompts but {len(targets)} targets")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise KneuronsError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    vocab = _vocab_size(handle)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab:
        raise KneuronsError(f"top_k must be an integer from 1 to the vocabulary size ({vocab}), got {top_k!r}")
    encs = [encode(handle, p, t) for p, t in zip(prompts, targets)]
    cand_ids = _candidate_ids(handle, encs, candidates) if candidates is not None else None
    tok = handle.tokenizer
    out: list[Assessment] = []
    for start in range(0, len(encs), batch_size):
        chunk = encs[start: start + batch_size]
        ids, mask = pad_batch(chunk, pad_id(tok), handle.device)
        with torch.inference_mode(), at_blanks(handle.model, torch.tensor([e.blank for e in chunk])):
            logits = _scored_logits(handle, ids, mask, chunk)  # [rows, target tokens, vocab]
        for r, e in enumerate(chunk):
            logp = torch.log_softmax(logits[r, : len(e.target_ids)].double(), dim=-1)
            if len(chunk) > 1 and torch.isnan(logp).any():
                # some attention implementations turn padding into NaN that leaks into real positions (e.g.
                # eager Gemma-2 with a sliding window): score this row alone, without padding
                one, one_mask = pad_batch([e], pad_id(tok), handle.device)
                with torch.inference_mode(), at_blanks(handle.model, torch.tensor([e.blank])):
                    logp = torch.log_softmax(_scored_logits(handle, one, one_mask, [e])[0].double(), dim=-1)
            if torch.isnan(logp).any():  # NaN logits, or +inf (log-softmax of +inf is NaN)
                raise KneuronsError(
                    f"the model's output for {e.prompt!r} is not finite (NaN or infinite logits): its weights hold "
                    f"NaN/inf, or an edit or intervention pushed values past the range of {handle.dtype}")
            tgt = torch.tensor(e.target_ids, device=logp.device)
            lp = float(logp.gather(-1, tgt[:, None]).sum())
            first = logp[0]
            rank = _rank(first, tgt[:1])
            others = logp.clone()
            others[torch.arange(len(tgt), device=logp.device), tgt] = -math.inf
            correct = bool((logp.gather(-1, tgt[:, None])[:, 0] > others.amax(-1)).all())
            probs, idx = first.exp().topk(top_k)
            top = [Prediction(tok.decode([int(i)]), int(i), float(p)) for p, i in zip(probs, idx)]
            crank = None
            if cand_ids is not None:
                ids_c = cand_ids[start + r]
                ids_c = ids_c[ids_c != tgt[0]]
                crank = int((first[ids_c] >= first[tgt[0]]).sum()) + 1  # ties count against the target
            out.append(Assessment(e.prompt, e.target, math.exp(lp), lp, rank, correct, len(e.target_ids), top,
                                  crank))
    return out


def _rank(logp: torch.Tensor, target: torch.Tensor) -> int:
    """1 + the number of tokens other than ``target`` (a one-element tensor) at least as probable as it (the
    count of tokens ``>=`` the target includes the target itself; NaN was ruled out before)."""
    return int((logp >= logp[target]).sum())


def _vocab_size(handle) -> int:
    out = handle.model.get_output_embeddings() if hasattr(handle.model, "get_output_embeddings") else None
    w = getattr(out, "weight", None)
    if w is not None and w.dim() == 2:
        return int(w.shape[0])
    return int(getattr(handle.model.config, "vocab_size", None) or len(handle.tokenizer))


def perplexity_of(assessments) -> float:
    """exp of the mean −log p(target) over assessments: the paper's intra/inter-relation perplexity (NaN for none).
    The one perplexity of the package: :func:`kneurons.interventions.perplexity` and the experiments use it."""
    res = list(assessments)
    return math.exp(-sum(a.logprob for a in res) / len(res)) if res else float("nan")


def _scored_logits(handle, ids: torch.Tensor, mask: torch.Tensor, chunk: list[Encoded]) -> torch.Tensor:
    """Logits at each row's scored positions, ``[rows, max target tokens, vocab]``.

    The LM head (and final norm) run only at those positions: a forward hook cuts the last block's output to
    them (everything after the last block works position by position). If the model does not return a
    ``[batch, seq, d]`` output from its last block, the full logits are computed and gathered instead."""
    n = max(len(e.score_positions) for e in chunk)
    pos = torch.tensor([list(e.score_positions) + [e.score_positions[0]] * (n - len(e.score_positions))
                        for e in chunk], device=ids.device)
    rows = torch.arange(len(chunk), device=ids.device)[:, None]
    cut = {"done": False}

    def hook(mod, args, out):
        h = out[0] if isinstance(out, tuple) else out
        if not isinstance(h, torch.Tensor) or h.dim() != 3 or h.shape[:2] != ids.shape:
            return None
        cut["done"] = True
        return (h[rows, pos],) + tuple(out[1:]) if isinstance(out, tuple) else h[rows, pos]

    arch = handle.arch
    # the architecture table says whether the last block's output may be cut (GPT-2 reshapes after it: no);
    # "probe" is settled on the first call and kept in the handle's declared capabilities (the engine uses the
    # same entry)
    allowed = False if arch.guessed else getattr(arch.spec, "head_on_scored_positions", "probe")
    if allowed == "probe":
        allowed = handle.capabilities.get("head_on_scored_positions", "probe")
    if allowed is not False:
        hd = arch.layers[arch.n_layers - 1].register_forward_hook(hook)
        try:
            logits = handle.model(input_ids=ids, attention_mask=mask).logits
        except RuntimeError as exc:  # only while probing: a model that reshapes after its last block fails here
            if allowed is True or isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
                raise
            logits = None
        finally:
            hd.remove()
        if logits is not None and cut["done"] and logits.shape[1] == n:
            if allowed == "probe":
                handle.capabilities["head_on_scored_positions"] = True
            return logits
        if allowed is True:
            raise KneuronsError(f"model type {arch.spec.model_type!r}: the table says its last block's output can be "
                                "cut to the scored positions, but it could not; set head_on_scored_positions to "
                                "'probe' or False for it (register_architecture / arch_overrides)")
        handle.capabilities["head_on_scored_positions"] = False
        if logits is not None and not cut["done"] and logits.shape[1] == ids.shape[1]:
            return logits[rows, pos]  # the hook found no [batch, seq, width] output to cut: these are full logits
    return handle.model(input_ids=ids, attention_mask=mask).logits[rows, pos]


def _candidate_ids(handle, encs: list[Encoded], candidates) -> list[torch.Tensor]:
    """First-token ids of the candidate answers of each prompt (tokenized in that prompt's context)."""
    per_prompt = (candidates if candidates and not isinstance(candidates[0], str) else [candidates] * len(encs))
    if len(per_prompt) != len(encs):
        raise KneuronsError(f"{len(encs)} prompts but {len(per_prompt)} candidate lists")
    # A candidate's first token depends on the prompt only through the text just before the blank (the leading
    # space, and pre-tokenizers split at whitespace): memoize on the last word and the spaces before the blank.
    memo: dict[tuple[str, str], int] = {}
    out = []
    for e, cands in zip(encs, per_prompt):
        if isinstance(cands, str) or not cands:
            raise KneuronsError("candidates must be a non-empty list of answers")
        context = re.search(r"\S*\s*$", parse_cloze(e.prompt).before).group(0)
        ids = set()
        for c in cands:
            key = (context, c)
            if key not in memo:
                try:
                    memo[key] = encode(handle, e.prompt, c).target_ids[0]
                except KneuronsError:  # e.g. a candidate the tokenizer cannot spell: it cannot compete
                    memo[key] = None
            if memo[key] is not None:
                ids.add(memo[key])
        out.append(torch.tensor(sorted(ids), dtype=torch.long, device=handle.device))
    return out
