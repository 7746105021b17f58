"""Data: tokenizer, embedded and user domains, splits, shards, batches."""

import json
import zlib

import pytest
import torch

from trainer.data import (
    EMBEDDED_DOMAINS,
    VOCAB_SIZE,
    Domain,
    DomainError,
    batches,
    decode,
    domain_from_dir,
    domain_from_file,
    domain_from_jsonl,
    embedded_domain,
    encode,
    load_domain,
    shard_ids,
    split_chunk_ids,
    split_domain,
)


@pytest.fixture(scope="module")
def domains() -> dict[str, Domain]:
    return {name: embedded_domain(name) for name in EMBEDDED_DOMAINS}


def test_tokenizer_round_trip():
    text = "def f(x):\n    return x ** 2  # ünïcödé, 日本語, emoji 🎉"
    tokens = encode(text)
    assert all(0 <= t < VOCAB_SIZE for t in tokens)
    assert len(tokens) == len(text.encode("utf-8"))
    assert decode(tokens) == text
    assert decode(torch.tensor(tokens)) == text


def test_embedded_domains_exist_and_are_deterministic(domains):
    assert set(EMBEDDED_DOMAINS) >= {"python", "prose", "arithmetic"}
    for name, domain in domains.items():
        assert domain.name == name
        assert 100_000 < len(domain.data) <= 1 << 20, name
        domain.data.decode("utf-8")
        assert embedded_domain(name).data == domain.data  # same bytes twice
    assert b"def " in domains["python"].data and b"import " in domains["python"].data
    assert b" the " in domains["prose"].data
    assert embedded_domain("python", max_bytes=1000).data == domains["python"].data[:1000]
    with pytest.raises(ValueError, match="unknown embedded domain"):
        embedded_domain("klingon")


def byte_histogram(data: bytes) -> torch.Tensor:
    counts = torch.bincount(torch.frombuffer(bytearray(data), dtype=torch.uint8).long(), minlength=256)
    return counts.double() / counts.sum()


def test_embedded_domains_differ_in_character(domains):
    ratios = {n: len(zlib.compress(d.data, 9)) / len(d.data) for n, d in domains.items()}
    hists = {n: byte_histogram(d.data) for n, d in domains.items()}
    names = list(domains)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            tv = 0.5 * (hists[a] - hists[b]).abs().sum().item()
            assert tv > 0.15, (a, b, tv)  # total variation distance of byte histograms
            assert abs(ratios[a] - ratios[b]) > 0.03, (a, b, ratios)
    assert set(domains["arithmetic"].data) <= set(b"0123456789 +-*=\n")


