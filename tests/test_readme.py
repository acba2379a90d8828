"""The README's two set-up commands are what CI runs."""

from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_readme_starts_with_the_two_setup_commands_and_ci_runs_the_second():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[0] == "```bash"
    install, test = lines[1], lines[2]
    assert install.startswith("bash scripts/setup.sh &&")
    assert "tapml migrate smollm2-135m --target webgpu" in install
    assert test.startswith("bash scripts/setup.sh --test &&") and "pytest" in test
    assert test in (ROOT / ".ci" / "run").read_text()
