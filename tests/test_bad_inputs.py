"""Break-it suite: bad input to every command and to the Python API ends in ONE line naming the problem.

Each CLI case runs ``kneurons.cli.main`` in-process on a tiny model saved to disk and checks: exit code 2, exactly
one ``kneurons: error:`` line on stderr containing the expected fragment, no traceback anywhere, and no file
created, changed or removed under the test's directory (the model, the input files and the working directory).
Each API case checks a :class:`KneuronsError` whose one-line message contains the fragment. The process-level
cases (invalid UTF-8 bytes in argv, Ctrl-C and SIGTERM at start-up and while computing) run the console script.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import handle_for, word_tokenizer
from kneurons.cli import main
from kneurons.errors import KneuronsError
from tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["the capital of france is ___ .", "france has its capital in ___", "the capital city of france is ___"]
LONG = "the capital of france is " + "a " * 70 + "___"  # 74 tokens: the tiny models take 64 positions


def _kn(neurons, n_layers=2, d_ff=48, name="model") -> dict:
    return {"kind": "kneurons.KnowledgeNeurons", "method": "integrated_gradients", "target": "paris",
            "prompts": PROMPTS, "neurons": neurons, "coarse": [neurons, neurons], "base_probs": [0.1, 0.1],
            "params": {}, "model": {"name": name, "n_layers": n_layers, "d_ff": d_ff}, "version": "0.1.0",
            "created": 0.0}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny llama (causal) saved to disk, input files of every kind of bad, and a run directory."""
    root = tmp_path_factory.mktemp("bad-inputs")
    model = root / "model"
    tiny_model("llama").save_pretrained(model)
    word_tokenizer("causal").save_pretrained(model)
    nan = tiny_model("llama")
    with torch.no_grad():
        nan.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    nan.save_pretrained(root / "nanmodel")
    word_tokenizer("causal").save_pretrained(root / "nanmodel")
    files = root / "files"
    files.mkdir()
    p = {"model": str(model), "files": str(files), "nanmodel": str(root / "nanmodel")}

    def write(name, content):
        path = files / name
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        p[name.split(".")[0]] = str(path)

    write("kn_good.json", _kn([[0, 3], [1, 4]]))
    write("kn_disjoint.json", _kn([[0, 7]]))
    write("kn_str.json", _kn([["x", 5]]))
    write("kn_three.json", _kn([[1, 2, 3]]))
    write("kn_abc.json", _kn("abc"))
    write("kn_float.json", _kn([[29.7, 5.9]]))
    write("kn_bool.json", _kn([[True, 5]]))
    write("kn_range.json", _kn([[1, 99]]))
    write("kn_shape.json", _kn([[0, 3]], n_layers=12, d_ff=3072, name="bert-base"))
    write("kn_empty.json", _kn([]))
    write("kn_kind.json", {"kind": "something else"})
    write("kn_nokeys.json", {"kind": "kneurons.KnowledgeNeurons"})
    write("corrupt.json", "{not json")
    write("text.txt", "hello")
    write("facts_bad.json", {"relations": []})
    (files / "kn_dir.json").mkdir()
    p["kn_dir"] = str(files / "kn_dir.json")
    (files / "nonempty").mkdir()
    (files / "nonempty" / "keep.txt").write_text("mine")
    p["nonempty"] = str(files / "nonempty")
    (files / "emptydir").mkdir()
    p["emptydir"] = str(files / "emptydir")
    (files / "noconfig").mkdir()
    (files / "noconfig" / "weights.bin").write_text("x")
    p["noconfig"] = str(files / "noconfig")

    # PARAREL-layout data (a synthetic world: no training needed for refusals) and a run directory
    from kneurons.experiments import RunStore
    from kneurons.synthetic import make_world

    make_world(n_subjects=6, n_objects=3, relations=["born_in", "speaks"], seed=0).to_pararel(root / "data")
    p["data"] = str(root / "data")
    run = root / "run"
    with RunStore.open(run, {"model": str(model), "steps": 20}) as st:
        st.put("assess", "born_in:0", "born_in", [{"fact_id": "born_in:0", "known": True}])
    p["run"] = str(run)
    badrun = root / "badrun"
    RunStore.open(badrun, {"model": "m"}).close()
    (badrun / "results.sqlite").write_bytes(b"this is not a database" * 200)
    p["badrun"] = str(badrun)
    badcfg = root / "badcfg"
    RunStore.open(badcfg, {"model": "m"}).close()
    (badcfg / "config.json").write_text("{not json")
    p["badcfg"] = str(badcfg)
    (root / "work").mkdir()
    return root, p


