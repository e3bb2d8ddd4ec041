"""HumanEval: 164 Python functions to complete, checked by running their unit tests.
https://huggingface.co/datasets/openai/openai_humaneval

Columns: task_id, prompt (imports, signature, docstring), canonical_solution (the body), test (defines
`check(candidate)`), entry_point (the function's name). A completion is run in nanochat.execution's sandbox.
"""

import re

from nanochat.execution import execute_code
from tasks.hub import ParquetTask, data_for

FENCE_RE = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)


def extract_imports(prompt: str) -> str:
    """The import lines at the top of a prompt: a model that rewrites the whole function often drops them."""
    imports = []
    for line in prompt.splitlines():
        stripped = line.strip()
        if stripped.startswith(("import ", "from ")):
            imports.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(imports)


def extract_program(completion: str) -> str:
    """The first ```python (or bare ```) fenced block of a completion, else the whole completion."""
    match = FENCE_RE.search(completion)
    return (match.group(1) if match else completion).strip()


class HumanEval(ParquetTask):
    name = "HumanEval"
    eval_type = "generative"
    baseline = 0.0
    columns = ("prompt", "canonical_solution", "test", "entry_point")

    def __init__(self, source: str = "hub", **slicing):
        super().__init__(data_for("humaneval", "openai_humaneval", "test", "HumanEval"), source, **slicing)

    def get_example(self, index: int) -> dict:
        row = self.row(index)
        return {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": f"{row['prompt']}\n{row['canonical_solution']}"},
            ],
            "entry_point": row["entry_point"],
            "test": row["test"],
        }

    def evaluate(self, conversation: dict, completion: str) -> bool:
        program = "\n\n".join([
            extract_imports(conversation["messages"][0]["content"]),
            extract_program(completion),
            f"{conversation['test']}\ncheck({conversation['entry_point']})",
        ])
        return execute_code(program).success
