"""``python -m jaxlm.train``: the training job. ``--help`` lists the arguments; see README.md."""

from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    from jaxlm.sharding import initialize_distributed

    initialize_distributed()  # before anything touches the devices
    from jaxlm.cli import report_user_errors
    from jaxlm.training.args import parse_args
    from jaxlm.training.loop import NonFiniteLoss, Stopped, train

    try:
        report_user_errors(lambda: train(parse_args(argv)))
    except NonFiniteLoss as err:
        sys.exit(str(err))  # the message alone on stderr, exit status 1
    except Stopped as err:
        print(err, file=sys.stderr)
        sys.exit(err.exit_status)


if __name__ == "__main__":
    main()