def _snapshot(root: Path) -> dict:
    """Every file under ``root`` with its size and modification time, and every directory. A run directory's
    lock file is the lock's (a refused writer takes it first, then reads the store); a directory's own time may
    change by a write probe that leaves nothing behind."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            out[str(path.relative_to(root))] = ((st.st_size, st.st_mtime_ns) if path.is_file() and name != "run.lock"
                                                else "dir" if path.is_dir() else "lock")
    return out


M = ["--model", "{model}"]
F = "{files}"

#: (case id, argv, fragment of the one error line)
CLI_CASES = [
    # predict
    ("predict: no blank", ["predict", *M, "-t", "paris", "no blank here"], "no blank"),
    ("predict: two blanks", ["predict", *M, "-t", "paris", "two ___ blanks ___"], "2 blanks"),
    ("predict: blank mid-sentence (causal)", ["predict", *M, "-t", "paris", "the ___ is the capital ."],
     "blank must end"),
    ("predict: empty target", ["predict", *M, "-t", " ", PROMPTS[0]], "empty target"),
    ("predict: empty prompt", ["predict", *M, "-t", "paris", ""], "empty prompt"),
    ("predict: blank only", ["predict", *M, "-t", "paris", "___"], "needs text before the blank"),
    ("predict: --top-k -1", ["predict", *M, "-t", "paris", "--top-k", "-1", PROMPTS[0]], "argument --top-k"),
    ("predict: --top-k 0", ["predict", *M, "-t", "paris", "--top-k", "0", PROMPTS[0]], "argument --top-k"),
    ("predict: --top-k abc", ["predict", *M, "-t", "paris", "--top-k", "abc", PROMPTS[0]], "expected an integer"),
    ("predict: --top-k beyond the vocabulary", ["predict", *M, "-t", "paris", "--top-k", "100000", PROMPTS[0]],
     "top_k must be an integer from 1 to the vocabulary size"),
    ("predict: --device cuda without CUDA", ["predict", *M, "-t", "paris", "--device", "cuda", PROMPTS[0]],
     "CUDA is not available"),
    ("predict: --device cuda:7", ["predict", *M, "-t", "paris", "--device", "cuda:7", PROMPTS[0]],
     "CUDA is not available"),
    ("predict: --device bogus", ["predict", *M, "-t", "paris", "--device", "bogus", PROMPTS[0]], "unknown device"),
    ("predict: --device meta", ["predict", *M, "-t", "paris", "--device", "meta", PROMPTS[0]], "holds no weights"),
    ("predict: --device mps", ["predict", *M, "-t", "paris", "--device", "mps", PROMPTS[0]], "MPS is not available"),
    ("predict: --dtype float8", ["predict", *M, "-t", "paris", "--dtype", "float8", PROMPTS[0]], "invalid choice"),
    ("predict: model path missing", ["predict", "--model", "./nowhere/model", "-t", "x", "a ___"],
     "model path does not exist"),
    ("predict: model is a text file", ["predict", "--model", F + "/text.txt", "-t", "x", "a ___"], "not a GGUF file"),
    ("predict: model dir without config", ["predict", "--model", "{noconfig}", "-t", "x", "a ___"],
     "has no config.json"),
    ("predict: unknown hub id offline", ["predict", "--model", "nobody/no-such-model", "-t", "x", "a ___"],
     "the hub cannot be reached"),
    ("predict: prompt longer than the context", ["predict", *M, "-t", "paris", LONG], "takes at most 64"),
    ("predict: target the tokenizer cannot spell", ["predict", *M, "-t", "zanzibar", PROMPTS[0]],
     "cannot be produced"),
    ("predict: missing --target", ["predict", *M, PROMPTS[0]], "required: --target"),
    ("predict: no prompt", ["predict", *M, "-t", "paris"], "required: prompts"),
    ("predict: a model with NaN weights", ["predict", "--model", "{nanmodel}", "-t", "paris", PROMPTS[0]],
     "not finite"),
    ("predict: unknown option", ["predict", *M, "-t", "paris", "--bogus", PROMPTS[0]], "unrecognized arguments"),
    ("no command", [], "required: command"),
    ("unknown command", ["teleport"], "invalid choice"),
    # facts
    ("facts: facts file missing", ["facts", *M, "--facts", F + "/none.json"], "fact file not found"),
    ("facts: facts file corrupt", ["facts", *M, "--facts", F + "/corrupt.json"], "invalid JSON"),
    ("facts: facts file empty list", ["facts", *M, "--facts", F + "/facts_bad.json"], "'relations' must be"),
    ("facts: unknown relation", ["facts", *M, "--relation", "teleports_to"], "unknown relation"),
    ("facts: --device bogus", ["facts", *M, "--device", "gpu9"], "unknown device"),
    # locate
    ("locate: one prompt", ["locate", *M, "-t", "paris", PROMPTS[0]], "at least 2"),
    ("locate: --score contrastive without --foils", ["locate", *M, "-t", "paris", "--score", "contrastive",
                                                     *PROMPTS], "needs foils"),
    ("locate: --foils with --score prob", ["locate", *M, "-t", "paris", *PROMPTS, "--foils", "rome"],
     "only by a contrastive"),
    ("locate: --score contrastive, foils all start like the target", ["locate", *M, "-t", "paris", "--score",
                                                                      "contrastive", *PROMPTS, "--foils", "paris"],
     "no foil starts"),
    ("locate: --steps 0", ["locate", *M, "-t", "paris", "--steps", "0", *PROMPTS], "argument --steps"),
    ("locate: --steps 1e9", ["locate", *M, "-t", "paris", "--steps", "1000000000", *PROMPTS], "from 1 to 10000"),
    ("locate: --steps 2.5", ["locate", *M, "-t", "paris", "--steps", "2.5", *PROMPTS], "expected an integer"),
    ("locate: --threshold 1.5", ["locate", *M, "-t", "paris", "--threshold", "1.5", *PROMPTS], "argument --threshold"),
    ("locate: --threshold 0", ["locate", *M, "-t", "paris", "--threshold", "0", *PROMPTS], "argument --threshold"),
    ("locate: --threshold nan", ["locate", *M, "-t", "paris", "--threshold", "nan", *PROMPTS], "finite"),
    ("locate: --p 0", ["locate", *M, "-t", "paris", "--p", "0", *PROMPTS], "argument --p"),
    ("locate: --p 2", ["locate", *M, "-t", "paris", "--p", "2", *PROMPTS], "argument --p"),
    ("locate: --min-prompts 0", ["locate", *M, "-t", "paris", "--min-prompts", "0", *PROMPTS],
     "argument --min-prompts"),
    ("locate: --min-prompts -5", ["locate", *M, "-t", "paris", "--min-prompts", "-5", *PROMPTS],
     "argument --min-prompts"),
    ("locate: --batch-size 0", ["locate", *M, "-t", "paris", "--batch-size", "0", *PROMPTS], "argument --batch-size"),
    ("locate: --batch-size -3", ["locate", *M, "-t", "paris", "--batch-size", "-3", *PROMPTS],
     "argument --batch-size"),
    ("locate: --score bogus", ["locate", *M, "-t", "paris", "--score", "logit", *PROMPTS], "invalid choice"),
    ("locate: --save into a missing directory", ["locate", *M, "-t", "paris", "--save", "/no/such/dir/kn.json",
                                                 *PROMPTS], "directory does not exist"),
    ("locate: --save onto an existing file", ["locate", *M, "-t", "paris", "--save", F + "/text.txt", *PROMPTS],
     "exists"),
    ("locate: --save onto a directory, --overwrite", ["locate", *M, "-t", "paris", "--save", "{emptydir}",
                                                      "--overwrite", *PROMPTS], "is a directory"),
    ("locate: --save below a file", ["locate", *M, "-t", "paris", "--save", F + "/text.txt/kn.json", *PROMPTS],
     "is a file"),
    ("locate: one prompt without a blank", ["locate", *M, "-t", "paris", PROMPTS[0], "no blank"], "no blank"),
    ("locate: one prompt with two blanks", ["locate", *M, "-t", "paris", PROMPTS[0], "a ___ b ___"], "2 blanks"),
    ("locate: blank mid-sentence", ["locate", *M, "-t", "paris", PROMPTS[0], "the ___ is paris ."],
     "blank must end"),
    ("locate: empty target", ["locate", *M, "-t", "", *PROMPTS], "empty target"),
    ("locate: prompt too long", ["locate", *M, "-t", "paris", PROMPTS[0], LONG], "takes at most 64"),
    ("locate: --device cuda", ["locate", *M, "-t", "paris", "--device", "cuda", *PROMPTS], "CUDA is not available"),
    # suppress / amplify
    ("suppress: no target, no neurons", ["suppress", *M, "--steps", "2", "a b c ___", "b c d ___"], "no target"),
    ("suppress: one prompt, no neurons", ["suppress", *M, "-t", "paris", PROMPTS[0]], "at least 2 paraphrase"),
    ("suppress: neurons file missing", ["suppress", *M, "--neurons", F + "/none.json"], "does not exist"),
    ("suppress: neurons file corrupt", ["suppress", *M, "--neurons", "{corrupt}"], "not a readable"),
    ("suppress: neurons file of another kind", ["suppress", *M, "--neurons", "{kn_kind}"], "not a readable"),
    ("suppress: neurons file without fields", ["suppress", *M, "--neurons", "{kn_nokeys}"], "missing field"),
    ("suppress: neurons file is a directory", ["suppress", *M, "--neurons", "{kn_dir}"], "not a file"),
    ("suppress: neuron entry ['x', 5]", ["suppress", *M, "--neurons", "{kn_str}"], "is not an integer"),
    ("suppress: neuron entry [1, 2, 3]", ["suppress", *M, "--neurons", "{kn_three}"], "3 values"),
    ("suppress: neurons 'abc'", ["suppress", *M, "--neurons", "{kn_abc}"], "must be a list"),
    ("suppress: neuron entry [29.7, 5.9]", ["suppress", *M, "--neurons", "{kn_float}"], "29.7 is not an integer"),
    ("suppress: neuron entry [true, 5]", ["suppress", *M, "--neurons", "{kn_bool}"], "True is not an integer"),
    ("suppress: neuron out of range", ["suppress", *M, "--neurons", "{kn_range}"], "out of range"),
    ("suppress: neurons of another model's shape", ["suppress", *M, "--neurons", "{kn_shape}"],
     "were located on 'bert-base' (12 layers x 3072"),
    ("suppress: empty neuron set", ["suppress", *M, "--neurons", "{kn_empty}"], "holds no knowledge neurons"),
    ("suppress: control without a blank", ["suppress", *M, "--neurons", "{kn_good}", "--control", "italy", "rome"],
     "no blank"),
    ("suppress: control with an empty target", ["suppress", *M, "--neurons", "{kn_good}", "--control",
                                               "the capital of italy is ___", " "], "empty target"),
    ("suppress: --position middle", ["suppress", *M, "--neurons", "{kn_good}", "--position", "middle"],
     "invalid choice"),
    ("amplify: --factor nan", ["amplify", *M, "--neurons", "{kn_good}", "--factor", "nan"], "finite"),
    ("amplify: --factor inf", ["amplify", *M, "--neurons", "{kn_good}", "--factor", "inf"], "finite"),
    ("amplify: --factor abc", ["amplify", *M, "--neurons", "{kn_good}", "--factor", "abc"], "expected a number"),
    ("amplify: neurons of another shape", ["amplify", *M, "--neurons", "{kn_shape}"], "were located on"),
    ("amplify: one prompt, no neurons", ["amplify", *M, "-t", "paris", PROMPTS[0]], "at least 2 paraphrase"),
    # update
    ("update: missing --new", ["update", *M, "--neurons", "{kn_good}"], "required: --new"),
    ("update: --locality without --update-method optimize", ["update", *M, "--neurons", "{kn_good}", "--new",
                                                             "berlin", "--locality", PROMPTS[0]], "belong to"),
    ("update: --update-method finetune", ["update", *M, "--neurons", "{kn_good}", "--new", "berlin",
                                          "--update-method", "finetune"], "invalid choice"),
    ("update: --opt-steps 0", ["update", *M, "--neurons", "{kn_good}", "--new", "berlin", "--update-method",
                               "optimize", "--opt-steps", "0"], "argument --opt-steps"),
    ("update: --opt-lr -1", ["update", *M, "--neurons", "{kn_good}", "--new", "berlin", "--update-method",
                             "optimize", "--opt-lr", "-1"], "argument --opt-lr"),
    ("update: --locality without a blank", ["update", *M, "--neurons", "{kn_good}", "--new", "berlin",
                                            "--update-method", "optimize", "--locality", "no blank here"],
     "no blank"),
    ("update: empty --new", ["update", *M, "--neurons", "{kn_good}", "--new", " "], "empty new answer"),
    ("update: --new equals the old answer", ["update", *M, "--neurons", "{kn_good}", "--new", "paris"],
     "equals the old one"),
    ("update: --lambda2 nan", ["update", *M, "--neurons", "{kn_good}", "--new", "berlin", "--lambda2", "nan"],
     "finite"),
    ("update: --lambda1 inf", ["update", *M, "--neurons", "{kn_good}", "--new", "berlin", "--lambda1", "inf"],
     "finite"),
    ("update: a model with NaN weights", ["update", "--model", "{nanmodel}", "--neurons", "{kn_good}", "--new",
                                          "berlin"], "not finite"),
    ("update: --space sideways", ["update", *M, "--neurons", "{kn_good}", "--new", "berlin", "--space", "sideways"],
     "invalid choice"),
    ("update: --save-model onto a non-empty directory", ["update", *M, "--neurons", "{kn_good}", "--new", "berlin",
                                                         "--save-model", "{nonempty}"], "not empty"),
    ("update: --save-model onto a file", ["update", *M, "--neurons", "{kn_good}", "--new", "berlin",
                                          "--save-model", F + "/text.txt"], "is a file"),
    ("update: --save-model below a file", ["update", *M, "--neurons", "{kn_good}", "--new", "berlin",
                                           "--save-model", F + "/text.txt/m"], "is a file"),
    ("update: --save-model below a missing directory", ["update", *M, "--neurons", "{kn_good}", "--new", "berlin",
                                                        "--save-model", "/no/such/dir/edited"],
     "directory does not exist"),
    ("update: new answer the tokenizer cannot spell", ["update", *M, "--neurons", "{kn_good}", "--new", "zanzibar"],
     "cannot be produced"),
    ("update: neurons file with float ids", ["update", *M, "--neurons", "{kn_float}", "--new", "berlin"],
     "not an integer"),
    ("update: neurons of another shape", ["update", *M, "--neurons", "{kn_shape}", "--new", "berlin"],
     "were located on"),
    # erase
    ("erase: unknown relation", ["erase", *M, "--relation", "teleports_to"], "unknown relation"),
    ("erase: --facts-per-relation -1", ["erase", *M, "--relation", "capital_of", "--facts-per-relation", "-1"],
     "argument --facts-per-relation"),
    ("erase: --facts-per-relation 0", ["erase", *M, "--relation", "capital_of", "--facts-per-relation", "0"],
     "argument --facts-per-relation"),
    ("erase: --min-facts -3", ["erase", *M, "--relation", "capital_of", "--min-facts", "-3"], "argument --min-facts"),
    ("erase: --top-k 0", ["erase", *M, "--relation", "capital_of", "--top-k", "0"], "argument --top-k"),
    ("erase: --mode bogus", ["erase", *M, "--relation", "capital_of", "--mode", "shred"], "invalid choice"),
    ("erase: neurons of another shape", ["erase", *M, "--relation", "capital_of", "--neurons", "{kn_shape}"],
     "were located on"),
    ("erase: neurons file missing", ["erase", *M, "--relation", "capital_of", "--neurons", F + "/none.json"],
     "does not exist"),
    ("erase: neurons with float ids", ["erase", *M, "--relation", "capital_of", "--neurons", "{kn_float}"],
     "not an integer"),
    ("erase: neurons out of range", ["erase", *M, "--relation", "capital_of", "--neurons", "{kn_range}"],
     "out of range"),
    ("erase: no neuron shared", ["erase", *M, "--relation", "capital_of", "--neurons", "{kn_good}", "{kn_disjoint}",
                                 "--min-facts", "2"], "no neuron is shared"),
    ("erase: --save-model onto a non-empty directory", ["erase", *M, "--relation", "capital_of", "--neurons",
                                                        "{kn_good}", "--save-model", "{nonempty}"], "not empty"),
    ("erase: facts file corrupt", ["erase", *M, "--relation", "capital_of", "--facts", "{corrupt}"], "invalid JSON"),
    # run (refused before anything is written)
    ("run: unknown experiment", ["run", *M, "--data", "{data}", "--out", "{cwd}/r", "--experiments", "assess",
                                 "dance"], "invalid choice: 'dance'"),
    ("run: --p 1.5", ["run", *M, "--data", "{data}", "--out", "{cwd}/r", "--p", "1.5"], "argument --p"),
    ("run: --relation-q 1", ["run", *M, "--data", "{data}", "--out", "{cwd}/r", "--relation-q", "1"],
     "argument --relation-q"),
    ("run: --update-method finetune", ["run", *M, "--data", "{data}", "--out", "{cwd}/r", "--update-method",
                                       "finetune"], "invalid choice: 'finetune'"),
    ("run: --threshold 0", ["run", *M, "--data", "{data}", "--out", "{cwd}/r", "--threshold", "0"],
     "argument --threshold"),
    ("run: --max-prompts 1", ["run", *M, "--data", "{data}", "--out", "{cwd}/r", "--max-prompts", "1"],
     "argument --max-prompts"),
    ("run: --batch-size -3", ["run", *M, "--data", "{data}", "--out", "{cwd}/r", "--batch-size", "-3"],
     "argument --batch-size"),
    ("run: --known-rank 0", ["run", *M, "--data", "{data}", "--out", "{cwd}/r", "--known-rank", "0"],
     "argument --known-rank"),
    ("run: --steps 0", ["run", *M, "--data", "{data}", "--out", "{cwd}/r", "--steps", "0"], "argument --steps"),
    ("run: --lambda2 nan", ["run", *M, "--data", "{data}", "--out", "{cwd}/r", "--lambda2", "nan"], "finite"),
    ("run: --known-fraction 1", ["run", *M, "--data", "{data}", "--out", "{cwd}/r", "--known-fraction", "1"],
     "argument --known-fraction: must be in [0, 1)"),
    ("run: --update-drop-shared -1", ["run", *M, "--data", "{data}", "--out", "{cwd}/r", "--update-drop-shared",
                                      "-1"], "argument --update-drop-shared"),
    ("run: --erase-top-k -5", ["run", *M, "--data", "{data}", "--out", "{cwd}/r", "--erase-top-k", "-5"],
     "argument --erase-top-k"),
    ("run: --max-candidates 0", ["run", *M, "--data", "{data}", "--out", "{cwd}/r", "--max-candidates", "0"],
     "argument --max-candidates"),
    ("run: --max-candidates below --facts-per-relation", ["run", *M, "--data", "{data}", "--out", "{cwd}/r",
                                                          "--max-candidates", "3"], "max_candidates must be >="),
    ("run: --facts-per-relation 0", ["run", *M, "--data", "{data}", "--out", "{cwd}/r", "--facts-per-relation",
                                     "0"], "argument --facts-per-relation"),
    ("run: --bingrel-sentences 0", ["run", *M, "--data", "{data}", "--out", "{cwd}/r", "--bingrel-sentences", "0"],
     "argument --bingrel-sentences"),
    ("run: --max-tokens 1", ["run", *M, "--data", "{data}", "--out", "{cwd}/r", "--max-tokens", "1"],
     "argument --max-tokens"),
    ("run: --erase-min-facts 0", ["run", *M, "--data", "{data}", "--out", "{cwd}/r", "--erase-min-facts", "0"],
     "argument --erase-min-facts"),
    ("run: --known-among vibes", ["run", *M, "--data", "{data}", "--out", "{cwd}/r", "--known-among", "vibes"],
     "invalid choice"),
    ("run: --device bogus", ["run", *M, "--data", "{data}", "--out", "{cwd}/r", "--device", "bogus"],
     "unknown device"),
    ("run: --data missing", ["run", *M, "--data", "{cwd}/nope", "--out", "{cwd}/r"], "data directory not found"),
    ("run: --ray local:0", ["run", *M, "--data", "{data}", "--out", "{cwd}/r", "--ray", "local:0"],
     "local:N needs N >= 1"),
    ("run: --ray not an address", ["run", *M, "--data", "{data}", "--out", "{cwd}/r", "--ray", "my cluster"],
     "argument --ray"),
    ("run: --ray auto without a cluster", ["run", *M, "--data", "{data}", "--out", "{cwd}/r", "--ray", "auto"],
     "cannot connect to a Ray cluster at --ray auto"),
    ("run: --workers beyond local:N", ["run", *M, "--data", "{data}", "--out", "{cwd}/r", "--ray", "local:1",
                                       "--workers", "2"], "do not fit in --ray local:1"),
    ("run: --gpus-per-worker 1.5", ["run", *M, "--data", "{data}", "--out", "{cwd}/r", "--ray", "local:1",
                                    "--gpus-per-worker", "1.5"], "whole number of GPUs"),
    ("run: --ray HOST:PORT where nothing listens", ["run", *M, "--data", "{data}", "--out", "{cwd}/r", "--ray",
                                                   "127.0.0.1:{freeport}"], "(Connection refused)"),
    ("run: --workers without --ray", ["run", *M, "--data", "{data}", "--out", "{cwd}/r", "--workers", "2"],
     "only apply with --ray"),
    ("run: --workers 0", ["run", *M, "--data", "{data}", "--out", "{cwd}/r", "--ray", "local:2", "--workers", "0"],
     "argument --workers"),
    ("run: --threads-per-worker 0", ["run", *M, "--data", "{data}", "--out", "{cwd}/r", "--ray", "local:2",
                                     "--threads-per-worker", "0"], "argument --threads-per-worker"),
    ("run: --gpus-per-worker -1", ["run", *M, "--data", "{data}", "--out", "{cwd}/r", "--ray", "local:2",
                                   "--gpus-per-worker", "-1"], "argument --gpus-per-worker"),
    ("run: --data without PARAREL", ["run", *M, "--data", "{emptydir}", "--out", "{cwd}/r"],
     "neither pararel/query_pairs.json"),
    ("run: --out is a file", ["run", *M, "--data", "{data}", "--out", F + "/text.txt"], "is a file"),
    ("run: --out below a file", ["run", *M, "--data", "{data}", "--out", F + "/text.txt/sub"], "is a file"),
    ("run: --out is a foreign directory", ["run", *M, "--data", "{data}", "--out", "{nonempty}"],
     "not empty and is not a kneurons run"),
    ("run: --out holds another configuration", ["run", *M, "--data", "{data}", "--out", "{run}"],
     "different configuration"),
    ("run: --out holds a corrupt database", ["run", *M, "--data", "{data}", "--out", "{badrun}"],
     "corrupt results database"),
    # export
    ("export: run directory missing", ["export", "{cwd}/nope"], "does not exist"),
    ("export: not a run directory", ["export", "{emptydir}"], "not a kneurons run directory"),
    ("export: --format xlsx", ["export", "{run}", "--format", "xlsx"], "invalid choice"),
    ("export: --out is a file", ["export", "{run}", "--out", F + "/text.txt", "--format", "csv"], "is a file"),
    ("export: --out holds foreign files", ["export", "{run}", "--out", "{nonempty}", "--format", "csv"],
     "not a kneurons export"),
    ("export: --out the run directory, --overwrite", ["export", "{run}", "--out", "{run}", "--format", "csv",
                                                      "--overwrite"], "run directory"),
    ("export: --out inside another run, --overwrite", ["export", "{run}", "--out", "{badcfg}/tables",
                                                       "--overwrite"], "run directory"),
    ("export: --out foreign files, --overwrite", ["export", "{run}", "--out", "{nonempty}", "--overwrite"],
     "not a kneurons export"),
    ("export: corrupt database", ["export", "{badrun}", "--out", "{cwd}/x"], "corrupt results database"),
    ("export: corrupt configuration", ["export", "{badcfg}", "--out", "{cwd}/x"], "corrupt run configuration"),
    # report
    ("report: run directory missing", ["report", "{cwd}/nope"], "does not exist"),
    ("report: not a run directory", ["report", "{emptydir}"], "not a kneurons run directory"),
    ("report: corrupt database", ["report", "{badrun}", "--out", "{cwd}/rep"], "corrupt results database"),
    ("report: --out the run directory", ["report", "{run}", "--out", "{run}"], "run directory"),
    ("report: --out foreign files", ["report", "{run}", "--out", "{nonempty}"], "not a kneurons report"),
    ("report: --out is a file", ["report", "{run}", "--out", F + "/text.txt"], "is a file"),
    ("report: corrupt configuration", ["report", "{badcfg}", "--out", "{cwd}/rep"], "corrupt run configuration"),
    # demo
    ("demo: --prompts -1", ["demo", *M, "--prompts", "-1"], "argument --prompts"),
    ("demo: --prompts 1", ["demo", *M, "--prompts", "1"], "argument --prompts"),
    ("demo: --steps 0", ["demo", *M, "--steps", "0"], "argument --steps"),
    ("demo: --batch-size 0", ["demo", *M, "--batch-size", "0"], "argument --batch-size"),
    ("demo: --device bogus", ["demo", *M, "--device", "bogus"], "unknown device"),
    ("demo: a model that knows no built-in fact", ["demo", *M], "knows none of the built-in facts"),
    # explain
    ("explain: no --neurons", ["explain", *M], "--neurons"),
    ("explain: --neurons missing", ["explain", *M, "--neurons", "{cwd}/nope.json"], "does not exist"),
    ("explain: --neurons corrupt", ["explain", *M, "--neurons", F + "/corrupt.json"], "not a readable"),
    ("explain: --neurons empty", ["explain", *M, "--neurons", F + "/kn_empty.json"], "holds no knowledge neurons"),
    ("explain: --neurons out of range", ["explain", *M, "--neurons", F + "/kn_range.json"], "out of range"),
    ("explain: --neurons of another shape", ["explain", *M, "--neurons", F + "/kn_shape.json"], "12 layers"),
    ("explain: --top-k 0", ["explain", *M, "--neurons", F + "/kn_good.json", "--top-k", "0"], "argument --top-k"),
    ("explain: --top-facts -1", ["explain", *M, "--neurons", F + "/kn_good.json", "--top-facts", "-1"],
     "argument --top-facts"),
    ("explain: --prompt without a blank", ["explain", *M, "--neurons", F + "/kn_good.json", "--prompt", "no blank"],
     "no blank"),
    ("explain: --device bogus", ["explain", *M, "--neurons", F + "/kn_good.json", "--device", "bogus"],
     "unknown device"),
    # serve (each refused before a server starts)
    ("serve: --port 70000", ["serve", *M, "--port", "70000"], "argument --port"),
    ("serve: --port abc", ["serve", *M, "--port", "abc"], "expected an integer"),
    ("serve: --runs missing", ["serve", *M, "--runs", "{cwd}/nope"], "runs directory does not exist"),
    ("serve: --runs a file", ["serve", *M, "--runs", F + "/text.txt"], "not a directory"),
    ("serve: --host not an address of this machine", ["serve", *M, "--host", "192.0.2.1", "--port", "0"],
     "cannot listen on"),
    ("serve: --device bogus", ["serve", *M, "--device", "bogus"], "unknown device"),
    ("serve: model path missing", ["serve", "--model", "./nowhere/model", "--port", "0"], "does not exist"),
    # arguments that are not text
    ("invalid UTF-8 in an argument", ["predict", *M, "-t", "paris", "caf\udce9 ___"], "not valid UTF-8"),
]


@pytest.mark.parametrize("argv, fragment", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_line_and_writes_nothing(env, argv, fragment, capsys, monkeypatch, tmp_path):
    _refused_in_one_line(env, argv, fragment, capsys, monkeypatch, tmp_path)


@pytest.mark.parametrize("argv, fragment", [
    (["locate", *M, "-t", "paris", *PROMPTS], "token prompt needs about"),
    (["locate", *M, "-t", "paris", "--batch-size", "64", "--steps", "3", *PROMPTS], "even at batch_size=1"),
], ids=["locate", "locate --batch-size 64"])
def test_cli_attribution_beyond_memory_is_one_line(env, argv, fragment, capsys, monkeypatch, tmp_path):
    """With 1 MB of memory available (injected), no pass fits: refused before the clean run."""
    from kneurons.attribution import plan

    monkeypatch.setattr(plan, "available_memory", lambda device: 1 << 20)
    _refused_in_one_line(env, argv, fragment, capsys, monkeypatch, tmp_path)


def test_ray_is_reached_only_after_the_cheap_checks_of_the_run_directory(env, capsys, monkeypatch, tmp_path):
    """``--ray`` with an ``--out`` that cannot be a run is refused by the store's checks, before any cluster is
    reached or started (starting one takes seconds and prints Ray's own lines)."""
    from kneurons.experiments.ray_pool import RayPool

    def no_cluster(self):
        raise AssertionError("the cluster was reached before the run directory was checked")

    monkeypatch.setattr(RayPool, "connect", no_cluster)
    _refused_in_one_line(env, ["run", *M, "--data", "{data}", "--out", F + "/text.txt", "--ray", "local:1"],
                         "is a file", capsys, monkeypatch, tmp_path)


def test_ray_auto_with_a_ray_address_where_nothing_listens(env, capsys, monkeypatch, tmp_path):
    """``--ray auto`` follows RAY_ADDRESS (Ray's rule); one naming a port where nothing listens is refused at once
    (Ray would retry it for minutes)."""
    port = _free_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    _refused_in_one_line(env, ["run", *M, "--data", "{data}", "--out", "{cwd}/r", "--ray", "auto"],
                         f"--ray auto uses RAY_ADDRESS=127.0.0.1:{port}: no Ray cluster", capsys, monkeypatch,
                         tmp_path, keep_ray_address=True)


def _refused_in_one_line(env, argv, fragment, capsys, monkeypatch, tmp_path, keep_ray_address=False):
    root, paths = env
    cwd = root / "work" / tmp_path.name
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if not keep_ray_address:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    argv = [a.format(**paths, cwd=cwd, freeport=_free_port()) for a in argv]
    before = _snapshot(root)
    code = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, err
    errors = [line for line in err.splitlines() if line.startswith("kneurons: error:")]
    assert code == 2, (code, err)
    assert len(errors) == 1 and fragment in errors[0], err
    assert not [line for line in err.splitlines() if line and not line.startswith(("kneurons:", "model: "))], err
    assert _snapshot(root) == before  # nothing created, changed or removed


def _free_port() -> int:
    """A TCP port of this machine where nothing listens (just released by the system)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_enough_cases():
    commands = {c[1][0] for c in CLI_CASES if c[1]}
    assert {"predict", "facts", "locate", "suppress", "amplify", "update", "erase", "run", "export", "report",
            "demo", "explain", "serve"} <= commands
    assert len(CLI_CASES) + len(API_CASES) >= 100


# ------------------------------------------------------------------------------------------------- Python API

def _h():
    return handle_for("llama", dtype=torch.float64)


def _nan_weights(h):
    with torch.no_grad():
        h.arch.ffn_out[0].weight[0, 0] = float("nan")
    return h


API_CASES = [
    ("assess top_k=0", lambda k: k.assess(_h(), PROMPTS[0], "paris", top_k=0), "top_k must be"),
    ("assess top_k beyond the vocabulary", lambda k: k.assess(_h(), PROMPTS[0], "paris", top_k=10 ** 6),
     "top_k must be"),
    ("assess batch_size=0", lambda k: k.assess(_h(), PROMPTS[0], "paris", batch_size=0), "batch_size must be"),
    ("assess prompts and targets of different lengths", lambda k: k.assess(_h(), PROMPTS, ["paris", "rome"]),
     "3 prompts but 2 targets"),
    ("assess NaN weights", lambda k: k.assess(_nan_weights(_h()), PROMPTS[0], "paris"), "not finite"),
    ("assess a target the tokenizer cannot spell", lambda k: k.assess(_h(), PROMPTS[0], "zanzibar"),
     "cannot be produced"),
    ("encode a prompt longer than the context", lambda k: k.encode(_h(), LONG, "paris"), "takes at most 64"),
    ("encode no blank", lambda k: k.encode(_h(), "no blank", "paris"), "no blank"),
    ("encode empty target", lambda k: k.encode(_h(), PROMPTS[0], ""), "empty target"),
    ("integrated_gradients steps=0", lambda k: k.integrated_gradients(_h(), PROMPTS[0], "paris", steps=0),
     "steps must be an integer from 1 to 10000, got 0"),
    ("integrated_gradients steps=10_001", lambda k: k.integrated_gradients(_h(), PROMPTS[0], "paris", steps=10_001),
     "steps must be an integer from 1 to 10000, got 10001"),
    ("attribute steps=10_001", lambda k: k.attribute(_h(), PROMPTS, "paris", steps=10_001), "from 1 to 10000"),
    ("locate steps=0", lambda k: k.locate(_h(), PROMPTS, "paris", steps=0), "steps must be an integer from 1"),
    ("locate steps=10_001", lambda k: k.locate(_h(), PROMPTS, "paris", steps=10_001), "from 1 to 10000, got 10001"),
    ("locate activation steps=10_001", lambda k: k.locate(_h(), PROMPTS, "paris", steps=10_001, method="activation"),
     "from 1 to 10000"),
    ("riemann_right(10_001)", lambda k: k.attribution.riemann_right(10_001), "from 1 to 10000"),
    ("integrated_gradients bad score", lambda k: k.integrated_gradients(_h(), PROMPTS[0], "paris", score="logit"),
     "score"),
    ("locate one prompt", lambda k: k.locate(_h(), PROMPTS[:1], "paris"), "at least 2"),
    ("locate threshold 1.5", lambda k: k.locate(_h(), PROMPTS, "paris", threshold=1.5), "threshold"),
    ("locate two targets", lambda k: k.locate(_h(), PROMPTS[:2], ["paris", "rome"]), "different facts"),
    ("suppress float ids", lambda k: k.suppress(_h(), [(1.5, 2)]), "not an integer"),
    ("suppress bool ids", lambda k: k.suppress(_h(), [(True, 1)]), "not an integer"),
    ("suppress three numbers", lambda k: k.suppress(_h(), [(0, 1, 2)]), "3 values"),
    ("suppress a string", lambda k: k.suppress(_h(), "abc"), "must be a list"),
    ("suppress out of range", lambda k: k.suppress(_h(), [(99, 0)]), "out of range"),
    ("suppress empty", lambda k: k.suppress(_h(), []), "empty neuron set"),
    ("amplify factor nan", lambda k: k.amplify(_h(), [(0, 1)], factor=math.nan), "finite"),
    ("measure_intervention position", lambda k: k.measure_intervention(_h(), [(0, 1)], PROMPTS, "paris",
                                                                       position="middle"), "position"),
    ("update_fact same target", lambda k: k.update_fact(_h(), [(0, 1)], "paris", " paris "), "equals the old"),
    ("update_fact lambda nan", lambda k: k.update_fact(_h(), [(0, 1)], "paris", "berlin", lambda2=math.nan),
     "finite"),
    ("erase_relation mode", lambda k: k.erase_relation(_h(), [[(0, 1)]], min_facts=1, mode="shred"), "mode"),
    ("erase_relation min_facts -3", lambda k: k.erase_relation(_h(), [[(0, 1)]], min_facts=-3), "min_facts"),
    ("erase_relation float ids", lambda k: k.erase_relation(_h(), [[(0.5, 1)]], min_facts=1), "not an integer"),
    ("random_neurons count 0", lambda k: k.random_neurons(_h(), 0), "count must be"),
    ("load_model missing path", lambda k: k.load_model("./nowhere/model"), "does not exist"),
    ("load_model dtype", lambda k: k.load_model("./nowhere", dtype="float8"), "unknown dtype"),
    ("load_model device meta", lambda k: k.load_model("./nowhere", device="meta"), "holds no weights"),
    ("KnowledgeNeurons.load missing", lambda k: k.KnowledgeNeurons.load("./nowhere.json"), "does not exist"),
    ("Attribution.load missing", lambda k: k.Attribution.load("./nowhere.safetensors"), "does not exist"),
    ("register_architecture kind", lambda k: k.register_architecture("x", kind="both", layers="l", ffn_out="f"),
     "kind must be"),
]


@pytest.mark.parametrize("call, fragment", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_bad_input_is_one_line(call, fragment):
    import kneurons

    with pytest.raises(KneuronsError) as exc:
        call(kneurons)
    msg = str(exc.value)
    assert fragment in msg and "\n" not in msg


def test_edit_revert_twice_and_out_of_order_overlap():
    from kneurons import erase_relation, update_fact

    h = _h()
    e1 = update_fact(h, [(0, 4)], "paris", "berlin", prompt=PROMPTS[0])
    e2 = erase_relation(h, [[(0, 4)]], min_facts=1)
    with pytest.raises(KneuronsError, match="reverse order"):
        e1.revert()
    e2.revert()
    e1.revert()
    with pytest.raises(KneuronsError, match="already reverted"):
        e1.revert()


# ------------------------------------------------------------------------------------------- process level

def default_sigint() -> None:
    """In the child, before exec: Ctrl-C's default action. A suite started in the background of a shell without job
    control inherits SIGINT ignored, and Python then keeps it ignored: the command would never see the signal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _console(*args) -> list[str]:
    return [os.path.join(os.path.dirname(sys.executable), "kneurons"), *args]


def test_invalid_utf8_bytes_in_argv(env):
    _, paths = env
    p = subprocess.run([os.fsencode(a) for a in _console("predict", "--model", paths["model"], "-t", "paris")]
                       + [b"caf\xe9 ___"], capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("kneurons: error: argument is not valid UTF-8")


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"),
                                             (signal.SIGTERM, 143, "terminated (signal 15)")])
