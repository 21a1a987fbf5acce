"""The methods seam: integration paths (alphas, weights, baseline) and the METHODS registry, each against a
naive loop that writes the path out literally."""

from __future__ import annotations

import pytest
import torch

from helpers import handle_for
from kneurons.attribution import (METHODS, IntegrationPath, attribute, gauss_legendre, integrated_gradients,
                                  one_point, riemann_left, riemann_middle, riemann_right, riemann_trapezoid,
                                  rows_per_prompt)
from kneurons.errors import KneuronsError
from kneurons.neurons import activation_baseline, blank_activations, coarse_neurons, locate
from reference import naive_ig, naive_path

PROMPT = "the capital of france is ___ ."
MLM_PROMPT = "the capital of [MASK] is paris ."
PROMPTS = ["the capital of france is ___ .", "france has its capital in ___", "the capital city of france is ___"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _fact(h):
    return (MLM_PROMPT, "france") if h.is_masked else (PROMPT, "paris berlin")


def _rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_paths_are_the_rules_they_name():
    r = riemann_right(4)
    assert r.alphas == (0.25, 0.5, 0.75, 1.0) and r.weights == (0.25,) * 4 and r.baseline == "zero"
    assert riemann_left(4).alphas == (0.0, 0.25, 0.5, 0.75)
    assert riemann_middle(2).alphas == (0.25, 0.75)
    t = riemann_trapezoid(2)
    assert t.alphas == (0.0, 0.5, 1.0) and t.weights == (0.25, 0.5, 0.25)
    g = gauss_legendre(3)  # exact for polynomials of degree 5 on [0, 1]
    assert sum(w * a ** 5 for a, w in zip(g.alphas, g.weights)) == pytest.approx(1 / 6, rel=1e-12)
    assert one_point().alphas == (1.0,) and one_point().weights == (1.0,)
    assert riemann_right(20).factored() == ((1.0,) * 20, 20.0)  # w/m * sum, as the paper writes it
    assert t.factored() == (t.weights, 1.0)


@pytest.mark.parametrize("kwargs, match", [
    ({"alphas": (0.5, 1.5), "weights": (1, 1)}, r"\[0, 1\]"), ({"alphas": (0.5,), "weights": (1, 1)}, "as many"),
    ({"alphas": (), "weights": ()}, "as many"), ({"alphas": (0.5, 0.5), "weights": (1, 1)}, "distinct"),
    ({"alphas": (1,), "weights": (float("nan"),)}, "finite"), ({"alphas": (1,), "weights": (1,), "baseline": "mean"},
                                                               "baseline"),
])
def test_bad_paths(kwargs, match):
    with pytest.raises(KneuronsError, match=match):
        IntegrationPath(**kwargs)


@pytest.mark.parametrize("model_type", ["gpt2", "bert", "llama"])
@pytest.mark.parametrize("rule", [riemann_left, riemann_middle, riemann_trapezoid, gauss_legendre])
def test_every_rule_equals_the_path_written_out(model_type, rule):
    h = handle_for(model_type, dtype=torch.float64)
    prompt, target = _fact(h)
    path = rule(3)
    ref = naive_path(h, prompt, target, path.alphas, path.weights)
    for bs in (4, 1000):  # one layer per pass / everything in one pass
        got = integrated_gradients(h, prompt, target, path=path, batch_size=bs)
        assert _rel_err(got.scores, ref) <= 1e-6, bs
        assert got.params["path"]["rule"] == path.rule and got.params["steps"] == path.steps
    if 0.0 in path.alphas:  # the alpha = 0 point is differentiated too; its score is still the diagnostic
        assert torch.isfinite(got.baseline_scores).all()


def test_the_papers_rule_is_the_default():
    h = handle_for("llama", dtype=torch.float64)
    a = integrated_gradients(h, PROMPT, "paris", steps=5)
    b = integrated_gradients(h, PROMPT, "paris", path=riemann_right(5))
    assert torch.equal(a.scores, b.scores)
    assert a.params["method"] == "integrated_gradients" and a.params["path"]["rule"] == "riemann_right"
    assert a.params["path"]["alphas"] == [k / 5 for k in range(1, 6)] and a.params["baseline"] == "zero"


@pytest.mark.parametrize("model_type", ["gpt2", "bert"])
def test_gradient_x_activation_is_the_one_point_path(model_type):
    h = handle_for(model_type, dtype=torch.float64)
    prompt, target = _fact(h)
    seen = []
    got = integrated_gradients(h, prompt, target, method="gradient_x_activation", progress=seen.append)
    assert got.params["method"] == "gradient_x_activation" and got.params["steps"] == 1
    assert _rel_err(got.scores, naive_ig(h, prompt, target, steps=1)) <= 1e-6  # w * dP/dw at the activation
    # the clean rows and the alpha = 0 diagnostic: 2 rows per layer
    assert sum(seen) == rows_per_prompt(h, 20, method="gradient_x_activation") == 2 * h.n_layers


@pytest.mark.parametrize("model_type", ["gpt2", "bert", "llama"])
def test_a_baseline_other_than_zero(model_type):
    h = handle_for(model_type, dtype=torch.float64)
    prompt, target = _fact(h)
    torch.manual_seed(1)
    baseline = torch.randn(h.n_layers, h.d_ff, dtype=torch.float64) * 0.1
    for rule in (riemann_right, riemann_trapezoid):
        path = rule(4, baseline=baseline)
        ref = naive_path(h, prompt, target, path.alphas, path.weights, baseline=baseline)
        got = integrated_gradients(h, prompt, target, path=path, batch_size=1000)
        assert _rel_err(got.scores, ref) <= 1e-6 and got.params["baseline"] == "tensor"
    # completeness against the baseline: with many steps sum_i Attr_i -> P(w) - P(b)
    fine = integrated_gradients(h, prompt, target, path=riemann_right(200, baseline=baseline)).completeness()
    assert (fine.ratio - 1).abs().max() < 0.02
    with pytest.raises(KneuronsError, match="baseline must have shape"):
        integrated_gradients(h, prompt, target, path=riemann_right(4, baseline=baseline[:, :3]))


def test_methods_registry():
    assert list(METHODS) == ["integrated_gradients", "gradient_x_activation", "activation", "random"]
    assert all(m.description for m in METHODS.values())
    h = handle_for("gpt2")
    with pytest.raises(KneuronsError, match="does not attribute by gradients"):
        integrated_gradients(h, PROMPT, "paris", method="activation")
    with pytest.raises(KneuronsError, match="method must be one of"):
        integrated_gradients(h, PROMPT, "paris", method="saliency")
    with pytest.raises(KneuronsError, match="unknown option"):
        integrated_gradients(h, PROMPT, "paris", slice_everything=False)


# ------------------------------------------------------------------------------------ locate(method=...)

def test_locate_with_each_method():
    h = handle_for("gpt2", dtype=torch.float64)
    ig = locate(h, PROMPTS, "paris", steps=4, min_prompts=2, p=0.5)
    assert ig.method == "integrated_gradients" and ig.params["method"] == "integrated_gradients"
    assert ig.params["threshold"] == 0.2
    gxa = locate(h, PROMPTS, "paris", min_prompts=2, p=0.5, method="gradient_x_activation")
    assert gxa.method == "gradient_x_activation"
    for a, prompt in zip(gxa.attributions, PROMPTS):
        assert a.params["method"] == "gradient_x_activation"
        assert gxa.coarse[PROMPTS.index(prompt)] == coarse_neurons(naive_ig(h, prompt, "paris", steps=1), 0.2)
    act = locate(h, PROMPTS, "paris", min_prompts=2, p=0.5, method="activation")
    assert act.method == "activation" and act.params["threshold"] == 0.5  # the method's default threshold
    assert act.coarse[0] == coarse_neurons(blank_activations(h, PROMPTS[0], "paris"), 0.5)
    same = activation_baseline(h, PROMPTS, "paris", threshold=0.5, p=0.5, min_prompts=2)
    assert (same.neurons, same.coarse, same.base_probs) == (act.neurons, act.coarse, act.base_probs)
    top = locate(h, PROMPTS, "paris", min_prompts=2, p=0.5, method="activation", top_k=3)
    assert all(len(c) == 3 for c in top.coarse)
    rnd = locate(h, PROMPTS, "paris", steps=4, min_prompts=2, p=0.5, method="random", seed=3)
    assert rnd.method == "random" and len(rnd) == len(ig) and not set(rnd.neurons) & set(ig.neurons)
    assert rnd.neurons == locate(h, PROMPTS, "paris", steps=4, min_prompts=2, p=0.5, method="random", seed=3).neurons
    five = locate(h, PROMPTS, "paris", method="random", top_k=5)
    assert len(five) == 5 and five.params["count_from"] == "top_k"
    with pytest.raises(KneuronsError, match="method must be one of"):
        locate(h, PROMPTS, "paris", method="lime")


def test_batched_prompts_with_another_method():
    h = handle_for("llama", dtype=torch.float64)
    prompts = ["the capital of france is ___", "paris is the capital of ___"]
    alone = attribute(h, prompts, "paris", method="gradient_x_activation")
    shared = attribute(h, prompts, "paris", method="gradient_x_activation", batch_prompts=True)
    assert [a.params["prompts_per_group"] for a in shared] == [2, 2]
    assert all(_rel_err(a.scores, b.scores) <= 1e-10 for a, b in zip(shared, alone))


# ------------------------------------------------------------------------------------ CLI and run config

def test_cli_locate_method(capsys, tmp_path):
    import json

    from helpers import word_tokenizer
    from kneurons.cli import main
    from tiny import tiny_model

    tiny_model("llama").save_pretrained(tmp_path / "m")
    word_tokenizer("causal").save_pretrained(tmp_path / "m")
    found = {}
    for method in ("gradient_x_activation", "activation"):
        out = tmp_path / f"{method}.json"
        code = main(["locate", "--model", str(tmp_path / "m"), "--target", "paris", "--method", method, "--p", "0.5",
                     "--save", str(out)] + PROMPTS)
        assert code == 0, capsys.readouterr().err
        found[method] = json.loads(out.read_text())
        assert found[method]["method"] == method
    assert found["activation"]["params"]["threshold"] == 0.5  # the method's default threshold
    assert main(["locate", "--model", str(tmp_path / "m"), "--target", "paris", "--method", "lime"] + PROMPTS) == 2
    assert "invalid choice: 'lime'" in capsys.readouterr().err


def test_run_config_method(tmp_path):
    from kneurons.cli import _run_config, build_parser
    from kneurons.experiments.runner import RunConfig

    args = build_parser().parse_args(["run", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--method",
                                      "gradient_x_activation"])
    cfg = _run_config(args)
    assert cfg.method == "gradient_x_activation" and cfg.identity()["method"] == "gradient_x_activation"
    cfg.check()
    default = RunConfig(model="m", data=str(tmp_path))
    assert "method" not in default.identity()  # runs stored before the field existed still resume
    with pytest.raises(KneuronsError, match="method must be one of"):
        RunConfig(model="m", data=str(tmp_path), method="lime").check()


def test_locate_fact_uses_the_runs_method():
    from kneurons.experiments.common import FactItem
    from kneurons.experiments.locate import locate_fact

    h = handle_for("gpt2", dtype=torch.float64)
    item = FactItem("P36:0", "P36", "france", "paris", tuple(PROMPTS))
    rows = {r["method"]: r for r in locate_fact(h, item, steps=3, p=0.5, min_prompts=2,
                                                method="gradient_x_activation")}
    want = locate(h, PROMPTS, "paris", p=0.5, min_prompts=2, adaptive=True, method="gradient_x_activation")
    assert rows["kn"]["neurons"] == [list(n) for n in want.neurons] and set(rows) == {"kn", "activation", "random"}
