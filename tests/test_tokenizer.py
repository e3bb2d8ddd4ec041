import pickle
import pytest

import tiktoken
import torch

from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer

TEXT = "Hello, world! naïve café 東京 12345 don't\n\n  indented code()  "

TOOL_CHAT = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 12*7?"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute."},
        {"type": "python", "text": "12*7"},
        {"type": "python_output", "text": "84"},
        {"type": "text", "text": "It is 84."},
    ]},
]}


def test_vocab_layout(small_tokenizer):
    tok = small_tokenizer
    assert tok.get_vocab_size() == 400
    ids = [tok.encode_special(name) for name in SPECIAL_TOKENS]
    assert ids == list(range(400 - len(SPECIAL_TOKENS), 400))  # specials sit after the merges
    assert tok.get_bos_token_id() == ids[0]


def test_roundtrip_and_batch(small_tokenizer):
    tok = small_tokenizer
    assert tok.decode(tok.encode(TEXT)) == TEXT
    batch = tok.encode([TEXT, "second", ""], prepend="<|bos|>", append=tok.encode_special("<|assistant_end|>"))
    assert batch[0] == [tok.get_bos_token_id()] + tok.encode(TEXT) + [tok.encode_special("<|assistant_end|>")]
    assert batch[2] == [tok.get_bos_token_id(), tok.encode_special("<|assistant_end|>")]
    # special-token text in user data is plain text, never a control token
    assert tok.get_bos_token_id() not in tok.encode("<|bos|>")


def test_split_pattern_groups_digits_in_pairs(small_tokenizer):
    pieces = [small_tokenizer.decode([t]) for t in small_tokenizer.encode("12345")]
    assert all(len(p) <= 2 for p in pieces) and "".join(pieces) == "12345"


def test_token_bytes_count_utf8_bytes(small_tokenizer):
    tok = small_tokenizer
    tb = tok.token_bytes()
    assert tb.dtype == torch.int32 and tb.shape == (400,)
    assert all(tb[tok.encode_special(name)] == 0 for name in SPECIAL_TOKENS)
    ids = tok.encode(TEXT)
    assert int(tb[ids].sum()) == len(TEXT.encode("utf-8"))


def test_save_load_roundtrip(small_tokenizer, tmp_path):
    small_tokenizer.save(tmp_path / "tok")
    loaded = Tokenizer.load(tmp_path / "tok")
    assert loaded.encode(TEXT) == small_tokenizer.encode(TEXT)
    assert torch.equal(torch.load(tmp_path / "tok" / "token_bytes.pt"), small_tokenizer.token_bytes())


def test_loads_upstream_layout_folder(tmp_path):
    """Upstream saves a pickled tiktoken.Encoding named tokenizer.pkl with <|bos|> among its specials."""
    ranks = {bytes([i]): i for i in range(256)}
    enc = tiktoken.Encoding(name="upstream", pat_str=r"\S+|\s+", mergeable_ranks=ranks,
                            special_tokens={name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)})
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps(enc))
    tok = Tokenizer.load(tmp_path)
    assert tok.get_bos_token_id() == 256 and tok.encode("ab") == [97, 98]


def test_render_conversation_masks_only_assistant_output(small_tokenizer):
    tok = small_tokenizer
    ids, mask = tok.render_conversation(TOOL_CHAT)
    assert len(ids) == len(mask) and ids[0] == tok.get_bos_token_id()
    supervised = tok.decode([i for i, m in zip(ids, mask) if m])
    assert supervised == "Let me compute.<|python_start|>12*7<|python_end|>It is 84.<|assistant_end|>"
    unsupervised = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert "Be brief.\n\nWhat is 12*7?" in unsupervised  # the system message is merged into the user turn
    assert "<|output_start|>84<|output_end|>" in unsupervised  # tool output comes from Python, not the model
    short_ids, short_mask = tok.render_conversation(TOOL_CHAT, max_tokens=5)
    assert short_ids == ids[:5] and short_mask == mask[:5]


def test_render_for_completion(small_tokenizer):
    tok = small_tokenizer
    ids = tok.render_for_completion(TOOL_CHAT)
    assert ids[-1] == tok.encode_special("<|assistant_start|>")
    assert "It is 84." not in tok.decode(ids) and "What is 12*7?" in tok.decode(ids)


def test_bad_conversations_raise_clearly(small_tokenizer):
    import pytest
    with pytest.raises(ValueError, match="expected 'user'"):
        small_tokenizer.render_conversation({"messages": [{"role": "assistant", "content": "hi"}]})
    with pytest.raises(ValueError, match="unknown part type"):
        small_tokenizer.render_conversation({"messages": [
            {"role": "user", "content": "x"}, {"role": "assistant", "content": [{"type": "img", "text": ""}]}]})


class _Payload:
    def __init__(self, proof):
        self.proof = proof

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.proof}",)


def test_a_planted_tokenizer_pickle_never_runs(small_tokenizer, tmp_path):
    from nanochat.common import UserError

    proof = tmp_path / "pwned"
    upstream_only = tmp_path / "upstream"
    upstream_only.mkdir()
    (upstream_only / "tokenizer.pkl").write_bytes(pickle.dumps(_Payload(proof)))
    with pytest.raises(UserError, match=r"refusing tokenizer .*tokenizer.pkl: it asks for posix.system") as err:
        Tokenizer.load(upstream_only)
    assert "\n" not in str(err.value) and not proof.exists()
    ours = tmp_path / "ours"  # written by save: tokenizer.json is what is read, a planted pickle beside it is not
    small_tokenizer.save(ours)
    (ours / "tokenizer.pkl").write_bytes(pickle.dumps(_Payload(proof)))
    assert Tokenizer.load(ours).encode("tokenizer parquet") == small_tokenizer.encode("tokenizer parquet")
    assert not proof.exists()


def test_a_damaged_tokenizer_json_is_one_line(small_tokenizer, tmp_path):
    from nanochat.common import UserError

    small_tokenizer.save(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"name": "x"')
    with pytest.raises(UserError, match="is damaged") as err:
        Tokenizer.load(tmp_path)
    assert "\n" not in str(err.value)


def test_tok_train_shows_the_text_it_reads_in_a_log(tmp_path, capsys):
    """The stage on the embedded corpus: a line of the characters read of max_chars, then one for the merges,
    which rustbpe computes without a word."""
    from nanochat.config import Config, TokTrainConfig
    from nanochat.runs import Run
    from nanochat.stages import tok_train

    cfg = Config(dataset="embedded", tok_train=TokTrainConfig(vocab_size=300, max_chars=300_000))
    summary = tok_train.execute(cfg, Run(tmp_path / "run"))
    read, merging = capsys.readouterr().out.splitlines()[:2]
    assert read.startswith("tok_train text 0.3/0.3 M chars (100.0%) | ") and read.endswith(" M chars/s")
    assert summary["train_chars"] >= 300_000  # the last document crosses max_chars: the percentage stops at 100
    assert merging == "tok_train: text read; merging up to a vocab of 300 (rustbpe shows no progress)"
