"""The parts of ``python -m torchspec_ext.train`` (the command itself, with its step loop, is
``torchspec_ext/train.py``):

- ``config``: the options (command line and ``--config`` file) as a :class:`TrainConfig`
- ``errors``: :class:`TrainError` (the user's input or setup) and the stop signals
- ``batches``: token batches of conversations in a seeded, resumable order
- ``streams``: where a trainer's teacher batches come from (online, replayed, cached, routed)
- ``cache``: the ``--cache-teacher`` directory
- ``trainer``: the draft, its optimiser and one training step
- ``checkpoints``: atomic save, find and load; the output directory's layout
- ``roles``: the ranks of a torchrun job (teachers, trainers, the lead trainer)
- ``metrics``: metrics.jsonl, TensorBoard and the progress line
- ``budget``: ``--time-budget``'s plan from measured costs
"""
