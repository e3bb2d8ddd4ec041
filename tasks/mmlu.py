"""MMLU: 4-choice questions over 57 subjects. https://huggingface.co/datasets/cais/mmlu

subset="all", split="test": the benchmark (14,042 rows). subset="auxiliary_train", split="train": ~100k
training questions from other multiple-choice sets, whose hub parquet nests every row under one struct column
"train" (upstream unwraps it with a .map); their "subject" is empty.
"""

from tasks.common import LETTERS, render_mc
from tasks.hub import ParquetTask, data_for


class MMLU(ParquetTask):
    name = "MMLU"
    eval_type = "categorical"
    baseline = 0.25
    letters = list(LETTERS[:4])

    def __init__(self, subset: str = "all", split: str = "test", source: str = "hub", **slicing):
        self.subset = subset
        self.columns = ("train",) if subset == "auxiliary_train" else ("question", "subject", "choices", "answer")
        super().__init__(data_for("mmlu", subset, split, "MMLU"), source, **slicing)

    def get_example(self, index: int) -> dict:
        row = self.row(index)
        if self.subset == "auxiliary_train":
            row = row["train"]
        if len(row["choices"]) != 4:
            raise ValueError(f"MMLU row {index}: {len(row['choices'])} choices, expected 4")
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], self.letters, row["choices"])},
                {"role": "assistant", "content": self.letters[row["answer"]]},
            ],
            "subject": row["subject"],  # for per-subject breakdowns
            "letters": list(self.letters),
        }

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return completion.strip() == conversation["messages"][-1]["content"]
