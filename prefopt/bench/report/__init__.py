"""The bench report: results.md, CSVs and figures rebuilt from a run directory alone (``prefopt bench report DIR``).

Floors, each reading only the ones below: reading (files -> frames) -> curves (frames -> per-run arrays) ->
frontier, stats, tdist (pure maths) -> views (a label's values at a matched KL or its best point) -> verdicts, gates,
tables -> plots -> write (results.md). coverage measures the intervals' coverage on simulated data.
"""

from prefopt.bench.report.write import write_report

__all__ = ["write_report"]
