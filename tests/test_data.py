"""jaxlm.data: sources, tokenizers, packing with segment ids, order, resumption, sharding, MQAR."""

import importlib.util
import json

import numpy as np
import pytest

from jaxlm import data

DOCS = {  # name -> text; lengths vary from 1 byte to several rows
    "a.txt": "alpha " * 40,
    "b.txt": "b",
    "c/d.txt": "the quick brown fox jumps over the lazy dog\n" * 3,
    "c/e.md": "ünïcödé ✓ " * 7,
    "f.txt": "0123456789" * 13,
    "g.txt": "short doc",
}


@pytest.fixture
def corpus_dir(tmp_path):
    root = tmp_path / "corpus"
    for name, text in DOCS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    (root / "binary.dat").write_bytes(b"\0\1\2")  # not text: skipped
    (root / ".hidden").write_text("hidden")  # hidden: skipped
    return root


def doc_tokens(order):
    """Byte-token arrays of DOCS in sorted-name order, permuted by `order`."""
    names = sorted(DOCS)
    return [np.frombuffer(DOCS[names[i]].encode(), np.uint8).astype(np.int64) for i in order]


def expected_rows(docs, steps, batch_size, seq_len):
    """Rows and full-row segment ids of `steps` batches packed from `docs` (repeated) by hand."""
    width = seq_len + 1
    need = steps * batch_size * width
    stream, owner = [], []
    while sum(map(len, stream)) < need:
        for d in docs:
            stream.append(d)
            owner.append(np.full(len(d), len(owner)))
    ids = np.concatenate(stream)[:need].reshape(-1, width)
    doc = np.concatenate(owner)[:need].reshape(-1, width)
    return ids, doc


def test_packing_follows_documents_and_order(corpus_dir):
    seq_len, batch_size, seed, steps = 16, 3, 5, 14
    it = data.build(str(corpus_dir), "byte", seq_len=seq_len, batch_size=batch_size, seed=seed, split="all")
    got = [next(it) for _ in range(steps)]
    n = len(DOCS)
    # epoch e reads the documents in default_rng((seed, e)).permutation order
    total = sum(len(t.encode()) for t in DOCS.values())
    epochs = steps * batch_size * (seq_len + 1) // total + 1
    assert epochs >= 2
    docs = [d for e in range(epochs) for d in doc_tokens(np.random.default_rng((seed, e)).permutation(n))]
    rows, owner = expected_rows(docs, steps, batch_size, seq_len)
    tokens = np.concatenate([b.tokens for b in got])
    targets = np.concatenate([b.targets for b in got])
    segments = np.concatenate([b.segment_ids for b in got])
    mask = np.concatenate([b.loss_mask for b in got])
    np.testing.assert_array_equal(tokens, rows[:, :-1])
    np.testing.assert_array_equal(targets, rows[:, 1:])
    np.testing.assert_array_equal(tokens[:, 1:], targets[:, :-1])
    # segment ids count documents along the row, from 0; the loss never crosses a document
    starts = np.diff(owner, axis=1, prepend=owner[:, :1]) != 0
    np.testing.assert_array_equal(segments, np.cumsum(starts, axis=1)[:, :-1])
    np.testing.assert_array_equal(mask, (owner[:, :-1] == owner[:, 1:]).astype(np.float32))
    assert (mask == 0).sum() >= 4 and segments.max() >= 1
    assert all(b.tokens.dtype == b.targets.dtype == b.segment_ids.dtype == np.int32 for b in got)
    assert got[0].loss_mask.dtype == np.float32


def test_text_files_skip_binary_and_hidden(corpus_dir):
    corpus = data.load_corpus(str(corpus_dir), "all")
    assert list(corpus.names) == sorted(DOCS)
    assert [corpus.load(i) for i in range(len(corpus))] == [DOCS[k] for k in sorted(DOCS)]
    glob = data.load_corpus(str(corpus_dir / "**" / "*.txt"), "all")
    assert list(glob.names) == sorted(k for k in DOCS if k.endswith(".txt"))


