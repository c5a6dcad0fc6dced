"""docs/architecture.md stays true: its generated tables match the code, and every module
and hook the hand-written part names exists."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT

from runtime import hookspecs


def test_generated_tables_match_the_code():
    out = subprocess.run([sys.executable, "-m", "tools.architecture", "--check"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_every_name_the_page_uses_exists():
    text = (ROOT / "docs" / "architecture.md").read_text()
    for hook in set(re.findall(r"`(shardserve_\w+)`", text)):
        assert hasattr(hookspecs, hook), hook
    for path in set(re.findall(r"\b((?:handlers|runtime|plugins|tools)/[\w/]+\.py)", text)):
        assert (ROOT / path).is_file(), path
    for module in ("lambda_handler", "flask_app", "wsgi", "cli", "routes"):
        assert module in text and (ROOT / "handlers" / f"{module}.py").is_file()


def test_the_flowchart_shows_what_the_infer_view_calls():
    """The request-path flowchart names every Runtime method the infer view calls and the
    codec function that decodes its body, and each Runtime.<name> on the page exists."""
    import inspect

    from handlers import codec, routes
    from runtime import Runtime

    text = (ROOT / "docs" / "architecture.md").read_text()
    chart = text.split("```mermaid", 1)[1].split("```", 1)[0]
    view = inspect.getsource(routes.infer)
    called = set(re.findall(r"\brt\.(\w+)\(", view))
    assert called >= {"acquire", "run"}
    for method in called:
        assert f"Runtime.{method}" in chart, method
    assert "decode_request" in view and "decode_request" in chart
    assert callable(codec.decode_request)
    for method in set(re.findall(r"\bRuntime\.(\w+)", text)):
        assert hasattr(Runtime, method), method
