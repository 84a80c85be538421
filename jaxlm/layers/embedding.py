"""Token embedding and the output head, tied (logits = x·Eᵀ) or untied (a separate [D, N] matrix)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxlm.axis_names import EMBED, VOCAB
from jaxlm.layers.initializers import INIT_STD, param
from jaxlm.layers.validation import check_positive
from jaxlm.typing import Hidden, Logits, TokenIds


class Embedding(nnx.Module):
    """tokens [B, T] -> [B, T, D] with ``__call__``; hidden [B, T, D] -> logits [B, T, N] with ``logits``.

    Both matrices start normal(0.02). Logits come back in float32: the matmul accumulates in
    float32 and the softmax cross-entropy that follows wants them there.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        *,
        tie_output: bool = True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_positive(vocab_size=vocab_size, d_model=d_model)
        self.tie_output = tie_output
        self.dtype = dtype
        init = nnx.initializers.normal(INIT_STD)
        self.embedding = param(init(rngs.params(), (vocab_size, d_model), param_dtype), (VOCAB, EMBED))  # [N, D]
        head = None if tie_output else init(rngs.params(), (d_model, vocab_size), param_dtype)  # [D, N]
        self.head = None if head is None else param(head, (EMBED, VOCAB))

    def __call__(self, tokens: TokenIds) -> Hidden:
        """tokens: [B, T] ints -> [B, T, D] in the compute dtype."""
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

    def logits(self, x: Hidden) -> Logits:
        """x: [B, T, D] -> [B, T, N] float32."""
        x = x.astype(self.dtype)
        if self.tie_output:
            w = self.embedding[...].astype(self.dtype)
            return jnp.einsum("btd,nd->btn", x, w, preferred_element_type=jnp.float32)
        w = self.head[...].astype(self.dtype)
        return jnp.einsum("btd,dn->btn", x, w, preferred_element_type=jnp.float32)