def write_bin(path, arrays, dtype, eot=None):
    parts = []
    for a in arrays:
        parts += [a] + ([np.array([eot])] if eot is not None else [])
    np.concatenate(parts).astype(dtype).tofile(path)


def test_bin_file_matches_text_source(corpus_dir, tmp_path):
    eot = 300  # not a byte: cannot be confused with text
    write_bin(tmp_path / "docs.bin", doc_tokens(range(len(DOCS))) + [np.zeros(0, np.int64)], np.uint16, eot)
    kw = dict(seq_len=12, batch_size=4, seed=3, split="all")
    text = data.build(str(corpus_dir), **kw)
    tokens = data.build(f"{tmp_path / 'docs.bin'}#eot={eot}", **kw)
    for _ in range(5):
        a, b = next(text), next(tokens)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def test_bin_file_without_boundaries_is_cut_into_rows(tmp_path):
    stream = np.arange(1000) % 251 + 3
    stream.astype(np.uint32).tofile(tmp_path / "s.uint32.bin")
    seq_len, width = 9, 10
    train = data.load_corpus(str(tmp_path / "s.uint32.bin"), "train", row_len=width)
    val = data.load_corpus(str(tmp_path / "s.uint32.bin"), "validation", row_len=width)
    assert (len(train), len(val)) == (98, 2)  # the last 2% of the stream is validation
    np.testing.assert_array_equal(val.load(1), stream[990:1000])
    it = data.build(str(tmp_path / "s.uint32.bin"), seq_len=seq_len, batch_size=7, seed=1)
    b = next(it)
    order = np.random.default_rng((1, 0)).permutation(98)[:7]
    np.testing.assert_array_equal(b.tokens, np.stack([stream[i * width : i * width + seq_len] for i in order]))
    assert (b.segment_ids == 0).all() and (b.loss_mask == 1).all()


def test_one_text_file_is_split_inside_it(tmp_path):
    """One document has no other to be validation: its tail is, cut by a rule of its length alone."""
    head, tail = "lower case train text. " * 217 + "x", "VALIDATION TAIL " * 256  # 4 992 + 4 096 characters
    (tmp_path / "one.txt").write_text(head + tail)
    spec = str(tmp_path / "one.txt")
    train, val = data.load_corpus(spec, "train"), data.load_corpus(spec, "validation")
    # 2% of 9 088 is 182 characters, under the minimum of 4 096 (itself under half the text)
    assert (train.load(0), val.load(0)) == (head, tail)
    assert data.load_corpus(spec, "all").load(0) == head + tail
    assert data.load_corpus(spec, "train").fingerprint == train.fingerprint  # the same cut every time
    seq_len, batch_size = 16, 4
    batches = data.build(spec, seq_len=seq_len, batch_size=batch_size, seed=0)
    seen = np.concatenate([next(batches).tokens.ravel() for _ in range(80)])  # more than one epoch of train
    assert set(bytes(seen.astype(np.uint8)).decode()) == set(head)  # no validation character in training
    val_batches = data.validation_batches(spec, seq_len=seq_len, batch_size=batch_size, num_batches=2)
    val_seen = bytes(np.concatenate([b.tokens.ravel() for b in val_batches]).astype(np.uint8)).decode()
    assert set(val_seen) == set(tail) and val_seen.startswith(tail[:seq_len])  # the tail, in order


def test_a_text_of_one_document_keeps_at_most_half_for_validation(tmp_path):
    (tmp_path / "short.txt").write_text("abcdefghij" * 30)  # 300 characters, under the minimum
    train = data.load_corpus(str(tmp_path / "short.txt"), "train").load(0)
    val = data.load_corpus(str(tmp_path / "short.txt"), "validation").load(0)
    assert (len(train), len(val)) == (150, 150) and train + val == "abcdefghij" * 30


