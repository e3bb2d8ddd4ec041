"""SmolTalk (the "smol" cut for small models): general chat for SFT, train ~460k rows, test ~24k rows.
https://huggingface.co/datasets/HuggingFaceTB/smol-smoltalk

Only the "messages" column is read (the train split is ~1 GB of parquet). A conversation may open with a
system message; the tokenizer folds it into the first user message.
"""

from tasks.hub import ParquetTask, data_for


class SmolTalk(ParquetTask):
    name = "SmolTalk"
    columns = ("messages",)

    def __init__(self, split: str = "train", source: str = "hub", **slicing):
        super().__init__(data_for("smoltalk", "default", split, "SmolTalk"), source, **slicing)

    def get_example(self, index: int) -> dict:
        messages = self.row(index)["messages"]
        turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
        if len(turns) < 2:
            raise ValueError(f"SmolTalk row {index}: needs a user and an assistant message, has {len(turns)}")
        for i, message in enumerate(turns):
            expected = "user" if i % 2 == 0 else "assistant"
            if message["role"] != expected or not isinstance(message["content"], str):
                raise ValueError(f"SmolTalk row {index}: message {i} is {message['role']!r}, expected {expected!r} "
                                 "with string content")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
