"""Conversations from a JSONL file, one per line: {"messages": [...]} or a bare list of messages, where each
message is {"role": "user"|"assistant", "content": str}, alternating and starting with the user. Every line is
checked when the file is loaded, so a typo fails at once with its file:line, not hours into SFT.
"""

import json
from pathlib import Path

from nanochat.common import UserError
from tasks.common import Task


class CustomJSON(Task):
    name = "CustomJSON"

    def __init__(self, path, source: str | None = None, **slicing):
        """`source` is accepted (and ignored) so that every task takes the same arguments."""
        super().__init__(**slicing)
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"CustomJSON: no such file: {self.path}")
        self.conversations = []
        with open(self.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    messages = _parse(line)
                except ValueError as e:
                    raise UserError(f"{self.path}:{lineno}: {e}") from None
                self.conversations.append(messages)

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict:
        return {"messages": self.conversations[index]}


def _parse(line: str) -> list[dict]:
    """One line's messages; ValueError saying what is wrong."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    messages = obj.get("messages") if isinstance(obj, dict) else obj
    if not isinstance(messages, list):
        raise ValueError('expected {"messages": [...]} or a list of messages')
    if len(messages) < 2:
        raise ValueError(f"a conversation needs at least a user and an assistant message, got {len(messages)}")
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f'message {i} must be an object with "role" and "content"')
        if message["role"] != expected:
            raise ValueError(f"message {i} has role {message['role']!r}, expected {expected!r} "
                             "(user and assistant alternate, starting with the user)")
        if not isinstance(message["content"], str):
            raise ValueError(f"message {i} content must be a string")
    return [{"role": m["role"], "content": m["content"]} for m in messages]
