"""A non-editable install must work: the wheel carries the app page, the recipes and the verifier."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_the_app_the_recipes_and_the_bundle_verifier(tmp_path):
    source = tmp_path / "src"  # build from a copy: building in place would write build/ into the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "robustedge", source / "robustedge", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("robustedge-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"robustedge/app/streamlit_app.py", "robustedge/app/page.py", "robustedge/app/logic.py",
            "robustedge/verifier/cli.py", "robustedge/verifier/assemble.py", "robustedge/cli/__init__.py",
            "robustedge/cli/__main__.py"} <= names
    recipes = {n for n in names if n.startswith("robustedge/configs/") and n.endswith(".yaml")}
    assert recipes == {f"robustedge/configs/{p.name}" for p in (ROOT / "robustedge" / "configs").glob("*.yaml")}
    assert len(recipes) >= 12
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "robustedge = robustedge.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_app_page_and_recipes_resolve_inside_the_package():
    import robustedge
    from robustedge.app import PAGE_SCRIPT
    from robustedge.config import RECIPES, load_config

    package = Path(robustedge.__file__).parent
    assert PAGE_SCRIPT.is_file() and package in PAGE_SCRIPT.parents
    assert RECIPES.is_dir() and package in RECIPES.parents
    assert load_config("cifar10_resnet18_bmtard").method == "bmtard"  # a recipe by name, from any folder
