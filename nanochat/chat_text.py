"""The text a reader sees of a reply, token by token, for the terminal chat, the chat page and both APIs.

A calculator call the chat model makes, `<|python_start|>2*2<|python_end|>`, and the answer the engine feeds
back, `<|output_start|>4<|output_end|>`, read as GSM8K writes the same call in its solutions (and as the
model learned it from them, see tasks/gsm8k.py): `<<2*2=4>>`. A call the calculator could not evaluate has no
answer and reads `<<expr>>`. The tool's special tokens never reach the reader as markup.
"""

from __future__ import annotations


class StreamDecoder:
    """Decode a growing token list and return only the new text (a token may end mid UTF-8 character)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete character: wait for the next token
            return ""
        new, self.shown = text[len(self.shown):], text
        return new

    def rest(self) -> str:
        """What push held back (the bytes of a character that never completed, shown as such)."""
        return self.tokenizer.decode(self.ids)[len(self.shown):]


def _special(tokenizer, name: str) -> int | None:
    try:
        return tokenizer.encode_special(name)
    except Exception:  # a tokenizer without the tool's tokens (tiktoken's gpt2): nothing to render
        return None


class ReplyText:
    """push(token) -> the new text of the reply, tool calls rendered as `<<expr=result>>`; finish() -> the end."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.call_start, self.call_end, self.output_start, self.output_end = (
            _special(tokenizer, f"<|{name}|>") for name in ("python_start", "python_end", "output_start",
                                                              "output_end"))
        self.decoder = StreamDecoder(tokenizer)
        self.call_unanswered = False  # after <|python_end|>: "=" when the answer follows, else ">>"
        self.open = False  # inside <<...>>: a reply cut off there (max_tokens, a stop) is closed by finish()

    def _cut(self) -> str:
        """End the text run before a tool token: its held-back bytes, and a fresh decoder for the next run."""
        rest, self.decoder = self.decoder.rest(), StreamDecoder(self.tokenizer)
        return rest

    def push(self, token: int) -> str:
        closing = ""
        if self.call_unanswered:
            self.call_unanswered = False
            if token == self.output_start:
                return "="
            closing, self.open = ">>", False
        if token in (self.call_start, self.output_start):  # an answer without a call: the model wrote the token
            self.open = True
            return closing + self._cut() + ("<<" if token == self.call_start else "=")
        if token == self.call_end:
            self.call_unanswered = True
            return closing + self._cut()
        if token == self.output_end:
            self.open = False
            return closing + self._cut() + ">>"
        return closing + self.decoder.push(token)

    def finish(self) -> str:
        """The end of the reply: held-back bytes are shown, and a call left open (unanswered, or cut off) closed."""
        rest, closing = self._cut(), ">>" if self.open else ""
        self.call_unanswered = self.open = False
        return rest + closing
