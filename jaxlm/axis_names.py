"""The names of axes that several parts of jaxlm share: the device mesh's axes and the logical
axes of parameters.

This module imports nothing, so ``jaxlm.ops`` (the MoE all-to-all over ``expert``), the layers
(which name their parameters' axes) and ``jaxlm.sharding`` (which builds the mesh and maps
logical axes to mesh axes through ``RULES``) all read the names here without an upward import.

Mesh axes, outermost first:
  data     batch rows; parameters replicated
  fsdp     batch rows too, and parameters sharded over their model-width axis (ZeRO-3 style)
  expert   MoE experts (shard_map and all-to-all over this axis)
  context  the sequence axis of activations (context parallelism); no parameter maps to it
  tensor   the head, feed-forward and vocabulary axes of the matmuls (Megatron style, GSPMD)

Logical axes of parameters, attached by the layers as the ``logical_axes`` metadata of each
``nnx.Param`` (None for an axis that is never sharded):
  vocab    the vocabulary (embedding rows, output head columns)
  embed    the model width d_model: the residual stream's channels
  heads    heads × head width: what attention and the recurrent mixers project into and out of
  mlp      the hidden width of a feed-forward or expert
  expert   the routed experts of an MoE layer
"""

DATA, FSDP, EXPERT, CONTEXT, TENSOR = "data", "fsdp", "expert", "context", "tensor"
MESH_AXES = (DATA, FSDP, EXPERT, CONTEXT, TENSOR)
BATCH_AXES = (DATA, FSDP)  # mesh axes that split the batch rows

VOCAB, EMBED, HEADS, MLP = "vocab", "embed", "heads", "mlp"
LOGICAL_AXES = (VOCAB, EMBED, HEADS, MLP, EXPERT)  # EXPERT names a logical and a mesh axis alike

# The nnx.Variable metadata key that holds a parameter's logical axes, one entry per array axis.
METADATA_KEY = "logical_axes"
