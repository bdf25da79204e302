"""The benchmark harness: several algorithms from ONE start, same data, same budget, many replicates, verdicts.

``prefopt bench BENCH.yaml [key=value ...]`` runs prefopt.bench.runner.run_bench; ``prefopt bench report RUN_DIR``
rebuilds the report from a run directory alone. The modules, in the order a bench flows through them:

    config     the bench config dataclasses
    recipes    reading + validating a bench; the ``prefopt train`` recipe of every stage and run
    files      JSON / JSON-lines in and out, content keys
    world      the known-gold world as pure maths (prompts, true reward, labels)
    data       the pinned, disjoint parts and the prompt sets
    launch     trains ONE recipe into a directory, counting its cost
    stages     the shared start and each world draw's labels and proxy RM, keyed by content
    plan       which runs exist, with which recipe, checkpoints and key
    evaluate   a policy's samples, scores, KL and pair margins on the shared prompt sets
    manifest   everything a result depends on
    runner     the phases in order, the worker processes, the learning-rate / knob choice
    report     results.md, tables and plots from the run directory alone

This package imports nothing itself: the registry imports prefopt.bench.world (the world's reward component)
without loading the rest of the bench.
"""
