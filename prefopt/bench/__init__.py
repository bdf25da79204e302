"""The benchmark harness: several algorithms from ONE start, same data, same budget, many seeds, verdicts.

``prefopt bench BENCH.yaml [key=value ...]`` (``run_bench``) follows the protocol of DESIGN.md:

1. the data (prefopt.bench.data): the known-gold world's prompts (``task: world``, prefopt.bench.world), HH pairs
   (``task: hh``) or prefopt.tasks' prompts (``task: synthetic``), cut by a stable hash into DISJOINT parts;
2. the start and the scorers, each cached by hash (prefopt.bench.start): init -> sft; world: preference labels
   from the true reward (Plackett-Luce / Bradley-Terry with label noise) and a proxy RM trained on them; hh: a
   proxy RM and a gold RM on disjoint parts;
3. a learning rate per algorithm from a sweep judged on the val prompts; then every algorithm over its KL knob
   (the Config field it declares as ``kl_knob``, prefopt.bench.execute) x seeds, trained in-process with
   snapshots along training (planned by prefopt.bench.plan, run by prefopt.bench.runner); online algorithms
   optimise the proxy (the gold never reaches training);
4. every snapshot evaluated on the same eval prompts with the same sampling seeds (prefopt.bench.evaluate); the
   best-of-n baseline from the start;
5. the report from the per-run logs alone (prefopt.bench.logs, .frontier, .tables, .diagnostics, .report):
   verdicts at matched KL with paired bootstrap intervals, frontiers with Gao et al.'s fits, step- and
   compute-matched views, reward-hacking flags.
"""

from prefopt.bench.config import BenchConfig, load_bench_config

__all__ = ["BenchConfig", "load_bench_config", "run_bench"]


def run_bench(recipe, overrides=()):
    """See prefopt.bench.runner.run_bench (imported lazily: it pulls in torch and matplotlib)."""
    from prefopt.bench.runner import run_bench as _run

    return _run(recipe, overrides)
