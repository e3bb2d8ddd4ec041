"""GPT-4-style BPE tokenizer: trained with rustbpe, served with tiktoken.

Saved as tokenizer.json (the split pattern, the mergeable ranks in base64 and the special tokens: data that cannot
run code when read) and, for upstream nanochat to load, in its layout too: tokenizer.pkl (the pickled tiktoken
Encoding) and token_bytes.pt (UTF-8 byte length of every token id, 0 for special tokens). A folder with only
upstream's tokenizer.pkl is read through an unpickler that admits tiktoken's Encoding and nothing else, so a
planted pickle is refused instead of run.
"""

import base64
import copy
import io
import json
import pickle
from functools import lru_cache
from pathlib import Path

import tiktoken

from nanochat.common import UserError

SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document; the packer aligns rows to it
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # a tool call the assistant writes
    "<|output_start|>", "<|output_end|>",  # the tool's answer, written by the engine, never trained on
]

# GPT-4's split pattern with \p{N}{1,2} instead of \p{N}{1,3}, as upstream: fewer vocab slots go to numbers,
# which matters at the small vocab sizes the embedded and d12 runs use.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

DEFAULT_VOCAB_SIZE = 32768
JSON_FILE, PICKLE_FILE = "tokenizer.json", "tokenizer.pkl"


