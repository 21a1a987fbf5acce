"""The command line: tables on stdout, one-line errors with exit code 2, nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import word_tokenizer
from kneurons.cli import main
from tiny import tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(d)
    word_tokenizer("causal").save_pretrained(d)
    return str(d)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_prints_a_table(capsys, model_dir):
    code, out, err = run(capsys, "predict", "--model", model_dir, "--target", "paris",
                         "the capital of france is ___ .", "paris is the capital of ___")
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].split()[:5] == ["prompt", "target", "prob", "rank", "top-1"]
    assert len(lines) == 4 and "the capital of france is ___ ." in lines[2]


def test_locate_saves_json(capsys, model_dir, tmp_path):
    out_file = tmp_path / "kn.json"
    code, out, err = run(capsys, "locate", "--model", model_dir, "--target", "paris", "--steps", "3", "--p", "0.5",
                         "--save", str(out_file), "the capital of france is ___ .", "france has its capital in ___",
                         "the capital city of france is ___")
    assert code == 0, err
    assert "knowledge neurons of 'paris'" in out and "P(target)" in out
    data = json.loads(out_file.read_text())
    assert data["kind"] == "kneurons.KnowledgeNeurons" and data["params"]["steps"] == 3
    code, out, err = run(capsys, "locate", "--model", model_dir, "--target", "paris", "--save", str(out_file),
                         "the capital of france is ___ .", "france has its capital in ___")
    assert code == 2 and "exists" in err and len(err.strip().splitlines()) == 1
    shared = tmp_path / "kn_shared.json"  # the paraphrases' rows in shared passes: the same neurons
    code, out, err = run(capsys, "locate", "--model", model_dir, "--target", "paris", "--steps", "3", "--p", "0.5",
                         "--batch-prompts", "--save", str(shared), "the capital of france is ___ .",
                         "france has its capital in ___", "the capital city of france is ___")
    assert code == 0, err
    assert json.loads(shared.read_text())["neurons"] == data["neurons"]


@pytest.mark.parametrize("argv, message", [
    (["predict", "--target", "paris", "no blank here"], "no blank"),
    (["predict", "--target", "paris", "two ___ blanks ___"], "2 blanks"),
    (["predict", "--target", "paris", "the ___ is the capital ."], "blank must end"),
    (["predict", "--target", " ", "the capital of france is ___ ."], "empty target"),
    (["locate", "--target", "paris", "the capital of france is ___ ."], "at least 2"),
    (["locate", "--target", "paris", "--steps", "0", "a ___", "b ___"], "steps"),
    (["locate", "--target", "paris", "--threshold", "1.5", "a ___", "b ___"], "threshold"),
    (["locate", "--target", "paris", "--save", "/no/such/dir/kn.json", "a ___", "b ___"], "directory does not exist"),
])
def test_bad_input_one_line_error(capsys, model_dir, argv, message):
    code, out, err = run(capsys, *argv[:1], "--model", model_dir, *argv[1:])
    assert code == 2
    lines = [l for l in err.strip().splitlines() if l.startswith("kneurons:")]
    assert len(lines) == 1 and message in lines[0]


def test_missing_model_path(capsys):
    code, out, err = run(capsys, "predict", "--model", "./nowhere/model", "--target", "x", "a ___")
    assert code == 2 and "model path does not exist: ./nowhere/model" in err


def test_console_script_exit_code(model_dir):
    exe = os.path.join(os.path.dirname(sys.executable), "kneurons")
    p = subprocess.run([exe, "predict", "--model", model_dir, "--target", "paris", "no blank"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("kneurons: error: prompt has no blank")
    p = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert p.returncode == 0 and "kneurons" in p.stdout


def test_intervention_without_target_is_a_one_line_error(capsys, model_dir):
    code, out, err = run(capsys, "suppress", "--model", model_dir, "--steps", "2", "a b c ___", "b c d ___")
    assert code == 2 and "no target" in err


def test_update_in_head_space_saves_the_edited_model(capsys, model_dir, tmp_path):
    kn_file, edited = tmp_path / "kn.json", tmp_path / "edited"
    prompts = ["the capital of france is ___ .", "france has its capital in ___", "the capital city of france is ___"]
    code, out, err = run(capsys, "locate", "--model", model_dir, "--target", "paris", "--steps", "3",
                         "--save", str(kn_file), *prompts)
    assert code == 0, err
    data = json.loads(kn_file.read_text())  # a random tiny model shares no neuron across prompts: take coarse ones
    data["neurons"] = sorted({tuple(n) for prompt_set in data["coarse"] for n in prompt_set})[:4]
    kn_file.write_text(json.dumps(data))
    code, out, err = run(capsys, "update", "--model", model_dir, "--neurons", str(kn_file), "--new", "berlin",
                         "--space", "head", "--save-model", str(edited))
    assert code == 0, err
    assert "update paris -> berlin" in out and "success@1" in out and "edited model saved" in out
    assert (edited / "config.json").exists()
    code = main(["update", "--model", model_dir, "--neurons", str(kn_file), "--new", "berlin", "--space", "sideways"])
    assert code == 2 and "invalid choice: 'sideways'" in capsys.readouterr().err


def test_contrastive_locate_and_optimize_update(capsys, model_dir, tmp_path):
    """--score contrastive with --foils records the foils; --update-method optimize edits the same slots and
    reports its search; suppress with --relation-control prints the relation specificity."""
    kn_file = tmp_path / "kn.json"
    prompts = ["the capital of france is ___ .", "france has its capital in ___", "the capital city of france is ___"]
    code, out, err = run(capsys, "locate", "--model", model_dir, "--target", "paris", "--steps", "3", "--score",
                         "contrastive", "--foils", "berlin", "rome", "--save", str(kn_file), *prompts)
    assert code == 0, err
    data = json.loads(kn_file.read_text())
    assert data["params"]["score"] == "contrastive" and data["params"]["foils"] == ["berlin", "rome"]
    data["neurons"] = sorted({tuple(n) for prompt_set in data["coarse"] for n in prompt_set})[:4]
    kn_file.write_text(json.dumps(data))
    code, out, err = run(capsys, "update", "--model", model_dir, "--neurons", str(kn_file), "--new", "berlin",
                         "--update-method", "optimize", "--opt-steps", "5", "--locality", "the capital of italy is ___")
    assert code == 0, err
    assert "optimized in" in out and "update paris -> berlin" in out
    code, out, err = run(capsys, "suppress", "--model", model_dir, "--neurons", str(kn_file), "--relation-control",
                         "the capital of italy is ___", "rome", "--control", "spain is a ___", "country")
    assert code == 0, err
    assert "relation specificity" in out and "same_relation" in out and "other_relation" in out


def test_python_dash_m_is_the_command():
    import subprocess
    import sys

    ok = subprocess.run([sys.executable, "-m", "kneurons", "--version"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.startswith("kneurons ")
    bad = subprocess.run([sys.executable, "-m", "kneurons", "locate", "--steps", "0"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "kneurons: error:" in bad.stderr
