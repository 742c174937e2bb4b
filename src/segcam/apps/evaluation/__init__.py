"""The evaluation of explanations over datasets (``segcam evaluate``, ``make evaluate``).

:mod:`~segcam.apps.evaluation.benchmarks` runs the benchmarks and scores the maps with
:mod:`segcam.metrics`; :mod:`~segcam.apps.evaluation.reports` summarises the records (means with
bootstrap intervals) into tables and plots.
"""

from segcam.apps.evaluation.benchmarks import (
    BUILT_IN,
    EVIDENCE_HELD_OUT_SEED,
    evaluate_ct,
    evaluate_evidence,
    evaluate_folder,
    evaluate_randomization,
    evidence_accuracy,
    run_evaluation,
    score_against_truth,
)
from segcam.apps.evaluation.reports import bootstrap_interval, summarise, write_outputs

__all__ = [
    "BUILT_IN",
    "EVIDENCE_HELD_OUT_SEED",
    "bootstrap_interval",
    "evaluate_ct",
    "evaluate_evidence",
    "evaluate_folder",
    "evaluate_randomization",
    "evidence_accuracy",
    "run_evaluation",
    "score_against_truth",
    "summarise",
    "write_outputs",
]
