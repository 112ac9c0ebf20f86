"""lm-evaluation-harness as an optional backend for multiple-choice tasks (``weightsmith eval --backend lm-eval``).

Not a dependency: ``pip install lm-eval`` (0.4.x) brings datasets, pyarrow, scikit-learn, sacrebleu
and more. When installed, a multiple-choice task file is handed to lm-eval as a task YAML written
to a temp folder (``dataset_path: json`` on the local file, so nothing is downloaded: it runs with
``HF_HUB_OFFLINE=1``), and lm-eval's ``hf`` model loads the checkpoint folder in float32. Its
``acc`` and ``acc_norm`` come back into the same :class:`evaluation.run.TaskScore` as the
built-in scorer's, and are cached under their own key.

Only multiple choice and only model folders: the built-in scorer covers the other kinds and the
adapters, and gives the same numbers on multiple choice (checked on the bundled task, see the README).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from checkpoints.errors import WeightsmithError

TASK_NAME = "weightsmith_choice"


def available() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def task_yaml(data_file: Path) -> str:
    """lm-eval's task config for a Weightsmith multiple-choice JSONL file (JSON strings are valid YAML)."""
    return "\n".join([
        f"task: {TASK_NAME}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data_file))}",
        "test_split: test",
        "output_type: multiple_choice",
        'doc_to_text: "{{query}}"',
        'doc_to_choice: "{{choices}}"',
        'doc_to_target: "{{gold}}"',
        "metric_list:",
        "  - {metric: acc, aggregation: mean, higher_is_better: true}",
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}",
        "",
    ])


def choice_scores(model_dir: Path, data_file: Path, *, limit: int | None = None, batch_size: int = 8,
                  device: str = "cpu") -> dict[str, float]:
    """lm-eval's ``acc`` and ``acc_norm`` of the model in ``model_dir`` on a multiple-choice JSONL file."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise WeightsmithError("the lm-eval backend needs lm-eval (pip install lm-eval); "
                               "the built-in scorer needs nothing more") from None
    with tempfile.TemporaryDirectory(prefix="weightsmith-lm-eval-") as tmp:
        (Path(tmp) / f"{TASK_NAME}.yaml").write_text(task_yaml(Path(data_file).resolve()), encoding="utf-8")
        out: dict[str, Any] = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": str(model_dir), "dtype": "float32"}, tasks=[TASK_NAME],
            task_manager=TaskManager(include_path=tmp), batch_size=batch_size, device=device, limit=limit,
            log_samples=False)
    row = out["results"][TASK_NAME]
    return {"acc": float(row["acc,none"]), "acc_norm": float(row["acc_norm,none"])}