def _encoding_from_json(path: Path) -> tiktoken.Encoding:
    try:
        data = json.loads(path.read_text())
        ranks = {base64.b64decode(token): rank for token, rank in data["mergeable_ranks"].items()}
        return tiktoken.Encoding(name=data["name"], pat_str=data["pat_str"], mergeable_ranks=ranks,
                                 special_tokens=data["special_tokens"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"tokenizer {path} is damaged ({type(exc).__name__}: {exc}); train it again "
                        f"(stages=[tok_train]) or pass tokenizer=PATH") from None


class _EncodingOnly(pickle.Unpickler):
    """What upstream's tokenizer.pkl holds is one tiktoken Encoding built from plain data; anything else a pickle
    asks to import (os.system, builtins.eval, ...) is refused before it can run."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return tiktoken.Encoding
        raise pickle.UnpicklingError(f"it asks for {module}.{name}, which a tokenizer never holds")


def _encoding_from_pickle(path: Path) -> tiktoken.Encoding:
    try:
        enc = _EncodingOnly(io.BytesIO(path.read_bytes())).load()
        if not isinstance(enc, tiktoken.Encoding):
            raise pickle.UnpicklingError(f"it holds a {type(enc).__name__}, not a tiktoken Encoding")
        return enc
    except Exception as exc:  # a pickle can fail in many ways; each is a refusal in one line
        raise UserError(f"refusing tokenizer {path}: {exc}") from None


class Tokenizer:
    def __init__(self, enc: tiktoken.Encoding, bos_token: str = "<|bos|>"):
        self.enc = enc
        self.bos_token_id = enc.encode_single_token(bos_token)

    # -- construction --------------------------------------------------------------------------------------
    @classmethod
    def train(cls, texts, vocab_size: int = DEFAULT_VOCAB_SIZE) -> "Tokenizer":
        """Train on an iterator of strings; `vocab_size` counts the special tokens too."""
        import rustbpe

        n_merged = vocab_size - len(SPECIAL_TOKENS)
        if n_merged < 256:
            raise UserError(f"vocab_size={vocab_size} is too small: it needs 256 byte tokens + {len(SPECIAL_TOKENS)} special")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(texts, n_merged, pattern=SPLIT_PATTERN)
        ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        enc = tiktoken.Encoding(name="rustbpe", pat_str=trainer.get_pattern(), mergeable_ranks=ranks,
                                special_tokens=specials)
        return cls(enc)

    @staticmethod
    def exists(folder) -> bool:
        return any((Path(folder) / name).is_file() for name in (JSON_FILE, PICKLE_FILE))

    @classmethod
    def load(cls, folder) -> "Tokenizer":
        """Load a folder written by `save`, or upstream nanochat's (tokenizer.pkl only)."""
        folder = Path(folder)
        if (folder / JSON_FILE).is_file():
            return cls(_encoding_from_json(folder / JSON_FILE))
        if not (folder / PICKLE_FILE).is_file():
            raise UserError(f"no tokenizer at {folder}; run the tok_train stage first or pass tokenizer=PATH")
        return cls(_encoding_from_pickle(folder / PICKLE_FILE))

    @classmethod
    def from_tiktoken(cls, name: str) -> "Tokenizer":
        """A pretrained tiktoken encoding (gpt2, cl100k_base), whose document delimiter is <|endoftext|>."""
        return cls(tiktoken.get_encoding(name), bos_token="<|endoftext|>")

    def save(self, folder) -> None:
        import torch

        from nanochat.common import atomic_file, atomic_write_bytes

        folder = Path(folder)
        atomic_write_bytes(folder / JSON_FILE, json.dumps({
            "name": self.enc.name, "pat_str": self.enc._pat_str, "special_tokens": self.enc._special_tokens,
            "mergeable_ranks": {base64.b64encode(token).decode("ascii"): rank
                                for token, rank in self.enc._mergeable_ranks.items()}}).encode())
        atomic_write_bytes(folder / PICKLE_FILE, pickle.dumps(self.enc))  # for upstream nanochat
        with atomic_file(folder / "token_bytes.pt") as f:
            torch.save(self.token_bytes(), f)

    # -- basic API -----------------------------------------------------------------------------------------
    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    def get_special_tokens(self) -> set[str]:
        return self.enc.special_tokens_set

    @lru_cache(maxsize=32)
    def encode_special(self, name: str) -> int:
        return self.enc.encode_single_token(name)

    def encode(self, text, prepend=None, append=None, num_threads: int = 8):
        """str -> list[int]; list[str] -> list[list[int]], encoded on `num_threads` threads (tiktoken drops the
        GIL). Special-token text is encoded as ordinary text: only the renderer below emits special ids."""
        pre = [prepend if isinstance(prepend, int) else self.encode_special(prepend)] if prepend is not None else []
        post = [append if isinstance(append, int) else self.encode_special(append)] if append is not None else []
        if isinstance(text, str):
            return pre + self.enc.encode_ordinary(text) + post
        if isinstance(text, list):
            rows = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
            return [pre + row + post for row in rows] if pre or post else rows
        raise TypeError(f"encode takes a str or a list of str, not {type(text).__name__}")

    def decode(self, ids) -> str:
        return self.enc.decode(ids)

    def id_to_token(self, token_id: int) -> str:
        return self.enc.decode([token_id])

    def token_bytes(self):
        """int32 tensor: UTF-8 length of each token, 0 for special tokens, so bits-per-byte ignores them."""
        import torch

        special_ids = {self.enc.encode_single_token(name) for name in self.enc.special_tokens_set}
        lengths = [0 if i in special_ids else len(self.enc.decode_single_token_bytes(i))
                   for i in range(self.get_vocab_size())]
        return torch.tensor(lengths, dtype=torch.int32)

    # -- chat rendering ------------------------------------------------------------------------------------
    def render_conversation(self, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """Tokenize a chat. Returns (ids, mask); mask is 1 exactly on what the assistant writes (its text, its
        tool calls, its <|assistant_end|>) and 0 on the prompt, the user and tool outputs."""
        messages = _merge_system_message(conversation["messages"])
        ids, mask = [], []

        def add(tokens, supervised):
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([int(supervised)] * len(tokens))

        special = self.encode_special
        add(self.bos_token_id, False)
        for i, message in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            if message["role"] != expected:
                raise ValueError(f"message {i} is from {message['role']!r}, expected {expected!r} (turns alternate)")
            content = message["content"]
            if expected == "user":
                if not isinstance(content, str):
                    raise ValueError(f"message {i}: user content must be a string")
                add(special("<|user_start|>"), False)
                add(self.encode(content), False)
                add(special("<|user_end|>"), False)
                continue
            add(special("<|assistant_start|>"), False)
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                text_ids = self.encode(part["text"])
                if part["type"] == "text":
                    add(text_ids, True)
                elif part["type"] == "python":
                    add(special("<|python_start|>"), True)
                    add(text_ids, True)
                    add(special("<|python_end|>"), True)
                elif part["type"] == "python_output":
                    add(special("<|output_start|>"), False)
                    add(text_ids, False)
                    add(special("<|output_end|>"), False)
                else:
                    raise ValueError(f"message {i}: unknown part type {part['type']!r}")
            add(special("<|assistant_end|>"), True)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: dict) -> list[int]:
        """The prompt for sampling the assistant's reply: the chat without its last (assistant) message, then
        <|assistant_start|>. Used by RL and generative evaluation."""
        messages = conversation["messages"]
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("render_for_completion needs a conversation that ends with an assistant message")
        prompt = {**conversation, "messages": messages[:-1]}
        ids, _ = self.render_conversation(prompt, max_tokens=1 << 62)
        return ids + [self.encode_special("<|assistant_start|>")]


def _merge_system_message(messages: list[dict]) -> list[dict]:
    """The format has no system role: a leading system message is prepended to the first user message."""
    if not messages:
        raise ValueError("a conversation needs at least one message")
    if messages[0]["role"] != "system":
        return messages
    if len(messages) < 2 or messages[1]["role"] != "user":
        raise ValueError("a system message must be followed by a user message")
    merged = copy.deepcopy(messages[1])
    merged["content"] = messages[0]["content"] + "\n\n" + merged["content"]
    return [merged] + messages[2:]
