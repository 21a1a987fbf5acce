"""A synthetic fact world: a model whose knowledge we know, to prove the method end to end.

Real masked-LM weights cannot be had offline and a real model's facts are unknown ground truth, so this module
generates random entities and relations with paraphrase templates, trains a tiny BERT-type (masked) or
GPT-2-type (causal) model on them in-process until it answers the training facts, and hands it back as a
:class:`~kneurons.models.ModelHandle`. Everything is seeded.

>>> world = make_world(seed=0)
>>> handle = train_model(world, "causal", seed=0)      # ~20-60 s on 2 CPU cores
>>> world.prompts("born_in", world.subjects[0])          # paraphrases of one fact
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch

from .errors import KneuronsError

#: relation id -> paraphrase templates (the blank ends every sentence, so causal models can use them all)
TEMPLATES = {
    "born_in": ["[X] was born in [Y] .", "the birthplace of [X] is [Y] .", "[X] came into the world in [Y] .",
                "[X] is a native of the city of [Y] ."],
    "citizen_of": ["[X] is a citizen of [Y] .", "[X] holds a passport of [Y] .", "the nationality of [X] is [Y] .",
                   "[X] belongs to the nation of [Y] ."],
    "works_as": ["[X] works as a [Y] .", "the profession of [X] is [Y] .", "by trade [X] is a [Y] .",
                 "[X] earns a living as a [Y] ."],
    "speaks": ["[X] speaks [Y] .", "the mother tongue of [X] is [Y] .", "[X] talks in [Y] .",
               "the language used by [X] is [Y] ."],
    "plays": ["[X] plays the [Y] .", "the instrument of [X] is the [Y] .", "[X] performs on the [Y] .",
              "in the band [X] plays [Y] ."],
}

#: The training settings of the tests and ``examples/synthetic_world.py`` (for the 40-subject world they use): no
#: label smoothing, and training stops at the first evaluation (every 100 steps) with 90 % of the training
#: sentences answered, so the model knows its facts with moderate confidence, as a pretrained model knows facts
#: (a fixed number of steps left some seeds' models at 25-36 % and others at 93 %). The stop is reproducible
#: because training runs on one thread (see :func:`train`). Trained to 99 % with label smoothing 0.1 the
#: probabilities sit at the smoothing ceiling (~0.92) and doubling a fact's knowledge neurons lowered them.
TRAINING = {"causal": dict(steps=3000, lr=3e-3, batch_size=64, activation="relu", label_smoothing=0.0,
                           target_accuracy=0.9),
            "masked": dict(steps=3000, lr=2e-3, batch_size=64, activation="relu", label_smoothing=0.0,
                           target_accuracy=0.9)}

_SYLLABLES = ["ka", "zo", "ri", "mu", "te", "lo", "vi", "na", "qu", "be", "sa", "do", "fe", "gu", "hi", "jo",
              "xa", "ye", "wu", "pi"]


@dataclass
class World:
    subjects: list[str]
    objects: dict[str, list[str]]  # relation -> its possible objects
    facts: dict[str, dict[str, str]]  # relation -> subject -> object
    templates: dict[str, list[str]]
    seed: int = 0
    words: list[str] = field(default_factory=list)

    @property
    def relations(self) -> list[str]:
        return list(self.facts)

    def prompts(self, relation: str, subject: str) -> list[str]:
        """The paraphrase prompts of one fact, blank written ``[Y]``."""
        return [t.replace("[X]", subject) for t in self.templates[relation]]

    def sentences(self):
        """(prompt, object, relation, subject) for every fact and template."""
        for rel, facts in self.facts.items():
            for subj, obj in facts.items():
                for p in self.prompts(rel, subj):
                    yield p, obj, rel, subj

    def to_pararel(self, directory):
        """Write the world in the PARAREL layout that ``kneurons run --data`` reads: ``pararel/query_pairs.json``,
        ``pararel/patterns/<rel>.jsonl``, ``lama/relations.jsonl`` and ``bingrel/`` bags (``th_bags``: the fact's
        sentences with the answer filled in; ``h_bags``: sentences about the subject's other relations)."""
        import gzip
        import json
        from pathlib import Path

        root = Path(directory)
        (root / "pararel" / "patterns").mkdir(parents=True, exist_ok=True)
        (root / "lama").mkdir(exist_ok=True)
        (root / "bingrel").mkdir(exist_ok=True)
        pairs = {rel: [[s, o] for s, o in facts.items()] for rel, facts in self.facts.items()}
        (root / "pararel" / "query_pairs.json").write_text(json.dumps(pairs))
        meta = []
        for rel, temps in self.templates.items():
            (root / "pararel" / "patterns" / f"{rel}.jsonl").write_text(
                "".join(json.dumps({"pattern": t}) + "\n" for t in temps))
            meta.append(json.dumps({"relation": rel, "label": rel.replace("_", " "), "type": "N-1"}))
            bags = []
            for subj, obj in self.facts[rel].items():
                th = [t.replace("[X]", subj).replace("[Y]", obj) for t in temps]
                h = [t.replace("[X]", subj).replace("[Y]", self.facts[r][subj]) for r in self.relations if r != rel
                     for t in self.templates[r][:2]]
                bags.append({"th_bags": th, "h_bags": h})
            with gzip.open(root / "bingrel" / f"final_distant_allbags_{rel}_new.json.gz", "wt") as f:
                json.dump(bags, f)
        (root / "lama" / "relations.jsonl").write_text("\n".join(meta) + "\n")
        return root

    def other_object(self, relation: str, subject: str, seed: int = 0) -> str:
        """Another object of the same relation (the t' of an update)."""
        rng = random.Random(f"{seed}-{relation}-{subject}")
        choices = [o for o in self.objects[relation] if o != self.facts[relation][subject]]
        return rng.choice(choices)


def make_world(n_subjects: int = 100, n_objects: int = 8, relations: list[str] | None = None,
               seed: int = 0) -> World:
    """Random entities (invented words) and their facts for each relation in :data:`TEMPLATES`."""
    rels = list(relations or TEMPLATES)
    unknown = [r for r in rels if r not in TEMPLATES]
    if unknown:
        raise KneuronsError(f"unknown synthetic relation(s): {', '.join(unknown)}")
    if n_subjects < 2 or n_objects < 2:
        raise KneuronsError("a world needs at least 2 subjects and 2 objects per relation")
    rng = random.Random(seed)
    used: set[str] = set()

    def word(n_syll: int) -> str:
        while True:
            w = "".join(rng.choice(_SYLLABLES) for _ in range(n_syll))
            if w not in used:
                used.add(w)
                return w

    subjects = [word(3) for _ in range(n_subjects)]
    objects = {r: [word(2) for _ in range(n_objects)] for r in rels}
    facts = {r: {s: rng.choice(objects[r]) for s in subjects} for r in rels}
    templates = {r: list(TEMPLATES[r]) for r in rels}
    words = sorted({w for r in rels for t in templates[r] for w in t.split() if w not in ("[X]", "[Y]")})
    return World(subjects, objects, facts, templates, seed, words)


def build_tokenizer(world: World, kind: str):
    """A word-level Hugging Face tokenizer over the world's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[MASK]", "[CLS]", "[SEP]", "[BOS]"]
    vocab_words = specials + world.words + world.subjects + sorted({o for v in world.objects.values() for o in v})
    vocab = {w: i for i, w in enumerate(dict.fromkeys(vocab_words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if kind == "masked":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                       mask_token="[MASK]", cls_token="[CLS]", sep_token="[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]")


def tiny_config(kind: str, vocab_size: int, d_model: int = 64, n_layers: int = 4, d_ff: int = 256,
                activation: str = "gelu", attn_implementation: str = "eager"):
    """The tiny model's config; the attention implementation is fixed here, at construction (setting it on the
    config of a built model leaves the one chosen at construction in use)."""
    from transformers import BertConfig, GPT2Config

    if kind == "masked":
        return BertConfig(vocab_size=vocab_size, hidden_size=d_model, num_hidden_layers=n_layers,
                          num_attention_heads=4, intermediate_size=d_ff, max_position_embeddings=32, hidden_act=activation,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
                          attn_implementation=attn_implementation)
    if kind == "causal":
        return GPT2Config(vocab_size=vocab_size, n_embd=d_model, n_layer=n_layers, n_head=4, n_inner=d_ff,
                          n_positions=32, activation_function=activation, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=5,
                          eos_token_id=5, pad_token_id=0, attn_implementation=attn_implementation)
    raise KneuronsError(f"kind must be 'masked' or 'causal', got {kind!r}")


def build_model(world: World, kind: str, seed: int = 0, d_model: int = 64, n_layers: int = 4, d_ff: int = 256,
                activation: str = "gelu"):
    """The untrained tiny model of :func:`train` (weights from the current torch seed) with its tokenizer, as a
    :class:`~kneurons.models.ModelHandle`; load trained weights into ``handle.model`` to rebuild a trained one."""
    from transformers import BertForMaskedLM, GPT2LMHeadModel

    from .models import ModelHandle

    tok = build_tokenizer(world, kind)
    cfg = tiny_config(kind, len(tok), d_model, n_layers, d_ff, activation)
    model = (BertForMaskedLM if kind == "masked" else GPT2LMHeadModel)(cfg)
    return ModelHandle.from_model(model.eval(), tok, name=f"synthetic-{kind}-seed{seed}")


@dataclass(frozen=True)
class Trained:
    """A model trained on a world, and what its training was."""

    handle: object  # kneurons.models.ModelHandle
    accuracy: float  # training accuracy at the last evaluation
    steps: int  # optimizer steps taken
    seconds: float
    heldout: list  # (prompt, object, relation, subject) sentences kept out of training


def train(world: World, kind: str, seed: int = 0, steps: int = 3000, batch_size: int = 64, lr: float = 3e-3,
          target_accuracy: float | None = 0.99, label_smoothing: float = 0.1, d_model: int = 64, n_layers: int = 4,
          d_ff: int = 256, holdout: float = 0.0, activation: str = "gelu", threads: int | None = 1,
          log=None) -> Trained:
    """Train a tiny model on every (fact, template) sentence and return it with its training record.

    The loss is the cross-entropy of the object token at the blank (masked: the [MASK] position; causal: the
    position before the object). ``target_accuracy=None`` trains exactly ``steps`` steps; a number stops at the
    first evaluation (every 100 steps) that reaches it. Training is reproducible: everything is seeded, the
    attention implementation is fixed at construction, and it runs on ``threads`` intra-op threads (default 1,
    restored afterwards; ``None`` keeps the process setting), because a reduction split over a different number
    of threads rounds differently and training amplifies such differences (1 vs 2 threads once gave weights
    118 % apart).
    """
    from .prompts import encode

    if steps < 1 or batch_size < 1:
        raise KneuronsError("steps and batch_size must be at least 1")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        handle = build_model(world, kind, seed, d_model=d_model, n_layers=n_layers, d_ff=d_ff, activation=activation)
        model = handle.model
        sentences = list(world.sentences())
        rng = random.Random(seed)
        held = set(rng.sample(range(len(sentences)), int(holdout * len(sentences)))) if holdout else set()
        encs = [encode(handle, p, o) for i, (p, o, _, _) in enumerate(sentences) if i not in held]
        n = max(len(e.input_ids) for e in encs)
        ids = torch.zeros(len(encs), n, dtype=torch.long)
        att = torch.zeros(len(encs), n, dtype=torch.long)
        pos = torch.tensor([e.score_positions[0] for e in encs])
        tgt = torch.tensor([e.target_ids[0] for e in encs])
        for r, e in enumerate(encs):
            ids[r, : len(e.input_ids)] = torch.tensor(e.input_ids)
            att[r, : len(e.input_ids)] = 1
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
        gen = torch.Generator().manual_seed(seed)
        t0 = time.time()
        acc = 0.0
        step = 0

        def evaluate() -> float:
            model.eval()
            with torch.no_grad():
                full = model(input_ids=ids, attention_mask=att).logits
            return float((full[torch.arange(len(encs)), pos].argmax(-1) == tgt).float().mean())

        for step in range(1, steps + 1):
            model.train()
            batch = torch.randint(0, len(encs), (batch_size,), generator=gen)
            logits = model(input_ids=ids[batch], attention_mask=att[batch]).logits
            loss = torch.nn.functional.cross_entropy(logits[torch.arange(batch_size), pos[batch]], tgt[batch],
                                                     label_smoothing=label_smoothing)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if step % 100 == 0 or step == steps:
                acc = evaluate()
                if log:
                    log(f"step {step}: loss {loss.item():.3f}, training accuracy {acc:.3f}")
                if target_accuracy is not None and acc >= target_accuracy:
                    break
        model.eval()
        seconds = time.time() - t0
    finally:
        torch.set_num_threads(before)
    handle.source = (f"synthetic world (seed {world.seed}): {len(world.subjects)} subjects x {len(world.relations)} "
                     f"relations, trained {step} steps in {seconds:.0f}s, accuracy {acc:.3f}")
    return Trained(handle, acc, step, seconds, [sentences[i] for i in sorted(held)])


def train_model(world: World, kind: str, seed: int = 0, **kw):
    """:func:`train` and return only the :class:`~kneurons.models.ModelHandle` (``handle.source`` records the
    training)."""
    return train(world, kind, seed=seed, **kw).handle
