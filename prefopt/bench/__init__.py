"""The benchmark harness: several algorithms from ONE start, on the same pinned splits, several seeds.

``prefopt bench BENCH.yaml [key=value ...]`` (``run_bench``) follows the protocol of DESIGN.md:

1. pinned splits: the HH pairs are cut by a stable hash into DISJOINT parts ``policy_train``,
   ``proxy_rm_train``, ``gold_rm_train`` and ``eval`` (prefopt.data.splits.assign), written as files;
2. the start (init -> pt -> sft), a proxy RM and a gold RM, each cached under ``cache_dir/<stage>-<hash>``
   by a hash of its recipe, its input stage and its data (prefopt.bench.start);
3. every listed algorithm (a partial recipe merged over shared ``defaults``) trains from the same SFT
   checkpoint with the same budget for every seed, each run a ``prefopt train`` SUBPROCESS in its own
   directory; online algorithms get the proxy RM as reward, the gold RM is never seen in training;
4. every policy is evaluated on the same eval prompts and pairs with the shared generation engine and a
   fixed sampling seed (prefopt.bench.evaluate), then tabulated and plotted (prefopt.bench.report).

``task: synthetic`` runs the same harness on prefopt.tasks' programmatic reward: the known true reward takes
the place of both RMs (``reward: known``).
"""

from prefopt.bench.config import BenchConfig, load_bench_config

__all__ = ["BenchConfig", "load_bench_config", "run_bench"]


def run_bench(recipe, overrides=()):
    """See prefopt.bench.runner.run_bench (imported lazily: it pulls in torch and matplotlib)."""
    from prefopt.bench.runner import run_bench as _run

    return _run(recipe, overrides)
