"""Prefill and compiled decode with the model's caches, and the ``python -m jaxlm.generate`` CLI.

The prompt is prefilled once, through the chunk form and the attention KV caches; then a
``lax.while_loop`` decodes one token per step through the recurrent form, all inside one jit.
Prompts of different lengths are left-padded, and the padding is a document of its own
(segment 0), so no prompt token attends to it or carries state from it.
"""

from __future__ import annotations

import dataclasses
import sys
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.models import LM
from jaxlm.sampling import check_sampling, next_token

PAD_ID = 0


def left_pad(prompt) -> tuple[np.ndarray, np.ndarray]:
    """An int array [B, T], or a sequence of B token sequences of any lengths, -> (tokens [B, T]
    left-padded with PAD_ID, segment_ids [B, T]: 0 on padding, 1 on the prompt)."""
    if isinstance(prompt, (np.ndarray, jax.Array)):
        rows = np.asarray(prompt)
        if rows.ndim != 2 or not np.issubdtype(rows.dtype, np.integer):
            raise ValueError(f"prompt must be integer token ids [B, T], got {rows.dtype} {rows.shape}")
        rows = list(rows)
    else:
        rows = [np.asarray(r) for r in prompt]
        if not rows or any(r.ndim != 1 or (r.size and not np.issubdtype(r.dtype, np.integer)) for r in rows):
            raise ValueError("prompt must be an int array [B, T] or a non-empty sequence of 1-D token id sequences")
    lengths = [len(r) for r in rows]
    if min(lengths) == 0:
        raise ValueError(f"every prompt needs at least one token; got lengths {lengths}")
    t = max(lengths)
    tokens = np.full((len(rows), t), PAD_ID, np.int32)
    segment_ids = np.zeros((len(rows), t), np.int32)
    for i, row in enumerate(rows):
        tokens[i, t - len(row):] = row
        segment_ids[i, t - len(row):] = 1
    return tokens, segment_ids


@partial(nnx.jit, static_argnames=("max_new_tokens", "temperature", "top_k", "top_p", "eos_id", "on_token"))
def _generate(model: LM, tokens, segment_ids, rng, *, max_new_tokens, temperature, top_k, top_p, eos_id, on_token):
    b, t = tokens.shape
    pick = partial(next_token, temperature=temperature, top_k=top_k, top_p=top_p)
    fill = PAD_ID if eos_id is None else eos_id
    emit = (lambda i, tok: jax.debug.callback(on_token, i, tok, ordered=True)) if on_token else (lambda i, tok: None)

    cache = model.init_cache(batch_size=b, max_len=t + max_new_tokens)
    prefill = model(tokens, segment_ids=segment_ids, cache=cache)
    rng, key = jax.random.split(rng)
    first = pick(prefill.logits[:, -1], key)
    emit(0, first)
    buffer = jnp.full((b, max_new_tokens), fill, jnp.int32).at[:, 0].set(first)
    done = jnp.zeros((b,), bool) if eos_id is None else first == eos_id

    def unfinished(carry):
        i, done = carry[0], carry[4]
        return (i < max_new_tokens) & ~jnp.all(done)

    def decode_step(carry):
        i, cache, token, rng, done, buffer = carry
        out = model(token[:, None], cache=cache)
        rng, key = jax.random.split(rng)
        token = jnp.where(done, fill, pick(out.logits[:, 0], key))
        emit(i, token)
        buffer = jax.lax.dynamic_update_slice(buffer, token[:, None], (0, i))
        if eos_id is not None:
            done = done | (token == eos_id)
        return i + 1, out.cache, token, rng, done, buffer

    carry = (jnp.int32(1), prefill.cache, first, rng, done, buffer)
    buffer = jax.lax.while_loop(unfinished, decode_step, carry)[-1]
    return jnp.concatenate([tokens, buffer], axis=1)


