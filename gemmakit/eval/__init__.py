"""Evaluation as the Gemma reports do it: the lm-eval harness adapter (lm_eval_model), memorization rates
(memorization) and the inference-time window override (window). Perplexity is in gemmakit.evaluate."""
