"""The paper's experiments (Sections 3-5), each usable alone, and the resumable runner behind ``kneurons run``.

* :mod:`.assess` — which facts the model knows; :mod:`.locate` — knowledge neurons + baselines + statistics;
  :mod:`.suppress` — suppress/amplify; :mod:`.activations` — BingRel activating prompts; :mod:`.update` — fact
  update; :mod:`.erase` — relation erasing; :mod:`.store` — the crash-safe run store; :mod:`.runner` — all of it;
  :mod:`.editing` — knowledge-neuron edits scored on CounterFact/zsRE cases (reliability, generalization,
  locality).
"""

from .activations import bag_activations, neuron_activations
from .assess import assess_facts
from .common import FactItem, controls_for, fact_items
from .editing import edit_case, evaluate_edits
from .erase import erase_experiment
from .locate import locate_fact, locate_stats
from .paper import PAPER
from .registry import EXPERIMENTS, register_experiment
from .common import Experiment
from .runner import RunConfig, Runner, run
from .store import RunStore
from .suppress import intervene_fact
from .update import measure_update, update_experiment

__all__ = ["assess_facts", "locate_fact", "locate_stats", "intervene_fact", "bag_activations",
           "neuron_activations", "update_experiment", "measure_update", "erase_experiment", "FactItem", "fact_items", "controls_for",
           "RunConfig", "Runner", "run", "RunStore", "EXPERIMENTS", "Experiment", "register_experiment", "PAPER", "edit_case", "evaluate_edits"]
