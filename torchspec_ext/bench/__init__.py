"""Benchmarks of torchspec_ext's ops: ``python -m torchspec_ext.bench NAME [--device ...] [--json PATH]``.

Each benchmark is a module with ``run(args) -> report.Report``, registered by one line in
:data:`torchspec_ext.bench.__main__.BENCHMARKS`.
:mod:`~torchspec_ext.bench.common` holds the measuring (timing, bandwidth, memory, targets),
:mod:`~torchspec_ext.bench.report` the showing and writing (Report, columns, headers, ``all``).
"""
