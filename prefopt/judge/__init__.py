"""Judging trained policies: seeded replies, their scores, KL, win rate, pass@k and preference accuracy.

The one evaluation core, for ``prefopt generate`` / ``prefopt eval`` (prefopt.judge.commands) and the benchmark.
It takes loaded models, a tokenizer and prompt batches, and returns rows; it knows no files:

* ``sampling``: ``draws`` (seeded replies with common random numbers, by the one generation engine),
  ``measure`` / ``sample_and_measure`` (length, logp, entropy, KL to a reference, judge scores per reply);
* ``pairs``: ``pair_logps`` and ``preference_rows`` (implicit-reward preference accuracy, Rafailov et al. 2023);
* ``summary``: per-prompt rows (the units of every interval and bootstrap) and per-model summaries with pandas;
* ``stats``: paired wins, pass@k (Chen et al. 2021), a mean with its interval.

(prefopt.evaluation is something else: the held-out loss metrics a run logs while it trains.)
"""

from prefopt.judge.pairs import pair_logps, preference_rows
from prefopt.judge.sampling import Draw, draw_seed, draws, measure, policy_measures, sample_and_measure
from prefopt.judge.stats import mean_interval, paired_wins, pass_at_k
from prefopt.judge.summary import preference_summary, prompt_frame, summarise

__all__ = ["Draw", "draw_seed", "draws", "mean_interval", "measure", "pair_logps", "paired_wins", "pass_at_k",
           "policy_measures", "preference_rows", "preference_summary", "prompt_frame", "sample_and_measure",
           "summarise"]
