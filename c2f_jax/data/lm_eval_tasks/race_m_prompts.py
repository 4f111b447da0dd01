"""lm-eval's own RACE prompt functions, for race_m.yaml (so RACE-M and lm-eval's RACE-H read alike)."""

from lm_eval.tasks.race.preprocess_race import doc_to_choice, doc_to_target, doc_to_text  # noqa: F401