def test_a_binary_file_named_as_text_is_refused(tmp_path):
    np.arange(40, dtype=np.uint16).tofile(tmp_path / "tokens.dat")  # token ids, but not named .bin
    with pytest.raises(ValueError) as excinfo:
        data.build(str(tmp_path / "tokens.dat"), seq_len=4, batch_size=1)
    assert str(excinfo.value) == (
        f"data {str(tmp_path / 'tokens.dat')!r}: {tmp_path / 'tokens.dat'} looks binary (a NUL byte in its first "
        "8192 bytes), not like text; if it holds token ids, name it *.bin (uint16 ids) or *.uint32.bin (uint32 ids)"
    )


def test_a_bin_file_of_the_wrong_size_gets_advice_that_fixes_it(tmp_path):
    (tmp_path / "odd.bin").write_bytes(b"\1\0\2\0\3")  # 5 bytes: no token width divides it
    with pytest.raises(ValueError, match=(
            r"odd.bin has 5 bytes, not a multiple of 2, the size of a uint16 token: an odd size fits neither "
            r"uint16 nor uint32 tokens, so the file was cut short or does not hold token ids; write it again as a "
            r"flat array, np.asarray\(ids, np.uint16\).tofile\(path\)")) as excinfo:
        data.build(str(tmp_path / "odd.bin"), seq_len=2, batch_size=1)
    assert "pass dtype=uint16 or dtype=uint32" not in str(excinfo.value)  # the old advice, which cannot help
    np.arange(3, dtype=np.uint16).tofile(tmp_path / "six.uint32.bin")  # 6 bytes: uint16 tokens, misnamed
    with pytest.raises(ValueError, match=(
            r"six.uint32.bin has 6 bytes, not a multiple of 4, the size of a uint32 token; if its tokens are "
            r"uint16, pass dtype=uint16 \(or drop .uint32 / .u32 from its name\)")):
        data.build(str(tmp_path / "six.uint32.bin"), seq_len=2, batch_size=1)
    tokens = data.load_corpus(f"{tmp_path / 'six.uint32.bin'}#dtype=uint16", "all").load(0)
    assert tokens.tolist() == [0, 1, 2]  # and that advice works


def test_bin_train_val_siblings_and_vocab_check(tmp_path):
    np.full(100, 7, np.uint16).tofile(tmp_path / "train.bin")
    np.full(50, 9, np.uint16).tofile(tmp_path / "val.bin")
    assert next(data.build(str(tmp_path / "train.bin"), seq_len=4, batch_size=2)).tokens.max() == 7
    val = next(data.build(str(tmp_path / "train.bin"), seq_len=4, batch_size=2, split="validation"))
    assert (val.tokens == 9).all()
    np.full(100, 256, np.uint16).tofile(tmp_path / "big.bin")
    with pytest.raises(ValueError, match="vocab_size 256"):
        next(data.build(str(tmp_path / "big.bin"), "byte", seq_len=4, batch_size=2))


def test_seed_fixes_order(corpus_dir):
    def first(seed, **kw):
        it = data.build(str(corpus_dir), seq_len=8, batch_size=2, seed=seed, split="all", **kw)
        return np.concatenate([next(it).tokens for _ in range(4)])

    np.testing.assert_array_equal(first(0), first(0))
    assert not np.array_equal(first(0), first(1))
    np.testing.assert_array_equal(first(0, shuffle=False), first(1, shuffle=False))


@pytest.mark.parametrize("spec", ["corpus", "mqar#vocab_size=64,num_kv_pairs=3"])
def test_restore_continues_exactly(corpus_dir, spec):
    spec = str(corpus_dir) if spec == "corpus" else spec
    kw = dict(seq_len=15, batch_size=3, seed=2, split="all")
    reference = data.build(spec, **kw)
    ref = [next(reference) for _ in range(12)]  # the tiny corpus wraps several epochs
    resumed = data.build(spec, **kw)
    for _ in range(5):
        next(resumed)
    saved = json.loads(json.dumps(resumed.state()))
    fresh = data.build(spec, **kw)
    fresh.restore(saved)
    for expected in ref[5:]:
        got = next(fresh)
        for x, y in zip(expected, got):
            np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="state"):
        fresh.restore({"step": -1})