@pytest.mark.parametrize("delay", [0.3, 1.5, "computing"])  # imports, model loading, integrated gradients
def test_interrupt_at_start_up_or_while_computing(env, tmp_path, sig, code, word, delay):
    _, paths = env
    save = tmp_path / "kn.json"
    proc = subprocess.Popen(_console("locate", "--model", paths["model"], "-t", "paris", "--steps", "10000",
                                     "--save", str(save), *PROMPTS), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, preexec_fn=default_sigint)
    if delay == "computing":  # not a fixed delay: an idle machine finished the whole command in under 4 s
        line = proc.stderr.readline()
        assert line.startswith("model: "), line  # printed once the model is loaded, before the attribution
        time.sleep(0.5)
    else:
        time.sleep(delay)
    assert proc.poll() is None, "the command ended before the signal"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == f"kneurons: {word}"
    assert list(tmp_path.iterdir()) == []  # nothing half-written


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"),
                                             (signal.SIGTERM, 143, "terminated (signal 15)")])
@pytest.mark.parametrize("becomes", ["KneuronsError", "RuntimeError"])
def test_a_signal_a_library_turned_into_another_error_still_ends_the_command_as_signalled(
        env, capsys, monkeypatch, sig, code, word, becomes):
    """Ctrl-C and SIGTERM raise their exception wherever the main thread is; a library that catches everything
    there (transformers' lazy imports did, while the config loaded) turns it into its own error, which would end
    the command as bad input (2) or with a traceback. It still ends as interrupted / terminated."""
    from kneurons import models

    _, paths = env

    def load_config_then_swallow(*a, **kw):
        try:
            os.kill(os.getpid(), sig)  # delivered here: its exception is raised inside the try
            time.sleep(5)
        except BaseException as exc:  # noqa: BLE001 - what such a library does
            if becomes == "RuntimeError":
                raise RuntimeError(f"Could not import module 'LlamaConfig' ({type(exc).__name__})") from None
            raise models.KneuronsError(f"cannot read model config of model: {type(exc).__name__}") from None

    monkeypatch.setattr(models, "load_model", load_config_then_swallow)
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a fresh command, whatever pytest installed
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        result = main(["predict", "--model", paths["model"], "-t", "paris", PROMPTS[0]])
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # main restored the handlers
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    err = capsys.readouterr().err
    assert result == code and err.strip().splitlines() == [f"kneurons: {word}"], err


