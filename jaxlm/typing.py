"""Array types with named dimensions (jaxtyping), shared by ops, layers and caches.

Dimension letters:

  B  batch                          T  tokens of the call (queries)
  S  keys of softmax attention      L  slots of a KV cache
  H  query/key heads                HV value heads, a multiple of H (grouped values)
  Hk key/value heads of softmax attention; H is a multiple of Hk (GQA)
  K  query/key head dim             V  value head dim (attention's docs call them D and Dv)
  D  model width, or the channels of the short convolution
  W  conv width                     N  vocabulary
  M  rows of the grouped experts    E  experts      F  expert hidden width
  C  tokens of one chunk (the chunk forms)

Every alias accepts a jax array (a tracer too) or a numpy array, as the ops do. A name binds once
per call: jaxtyping checks that every argument and the result of one function agree on it
("#K" is K or 1; "W-1" needs W bound by an earlier argument).

Who is checked, and when. Users pay nothing: the aliases are plain annotations, checked by no one
at run time. The test suite installs jaxtyping's import hook with beartype (tests/conftest.py),
which wraps every function of ``jaxlm.ops`` and ``jaxlm.layers`` in a checker, so an array that
breaks an annotation fails the tests with a ``jaxtyping.TypeCheckError``, eagerly and under jit.

The public ops are the exception. Their arguments are checked by ``jaxlm.ops.validation``, which
raises the ``ValueError`` naming the argument that users see, and must still see under the
checked run: a checker at the entry point would answer a wrong shape, a float chunk_size or a
string impl with its own error first. So the public ops carry these aliases as documentation and
are marked ``@no_type_check`` (below), which the hook skips, and the checked annotations sit on
the functions they call after validation (canonicalisation, every registered form, the kernels'
drivers, the chunk steps), where a mismatch is a bug of jaxlm, not of its caller. A validator
itself takes ``Any``. Layers are checked at ``__call__``. The caches' fields (NamedTuples, which
the hook does not check when built) document their shapes; the functions that take the arrays
check them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import jax
import numpy as np
from jaxtyping import Bool, Float, Int

_F = TypeVar("_F", bound=Callable)


def no_type_check(fn: _F) -> _F:
    """Leaves a public entry point to ``ops.validation``: jaxtyping's import hook does not wrap a
    function decorated with a ``no_type_check`` (it matches the name). Unlike
    ``typing.no_type_check`` it keeps the annotations for static checkers; at run time it returns
    ``fn`` itself."""
    return fn


# A jax array or a numpy array.
Arr = jax.Array | np.ndarray

# Linear recurrences.
QK = Float[Arr, "B T H K"]  # queries and keys (also softmax attention's queries)
Values = Float[Arr, "B T HV V"]  # values, and the outputs of a recurrence
State = Float[Arr, "B HV K V"]  # the recurrent state, float32
ScalarGate = Float[Arr, "B T HV"]  # log decays per head and step (simple_gla, gated_delta_rule)
VectorGate = Float[Arr, "B T HV K"]  # log decays per key channel (gla)
HeadDecay = Float[Arr, "HV"]  # g_gamma, a constant log decay per head
Beta = Float[Arr, "B T HV"]  # the delta rules' write strengths
SegmentIds = Int[Arr, "B T"]  # packed documents
Resets = Bool[Arr, "B T"]  # True where a document starts (the state is cleared before token t)
HeadQK = Float[Arr, "B T HV K"]  # q or k repeated to the value heads, as the forms take them
TokenGate = Float[Arr, "B T HV #K"]  # the token forms' gate: [.., 1] for a scalar gate, [.., K] for a vector one
ChunkValues = Float[Arr, "B C HV V"]  # one chunk's outputs
ChunkMatrix = Float[Arr, "*lead C C"]  # a C×C matrix per chunk (and leading axes)

# Softmax attention.
AttnKeys = Float[Arr, "B S Hk K"]
AttnValues = Float[Arr, "B S Hk V"]
AttnOut = Float[Arr, "B T H V"]
NewKeys = Float[Arr, "B T Hk K"]  # the call's keys and values, written into a KV cache
NewValues = Float[Arr, "B T Hk V"]
Documents = Int[Arr, "B T"]  # running document numbers of the queries
HeadMajorKeys = Float[Arr, "B Hk S K"]  # keys as the cache lays them out
HeadMajorValues = Float[Arr, "B Hk S V"]
QueryPositions = Int[Arr, "T"]
KeyPositions = Int[Arr, "S"]  # negative for an empty cache slot
KeyDocuments = Int[Arr, "B S"]

# KV cache (ops.KVCache).
CacheKeys = Float[Arr, "B Hk L K"]
CacheValues = Float[Arr, "B Hk L V"]
SlotDocuments = Int[Arr, "B L"]  # document of each slot's key, -1 while empty
RowDocuments = Int[Arr, "B"]  # document of each row's last token
Position = Int[Arr, ""]  # tokens written so far
HeadPositions = Int[Arr, "B Hk"]  # a position per row and key/value head

# Layers and the short convolution.
Hidden = Float[Arr, "B T D"]  # activations: a layer's input and output, the conv's input
Features = Float[Arr, "*lead D"]  # any leading axes, D channels last (norms, MLPs)
TokenIds = Int[Arr, "B T"]
Logits = Float[Arr, "B T N"]
ConvWeight = Float[Arr, "D W"]  # weight[:, W-1] multiplies the current token
ConvBias = Float[Arr, "D"]
ConvState = Float[Arr, "B W-1 D"]  # the last W-1 inputs, oldest first (W bound by the weight)

# Experts (ops.moe).
Rows = Float[Arr, "M D"]  # token rows, sorted by expert for the grouped forms
ExpertRows = Float[Arr, "E M D"]  # M rows for each expert (the capacity buffers)
UpWeights = Float[Arr, "E D F"]  # w_gate, w_up
DownWeights = Float[Arr, "E F D"]  # w_down
GroupSizes = Int[Arr, "E"]  # rows per expert
RouterLogits = Float[Arr, "M E"]
ExpertBias = Float[Arr, "E"]
