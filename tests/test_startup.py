"""What ``lit-p3o`` imports before it runs: every command and every CLI test pays for it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PARSE_FIT = """
import sys
from lit_p3o.cli import main
try:
    main(["fit", "--print_config", "--model", "lit_p3o.P3OModule", "--data", "lit_p3o.SFTDataModule",
          "--data.train", "train.jsonl"])
except SystemExit as exit:
    assert not exit.code, exit.code
print(sorted(name for name in ("datasets", "pandas", "pyarrow") if name in sys.modules), file=sys.stderr)
"""


def test_parsing_a_fit_config_with_a_data_source_does_not_import_datasets(tmp_path):
    """``datasets`` (with pandas and pyarrow: ~0.9 CPU-seconds) is imported only to read a
    ``save_to_disk`` directory or a hub dataset, not to parse the ``DataSource`` type."""
    result = subprocess.run(
        [sys.executable, "-c", PARSE_FIT],
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train: train.jsonl" in result.stdout
    assert result.stderr.splitlines()[-1] == "[]"