@pytest.mark.parametrize("spec", ["corpus", "mqar#vocab_size=64,num_kv_pairs=2"])
def test_processes_partition_the_global_batch(corpus_dir, spec):
    spec = str(corpus_dir) if spec == "corpus" else spec
    kw = dict(seq_len=11, batch_size=8, seed=4, split="all")
    whole = data.build(spec, **kw)
    parts = [data.build(spec, process_index=p, process_count=4, **kw) for p in range(4)]
    for _ in range(3):
        expected = next(whole)
        got = [next(p) for p in parts]
        assert got[0].tokens.shape == (2, 11)
        for field in range(4):
            np.testing.assert_array_equal(np.concatenate([g[field] for g in got]), expected[field])
    with pytest.raises(ValueError, match="multiple of process_count=3"):
        data.build(spec, process_index=0, process_count=3, **kw)


def test_mqar_answers_are_the_paired_values():
    v, k, seq_len = 100, 6, 40
    it = data.build(f"mqar#vocab_size={v},num_kv_pairs={k}", seq_len=seq_len, batch_size=16, seed=7)
    b = next(it)
    assert it.tokenizer.vocab_size == v and data.load_tokenizer(it.tokenizer.spec).vocab_size == v
    for tokens, targets, mask in zip(b.tokens, b.targets, b.loss_mask):
        keys, values = tokens[0 : 2 * k : 2], tokens[1 : 2 * k : 2]
        assert len(set(keys)) == k and keys.max() < v // 2 and values.min() >= v // 2
        pairs = dict(zip(keys.tolist(), values.tolist()))
        where = np.flatnonzero(mask)
        assert len(where) == k and where.min() >= 2 * k and set(np.diff(where) % 2) <= {0}
        assert sorted(tokens[where].tolist()) == sorted(keys.tolist())  # each key queried once
        assert [pairs[key] for key in tokens[where]] == targets[where].tolist()
    assert (b.segment_ids == 0).all()
    spec = f"mqar#vocab_size={v},num_kv_pairs={k}"
    val = next(data.build(spec, seq_len=seq_len, batch_size=16, seed=7, split="validation"))
    assert not np.array_equal(val.tokens, b.tokens)


def test_mqar_queries_follow_a_power_law():
    rows, answers = data.mqar_rows(np.random.default_rng(0), 400, 255, data.MQARConfig(num_kv_pairs=4))
    slot = (np.nonzero(answers)[1] - 8) // 2  # 0 = right after the key-value block
    near, far = np.mean(slot < 10), np.mean(slot >= 62)
    assert near > 0.25 and 0.05 < far < near  # heavy head, long tail (uniform would give 0.08 / 0.5)
    with pytest.raises(ValueError, match="seq_len must be at least 4 \\* num_kv_pairs - 1 = 31"):
        data.build("mqar#num_kv_pairs=8", seq_len=20, batch_size=2)


def test_byte_tokenizer_round_trips():
    tok = data.load_tokenizer("byte")
    text = "héllo\n\twörld ✓ 🙂 \x00end"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.max() < 256 and len(ids) == len(text.encode())
    assert tok.decode(ids) == text and tok.vocab_size == 256 and tok.spec == "byte"
    assert tok.decode([0xC3, 0x28, 104, 999, -1]) == "\ufffd(h\ufffd\ufffd"  # invalid UTF-8 and ids


def test_bpe_trains_caches_and_round_trips(corpus_dir, tmp_path):
    tok = data.load_tokenizer(f"bpe:300:{corpus_dir}", cache_dir=tmp_path / "cache")
    assert tok.vocab_size == 300 and tok.spec == f"bpe:300:{corpus_dir}"
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".json"]
    for text in list(DOCS.values()) + ["unseen: Ωmega ∑ 🙂\r\n  end"]:
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(DOCS["a.txt"])) < len(DOCS["a.txt"]) / 3  # merges learned
    again = data.load_tokenizer(tok.spec, cache_dir=tmp_path / "cache")
    retrained = data.load_tokenizer(tok.spec, cache_dir=tmp_path / "other")
    sample = DOCS["c/d.txt"]
    assert tok.encode(sample).tolist() == again.encode(sample).tolist() == retrained.encode(sample).tolist()
    assert open(tok.path).read() == open(retrained.path).read()  # training is deterministic
    # a bare bpe:<n> in build trains on the data being loaded
    it = data.build(str(corpus_dir), "bpe:300", seq_len=8, batch_size=2, split="all", cache_dir=tmp_path / "cache")
    assert it.tokenizer.spec == tok.spec and next(it).tokens.max() < 300


