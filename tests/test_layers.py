"""The parts import one another only as docs/architecture.md draws them: import-linter's contracts in
pyproject.toml (layers, independence, the forbidden imports, no cycles), over every import, those inside
functions too."""

import subprocess
import sys

from tests.helpers import REPO


def test_every_import_contract_is_kept():
    lint = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                                  "sys.exit(lint_imports_command())", "--no-cache"]
    done = subprocess.run(lint, cwd=REPO, capture_output=True, text=True, timeout=300)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report[-4000:]
    assert "0 broken" in report and "no import cycles, at any depth KEPT" in report
