"""The layers import downwards only: the trainer core (`shared/`) never imports the daemon, which sits
above it (the daemon, the CLI and the demo drive the core; the core knows nothing of them)."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_shared_never_imports_the_daemon():
    offenders = []
    for path in sorted((REPO / "shared").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            offenders += [f"{path.relative_to(REPO)}:{node.lineno} imports {n}" for n in names
                          if n.split(".")[0] == "daemon"]
    assert offenders == []
