"""Evaluation: the gold metric on held-out prompts, judges, acceptance, and the
``python -m ptlight.eval`` app (:mod:`ptlight.eval.app`)."""
