"""Benchmarks of torchspec_ext's ops: ``python -m torchspec_ext.bench NAME [--device ...] [--json PATH]``.

Each benchmark is a module with ``run(args) -> common.Report``, registered by one line in
:data:`torchspec_ext.bench.__main__.BENCHMARKS`.
"""
