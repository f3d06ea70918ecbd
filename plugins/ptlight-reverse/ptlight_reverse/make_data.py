"""Write the task's data files: ``python -m ptlight_reverse.make_data <dir>``.

``sft.jsonl`` (3,000 demonstrations), ``pairs.jsonl`` (3,000 preference pairs),
``heldout.jsonl`` (200 held-out prompts with reference answers) and ``task.yaml`` (the task
made of those prompts and the ``reverse`` reward), all TRL-format JSONL.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ptlight_reverse import task

TASK_YAML = """# The reversal task made of files: held-out prompts + the `reverse` reward plugin.
name: reverse
heldout: heldout.jsonl
rewards:
  - name: reverse
threshold: 1.0
"""


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(out: Path, n_train: int = 3000, n_heldout: int = 200) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "sft.jsonl", task.make_rows("sft", n_train, 0, "train"))
    _write(out / "pairs.jsonl", task.make_rows("pairwise", n_train, 1, "train"))
    heldout = task.make_rows("prompt", n_heldout, 0, "heldout")
    _write(out / "heldout.jsonl", [
        {**r, "reference": task.reference_answer(r["prompt"][0]["content"])} for r in heldout])
    (out / "task.yaml").write_text(TASK_YAML)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "data"))
