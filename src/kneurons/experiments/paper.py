"""The published numbers of Dai et al. (2022) for BERT-base-cased on PARAREL, to print beside ours."""

PAPER_MODEL = "bert-base-cased"

#: experiment -> quantity -> value (fractions for relative changes, raw values otherwise)
PAPER = {
    "locate": {"neurons_per_fact": 4.13, "neurons_per_fact_activation": 3.96,
               "layers": "mostly in the top layers"},
    "suppress": {"kn": -0.2903, "activation": -0.0147},
    "amplify": {"kn": 0.3117, "activation": -0.0127},
    "activations": {"head_tail": 0.485, "head_only": 0.019, "random": -0.018},
    "update": {"success1_kn": 0.344, "success1_random": 0.0, "delta_ppl_inter_kn": 7.2,
               "delta_ppl_inter_random": 4.3},
    "erase": {"relations": ["P19", "P27", "P106", "P937"], "erased_ppl_change": (0.367, 1.412),
              "other_ppl_change": (0.011, 0.101)},
}
