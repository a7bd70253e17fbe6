"""What `pip install .` (a wheel, not the editable install the README uses) puts in place:
setuptools takes exactly the packages pyproject.toml lists, so a subpackage left out of
the list is missing from every regular install (npgpt.exercises once was)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_under_npgpt_is_listed_for_the_wheel():
    text = (ROOT / "pyproject.toml").read_text()
    listed = re.search(r"^packages = \[(.*)\]$", text, re.M)
    assert listed, "pyproject.toml's [tool.setuptools] packages list is gone"
    declared = set(re.findall(r'"([\w.]+)"', listed.group(1)))
    on_disk = {".".join(p.parent.relative_to(ROOT).parts)
               for p in (ROOT / "npgpt").rglob("__init__.py")}
    assert on_disk and on_disk <= declared, f"not in the wheel: {sorted(on_disk - declared)}"
