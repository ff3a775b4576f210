"""berth's demo job: format a small table with a real third-party package."""

import platform
import sys

from tabulate import tabulate

rows = [
    ("python", platform.python_version()),
    ("argv", " ".join(sys.argv[1:]) or "-"),
    ("tabulate", __import__("tabulate").__version__),
]
print(tabulate(rows, headers=["what", "value"], tablefmt="github"))