def test_split_is_disjoint_covering_and_deterministic(domains):
    d = domains["prose"]
    s1 = split_domain(d, val_fraction=0.1, chunk_size=2048, seed=3)
    s2 = split_domain(d, val_fraction=0.1, chunk_size=2048, seed=3)
    assert s1.train_chunks == s2.train_chunks and torch.equal(s1.val, s2.val)
    num_chunks = -(-len(d.data) // 2048)
    assert not set(s1.train_chunks) & set(s1.val_chunks)
    assert sorted(s1.train_chunks + s1.val_chunks) == list(range(num_chunks))
    assert len(s1.train) + len(s1.val) == len(d.data)
    assert 0.05 < len(s1.val_chunks) / num_chunks < 0.15
    # Validation bytes are really the chosen chunks of the source.
    first = s1.val_chunks[0]
    assert bytes(s1.val[:2048].tolist()) == d.data[first * 2048 : (first + 1) * 2048]
    other = split_domain(d, val_fraction=0.1, chunk_size=2048, seed=4)
    assert other.val_chunks != s1.val_chunks  # the seed matters


def test_split_of_small_domains():
    train, val = split_chunk_ids(2, 0.01)
    assert len(train) == 1 and len(val) == 1
    with pytest.raises(DomainError, match="chunk_size"):
        split_domain(Domain("t", b"x" * 100, "test"), chunk_size=4096)
    with pytest.raises(ValueError):
        split_chunk_ids(10, 1.5)


def test_shards_are_disjoint_and_covering(domains):
    full = split_domain(domains["python"], chunk_size=4096)
    shards = [split_domain(domains["python"], chunk_size=4096, shard=i, num_shards=3) for i in range(3)]
    ids = [set(s.train_chunks) for s in shards]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert ids[0] | ids[1] | ids[2] == set(full.train_chunks)
    assert sum(len(s.train) for s in shards) == len(full.train)
    assert all(s.val_chunks == full.val_chunks for s in shards)  # every node validates alike
    assert shard_ids(list(range(10)), 1, 3) == [1, 4, 7]
    with pytest.raises(ValueError):
        shard_ids([1, 2], 3, 3)


def test_batches_are_deterministic_next_token_pairs():
    data = torch.arange(1000) % 256
    data = data.to(torch.uint8)
    a = batches(data, 4, 16, seed=0)
    b = batches(data, 4, 16, seed=0)
    for _ in range(3):
        (xa, ya), (xb, yb) = next(a), next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.dtype == torch.int64 and xa.shape == (4, 16)
        assert torch.equal(xa[:, 1:], ya[:, :-1])
        assert torch.equal(ya, (xa + 1) % 256)
    assert not torch.equal(next(batches(data, 4, 16, seed=1))[0], next(batches(data, 4, 16, seed=0))[0])
    with pytest.raises(ValueError):
        next(batches(data[:10], 4, 16, seed=0))


def test_user_domain_from_file_dir_and_jsonl(tmp_path):
    (tmp_path / "one.txt").write_text("first file\n")
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "b.txt").write_text("bee")
    (corpus / "a.txt").write_text("ay\n")
    (corpus / "sub" / "c.txt").write_text("sea\n")
    (corpus / "skip.md").write_text("not matched\n")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps({"text": "doc one"}) + "\n\n" + json.dumps({"body": "x", "text": "doc two"}) + "\n")

    assert domain_from_file(tmp_path / "one.txt").data == b"first file\n"
    d = domain_from_dir(corpus)
    assert d.name == "corpus" and d.data == b"ay\nbee\nsea\n"
    assert domain_from_dir(corpus, pattern="*.md").data == b"not matched\n"
    assert domain_from_jsonl(jsonl).data == b"doc one\n\ndoc two\n\n"
    assert domain_from_jsonl(jsonl, max_bytes=5).data == b"doc o"
    assert load_domain(corpus).data == d.data
    assert load_domain(jsonl).name == "docs"
    assert load_domain("prose").name == "prose"


def test_jsonl_lines_split_on_newline_only(tmp_path):
    # U+2028/U+2029 (and \x1c..\x1e, \x85) are legal raw inside JSON strings; splitlines() broke on them
    text = "line\u2028separator, paragraph\u2029separator, \x1c\x85 too"
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps({"text": text}, ensure_ascii=False) + "\r\n" + json.dumps({"text": "next"}) + "\n", encoding="utf-8")
    assert domain_from_jsonl(jsonl).data == (text + "\n\nnext\n\n").encode("utf-8")


def test_bad_user_domains_give_clear_errors(tmp_path):
    missing = tmp_path / "nope.txt"
    for loader in (domain_from_file, domain_from_dir, domain_from_jsonl, load_domain):
        with pytest.raises(FileNotFoundError) as err:
            loader(missing)
        assert str(missing) in str(err.value)
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{broken\n')
    (tmp_path / "nofield.jsonl").write_text('{"body": "no text"}\n')
    (tmp_path / "emptydir").mkdir()
    cases = [
        (domain_from_file, tmp_path / "empty.txt", "empty"),
        (domain_from_file, tmp_path / "binary.txt", "not UTF-8"),
        (domain_from_file, tmp_path / "emptydir", "not a file"),
        (domain_from_jsonl, tmp_path / "bad.jsonl", "bad.jsonl:2: invalid JSON"),
        (domain_from_jsonl, tmp_path / "nofield.jsonl", "string field 'text'"),
        (domain_from_dir, tmp_path / "emptydir", "no files match"),
        (domain_from_dir, tmp_path / "empty.txt", "not a directory"),
    ]
    for loader, path, message in cases:
        with pytest.raises(DomainError, match=message) as err:
            loader(path)
        assert str(path) in str(err.value)
        assert isinstance(err.value, ValueError)
