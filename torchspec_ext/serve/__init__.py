"""Serving with a draft: an OpenAI-compatible HTTP API (``python -m torchspec_ext.serve``) over an
engine interface (``engine``: the in-process speculative decoder first), a first-come-first-served
request queue (``scheduler``), and ``--learn``: the draft trained on the traffic it serves
(``learner``). docs/serving.md describes it."""
