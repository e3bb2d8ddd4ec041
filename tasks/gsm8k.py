"""GSM8K: grade-school math word problems with worked solutions. https://huggingface.co/datasets/openai/gsm8k

A solution marks each calculation as a calculator call and ends with the answer after "####":

    Natalia sold 48/2 = <<48/2=24>>24 clips in May.
    ...
    #### 72

The assistant message becomes a list of parts: text, then each <<expr=result>> as a "python" part (expr: what
the model learns to call) and a "python_output" part (result: what the tool returns, not trained on).
"""

import re

from tasks.hub import ParquetTask, data_for

CALL_RE = re.compile(r"<<([^>]+)>>")
# The official grader's pattern (openai/grade-school-math dataset.py): the first "#### <number>"
ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")


def extract_answer(text: str) -> str | None:
    """The number after the first "#### ", without thousands separators ("#### 1,250" -> "1250"), or None.
    Nothing else is normalised, as upstream and the official grader: "#### 72." gives "72.", which is wrong
    against a reference of 72, and "####72" (no space) gives None."""
    match = ANSWER_RE.search(text)
    return None if match is None else match.group(1).replace(",", "")


def solution_parts(solution: str) -> list[dict]:
    """A GSM8K solution as assistant parts; joining the text parts with f"<<{python}={output}>>" in place of each
    tool call gives the solution back."""
    parts = []
    pieces = CALL_RE.split(solution)  # text, call, text, call, ..., text
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            if piece:
                parts.append({"type": "text", "text": piece})
            continue
        # "48/2=24" -> expression and result; a call without "=" is all expression, with an empty output
        expr, result = piece.rsplit("=", 1) if "=" in piece else (piece, "")
        parts.append({"type": "python", "text": expr})
        parts.append({"type": "python_output", "text": result})
    return parts


class GSM8K(ParquetTask):
    name = "GSM8K"
    eval_type = "generative"
    baseline = 0.0
    columns = ("question", "answer")

    def __init__(self, subset: str = "main", split: str = "test", source: str = "hub", **slicing):
        super().__init__(data_for("gsm8k", subset, split, "GSM8K"), source, **slicing)

    def get_example(self, index: int) -> dict:
        row = self.row(index)
        return {"messages": [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": solution_parts(row["answer"])},
        ]}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        reference = reference_answer(conversation)
        return reference is not None and extract_answer(completion) == reference


def reference_answer(conversation: dict) -> str | None:
    """The reference number of a conversation whose last message ends with "#### N" (a string or parts)."""
    content = conversation["messages"][-1]["content"]
    text = content if isinstance(content, str) else content[-1]["text"]
    return extract_answer(text)

