"""Only `darknet_cfg` is installed; layers/ and converters/ live under it."""
import importlib
import pkgutil
import subprocess
import sys

import darknet_cfg


def test_mapped_packages_import_and_nothing_else_is_installed(tmp_path):
    code = ("import importlib.util as u, darknet_cfg.layers.conv, darknet_cfg.converters.weights, "
            "darknet_cfg.cfg; print(u.find_spec('layers'), u.find_spec('converters'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "None"]


def test_every_module_imports():
    for m in pkgutil.walk_packages(darknet_cfg.__path__, "darknet_cfg."):
        importlib.import_module(m.name)


def test_ci_runs_the_readme_test_command():
    """.ci/run must run exactly what the README tells a new user, in a fresh virtualenv."""
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "README.md").read_text().splitlines()
    test_cmd = next(line for line in readme[:10] if "pytest" in line).strip()
    ci = (repo / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines()
    assert "python3 -m venv" in ci and "activate" in ci
