"""``python -m jaxlm.train``: the training job. ``--help`` lists the arguments; see README.md."""

from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    from jaxlm.sharding import initialize_distributed

    initialize_distributed()  # before anything touches the devices
    from jaxlm.training.args import parse_args
    from jaxlm.training.loop import NonFiniteLoss, train

    try:
        train(parse_args(argv))
    except NonFiniteLoss as err:
        sys.exit(str(err))  # the message alone on stderr, exit status 1


if __name__ == "__main__":
    main()
