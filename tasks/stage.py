"""`python -m tasks.stage`: the command that downloads the chat tasks' datasets (the code: tasks/download.py)."""

import sys

from tasks.download import main

if __name__ == "__main__":
    sys.exit(main())
