"""Entry point of the main job: ``python -m torchspec_ext.train``.

The online training loop is not implemented yet (it is the training issue); until it lands this
module says so and exits with status 2 instead of pretending to train.
"""

import sys


def main(argv=None) -> int:
    print(
        "torchspec_ext.train: not implemented yet - the online training loop has not landed. "
        "What works today: the ops in torchspec_ext.ops (topk_logprobs, linear_topk_logprobs) and "
        "`python -m torchspec_ext.bench topk`.",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
