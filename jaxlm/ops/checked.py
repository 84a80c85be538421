"""Value checks that work under ``jit``: ``ops.checked(fn)``.

Outside ``jit`` the ops check the values of their gates (g <= 0, finite beta) and raise a
ValueError. Inside ``jit`` the values are unknown when the op is traced, so by default only
shapes are checked: a positive gate then silently grows the state without bound. Wrapping a
function in ``checked`` traces it with ``jax.experimental.checkify`` and the value checks
compiled in, so the same ValueError comes back from a jitted call:

    loss = ops.checked(jax.jit(loss_fn))   # or jax.jit inside fn; both work
    value = loss(params, batch)            # ValueError: g must be a natural-log decay <= 0 ...

The checks cost a reduction per checked argument and a host round trip per call, so they are
for debugging, not for every training step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import checkify

# A jit-cache-sensitive flag: a jitted function traced under ``checked`` (with checks compiled
# in) is traced again when called without it, rather than reusing the checked trace.
_TRACING_CHECKED = jax.make_user_context(False)


def values_checked() -> bool:
    """True while ``checked`` traces its function: ops then compile their value checks in."""
    return bool(_TRACING_CHECKED.value)


def check_value(ok: Any, message: str, *values: Any) -> None:
    """A checkify check that every entry of the traced bool array ``ok`` holds, only in checked mode;
    ``values`` fill the message's ``{}`` fields."""
    if values_checked():
        checkify.check(jnp.all(ok), message, *values)


def checked(fn: Callable) -> Callable:
    """fn with the ops' value checks compiled in, raising ValueError when one fails."""
    checkified = checkify.checkify(fn, errors=checkify.user_checks)

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with _TRACING_CHECKED(True):
            error, out = checkified(*args, **kwargs)
        message = error.get()
        if message is not None:
            raise ValueError(message.split("\n")[0].removesuffix(" (`check` failed)"))
        return out

    return run
