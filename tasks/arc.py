"""ARC (AI2 Reasoning Challenge): grade-school science questions with 3-5 choices.
https://huggingface.co/datasets/allenai/ai2_arc

Columns: id, question, choices {text: [...], label: [...]}, answerKey. Most labels are A-D, a few are 1-4;
like upstream we show the labels as they are, so the answer is always one of the conversation's "letters".
"""

from tasks.common import render_mc
from tasks.hub import ParquetTask, data_for


class ARC(ParquetTask):
    eval_type = "categorical"
    baseline = 0.25  # most questions have 4 choices
    columns = ("question", "choices", "answerKey")

    def __init__(self, subset: str = "ARC-Easy", split: str = "test", source: str = "hub", **slicing):
        self.name = subset  # "ARC-Easy" or "ARC-Challenge"
        super().__init__(data_for("arc", subset, split, f"ARC({subset})"), source, **slicing)

    def get_example(self, index: int) -> dict:
        row = self.row(index)
        letters, answer = row["choices"]["label"], row["answerKey"]
        if answer not in letters:
            raise ValueError(f"{self.name} row {index}: answer {answer!r} is not one of {letters}")
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], letters, row["choices"]["text"])},
                {"role": "assistant", "content": answer},
            ],
            "letters": letters,  # evaluation picks the most likely of these
        }

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return completion.strip() == conversation["messages"][-1]["content"]
