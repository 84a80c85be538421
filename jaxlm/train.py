"""``python -m jaxlm.train``: the training job. ``--help`` lists the arguments; see README.md."""

from __future__ import annotations

import os
import sys
from typing import Sequence

DEBUG_VARIABLE = "JAXLM_DEBUG"  # set to 1 for the traceback of an argument error


def main(argv: Sequence[str] | None = None) -> None:
    from jaxlm.sharding import initialize_distributed

    initialize_distributed()  # before anything touches the devices
    from jaxlm.training.args import parse_args
    from jaxlm.training.loop import NonFiniteLoss, Stopped, train

    try:
        train(parse_args(argv))
    except NonFiniteLoss as err:
        sys.exit(str(err))  # the message alone on stderr, exit status 1
    except ValueError as err:  # a bad argument, file or folder: the message, without a traceback
        if os.environ.get(DEBUG_VARIABLE):
            raise
        sys.exit(f"error: {err}\n(set {DEBUG_VARIABLE}=1 for the traceback)")
    except Stopped as err:
        print(err, file=sys.stderr)
        sys.exit(err.exit_status)


if __name__ == "__main__":
    main()