def test_tokenizer_json_path(corpus_dir, tmp_path):
    tok = data.load_tokenizer(f"bpe:280:{corpus_dir}", cache_dir=tmp_path)
    loaded = data.load_tokenizer(tok.path)
    assert loaded.spec == tok.path and loaded.encode("fox dog").tolist() == tok.encode("fox dog").tolist()


def test_errors_name_the_problem(corpus_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no text files found"):
        data.build(str(tmp_path / "empty"), seq_len=8, batch_size=2)
    (tmp_path / "tiny.txt").write_text("abc")
    with pytest.raises(ValueError, match=r"holds only 3 tokens.*2 \* 9 = 18"):
        data.build(str(tmp_path / "tiny.txt"), seq_len=8, batch_size=2, split="all")
    np.zeros(0, np.uint16).tofile(tmp_path / "none.bin")
    with pytest.raises(ValueError, match="is empty"):
        data.build(str(tmp_path / "none.bin"), seq_len=8, batch_size=2, split="all")
    with pytest.raises(ValueError, match="accepted data specs"):
        data.build(str(tmp_path / "missing"), seq_len=8, batch_size=2)
    with pytest.raises(ValueError, match="accepted tokenizer specs"):
        data.build("default", "gpt7", seq_len=8, batch_size=2)
    with pytest.raises(ValueError, match="unknown option.*accepted: max_bytes"):
        data.build("default#size=3", seq_len=8, batch_size=2)
    with pytest.raises(ValueError, match="split must be one of"):
        data.build(str(corpus_dir), seq_len=8, batch_size=2, split="dev")
    with pytest.raises(ValueError, match="tokenizer must be None"):
        data.build("mqar", "byte", seq_len=64, batch_size=2)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets installed: would go online")
def test_hf_without_datasets_says_how_to_install():
    with pytest.raises(ImportError, match="pip install datasets"):
        data.build("hf:roneneldan/TinyStories", seq_len=8, batch_size=2)


def test_default_corpus_size_and_stable_split():
    whole = data.load_corpus("default", "all")
    train, val = data.load_corpus("default", "train"), data.load_corpus("default", "validation")
    size = sum(len(whole.load(i).encode()) for i in range(len(whole)))
    assert 4e6 <= size <= 16 * 2**20
    assert list(whole.names) == sorted(whole.names) and any(n.startswith("pydoc/") for n in whole.names)
    assert set(train.names) | set(val.names) == set(whole.names) and not set(train.names) & set(val.names)
    assert 0.01 < len(val) / len(whole) < 0.04
    assert all(data.split_fraction(n) < data.VALIDATION_FRACTION for n in val.names)
    # the split is a fixed function of the name (BLAKE2b), the same in every process and run
    assert data.split_fraction("stdlib/json/decoder.py") == pytest.approx(0.8267018011847423, abs=0)
    b = next(data.build("default", seq_len=64, batch_size=4, seed=0))
    assert b.tokens.shape == (4, 64) and b.loss_mask.sum() > 0


def test_validation_batches_are_fixed(corpus_dir):
    kw = dict(seq_len=6, batch_size=2, num_batches=3)
    first = data.validation_batches(str(corpus_dir), **kw)
    second = data.validation_batches(str(corpus_dir), **kw)
    assert len(first) == 3
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.tokens, b.tokens)
    val = data.load_corpus(str(corpus_dir), "validation")
    assert len(val) >= 1
    text = val.load(0).encode()
    assert bytes(first[0].tokens[0].astype(np.uint8)) == text[:6]
