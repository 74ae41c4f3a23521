"""Evaluation: perplexity and isotropy, lm-eval tasks (afpt's own under ``lm_eval_tasks/``), the report, and
``stage=evaluate``."""