def generate(
    model: LM,
    prompt,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    rng: jax.Array | None = None,
    eos_id: int | None = None,
    on_token: Callable[[int, np.ndarray], None] | None = None,
) -> jax.Array:
    """Continues each prompt by ``max_new_tokens`` tokens.

    Args:
      prompt: int tokens [B, T], or B token sequences of different lengths (left-padded here).
      temperature: 0 is greedy; otherwise sample softmax(logits / temperature).
      top_k, top_p: truncate the distribution to the k most likely tokens / the nucleus of mass p.
      rng: a PRNG key, needed when temperature > 0.
      eos_id: a row that emits it stops; its later tokens are eos_id. Decoding ends early when
        every row has stopped.
      on_token: called as on_token(step, tokens [B]) for each decoded step, in order, from
        inside the compiled loop (for streaming).
    Returns:
      [B, T + max_new_tokens] int32: the left-padded prompt, then the continuation.
    """
    if not isinstance(model, LM):
        raise ValueError(f"model must be a jaxlm.models.LM, got {type(model).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    check_sampling(temperature, top_k, top_p)
    if temperature > 0 and rng is None:
        raise ValueError("rng is required when temperature > 0 (pass jax.random.key(seed))")
    vocab = model.config.vocab_size
    if eos_id is not None and not 0 <= eos_id < vocab:
        raise ValueError(f"eos_id must be in [0, vocab_size={vocab}), got {eos_id!r}")
    tokens, segment_ids = left_pad(prompt)
    if tokens.max() >= vocab or tokens.min() < 0:
        raise ValueError(f"prompt token ids must be in [0, vocab_size={vocab}), got [{tokens.min()}, {tokens.max()}]")
    rng = jax.random.key(0) if rng is None else rng
    return _generate(
        model, jnp.asarray(tokens), jnp.asarray(segment_ids), rng, max_new_tokens=max_new_tokens,
        temperature=float(temperature), top_k=top_k, top_p=top_p, eos_id=eos_id, on_token=on_token,
    )


@dataclasses.dataclass
class GenerateArgs:
    """Generate text from a trained checkpoint, or from a preset with random weights."""

    prompt: str = "def "
    """The text to continue."""
    max_new_tokens: int = 200
    checkpoint: str | None = None
    """A run folder written by `python -m jaxlm.train` or `python -m jaxlm.convert` (its latest checkpoint
    is loaded)."""
    preset: str = "gated_deltanet"
    """Without --checkpoint: the model family, with random weights."""
    size: str = "tiny"
    """Without --checkpoint: the preset's size."""
    tokenizer: str | None = None
    """The tokenizer spec (see jaxlm.data). With --checkpoint it replaces the one the run folder
    records; without, it defaults to byte."""
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = 0.95
    seed: int = 0


def _load_checkpoint(folder: str) -> tuple[LM, str | None]:
    """(model, recorded tokenizer spec) of the run folder --checkpoint names; ValueError naming
    the folder or its config.json when it is not one that generation can load."""
    from jaxlm.models import ModelConfig
    from jaxlm.training.checkpointing import CONFIG_FILE, load_trained_model, read_run_config

    run_dir = Path(folder)
    what = "pass a run folder written by python -m jaxlm.train or python -m jaxlm.convert"
    if not run_dir.exists():
        raise ValueError(f"--checkpoint {folder} does not exist; {what}")
    if not run_dir.is_dir():
        raise ValueError(f"--checkpoint {folder} is a file, not a run folder; {what}")
    record = read_run_config(run_dir)  # ValueError naming config.json when it holds no run record
    # load_trained_model builds ModelConfig(**record["model"]): check it here, where the message
    # can name the file, instead of surfacing a bare ModelConfig complaint.
    config_file = run_dir / CONFIG_FILE
    try:
        ModelConfig().replace(**record["model"])
    except ValueError as err:
        raise ValueError(f"{config_file} records a model config jaxlm cannot build: {err}") from None
    return load_trained_model(run_dir)


def _recorded_tokenizer(checkpoint: str, recorded: str | None) -> str:
    """The tokenizer spec a run folder records; ValueError when it records none."""
    if recorded is None:
        # python -m jaxlm.convert records null for a Hugging Face folder without tokenizer.json.
        raise ValueError(f"--checkpoint {checkpoint} records no tokenizer (its config.json has tokenizer null); "
                         "pass --tokenizer, e.g. --tokenizer path/to/tokenizer.json of the original model")
    return recorded


def _run(args: GenerateArgs) -> None:
    from jaxlm.data import load_tokenizer
    from jaxlm.models import preset

    # Flags are checked before anything is loaded or printed: a mistake costs no time and
    # leaves no half-written output.
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    check_sampling(args.temperature, args.top_k, args.top_p)
    tokenizer = None if args.tokenizer is None else load_tokenizer(args.tokenizer)
    if args.checkpoint is not None:
        model, recorded = _load_checkpoint(args.checkpoint)
        if tokenizer is None:
            tokenizer = load_tokenizer(_recorded_tokenizer(args.checkpoint, recorded))
        vocab = model.config.vocab_size
        if tokenizer.vocab_size > vocab:  # a smaller one is fine: HF models pad their vocab
            raise ValueError(f"tokenizer {tokenizer.spec!r} has {tokenizer.vocab_size} ids but the model in "
                             f"--checkpoint {args.checkpoint} has vocab_size {vocab}; pass the tokenizer it was "
                             "trained with")
    else:
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer("byte")
        config = preset(args.preset, args.size, vocab_size=tokenizer.vocab_size)
        model = LM(config, rngs=nnx.Rngs(args.seed))
        print(f"(random weights: preset {args.preset!r} size {args.size!r}; pass --checkpoint RUN_DIR for a trained model)",
              file=sys.stderr)
    prompt = np.asarray(tokenizer.encode(args.prompt), np.int32)[None]
    if prompt.size == 0:
        raise ValueError("--prompt is empty; pass the text to continue (at least one token)")
    decoded: list[int] = []
    printed = 0

    def stream(step, tokens):
        nonlocal printed
        decoded.append(int(np.asarray(tokens)[0]))
        text = tokenizer.decode(decoded)
        if "\ufffd" not in text[printed:]:  # wait for the rest of a multi-byte character
            print(text[printed:], end="", flush=True)
            printed = len(text)

    print(args.prompt, end="", flush=True)
    generate(
        model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        rng=jax.random.key(args.seed), on_token=stream,
    )
    print(tokenizer.decode(decoded)[printed:])


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m jaxlm.generate``: a user's mistake ends in one ``error:`` line, exit status 1."""
    import tyro

    from jaxlm.cli import report_user_errors

    args = tyro.cli(GenerateArgs, args=argv)
    report_user_errors(lambda: _run(args))


if __name__ == "__main__":
    main()