def test_warnings_are_one_line_and_the_command_goes_on(env, capsys, tmp_path):
    """A neurons file from another model of the same shape is used with a one-line warning naming both models;
    an absurd amplify factor is allowed with a warning saying what it does."""
    root, paths = env
    other = tmp_path / "other.json"
    other.write_text(json.dumps(_kn([[0, 3], [1, 4]], name="some-other-model")))
    code = main(["amplify", "--model", paths["model"], "--neurons", str(other), "--factor", "1e30"])
    err = capsys.readouterr().err
    warns = [line for line in err.splitlines() if line.startswith("kneurons: warning:")]
    assert code == 0 and "Traceback" not in err
    assert any("'some-other-model'" in w and "'model'" in w for w in warns)
    assert any("more than 100" in w for w in warns)


def test_a_flat_distribution_ranks_the_target_last_not_first():
    """Ties count against the target: with every logit equal nothing is top-1 (the old rule ranked it 1)."""
    from kneurons import assess
    from kneurons.interventions import success

    h = _h()
    with torch.no_grad():
        h.model.lm_head.weight.zero_()
    a = assess(h, PROMPTS[0], "paris")[0]
    vocab = h.model.lm_head.weight.shape[0]
    assert a.rank == vocab and not a.correct
    assert a.prob == pytest.approx(1 / vocab)
    assert success(h, PROMPTS[:1], "paris", k=1) == 0.0
    res = assess(h, PROMPTS[0], "paris", candidates=["paris", "berlin", "rome"])[0]
    assert res.candidate_rank == 3  # tied with both other candidates
