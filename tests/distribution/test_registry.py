"""pyproject.toml against the Comfy Registry's publishing rules (docs.comfy.org/registry/specifications and
the checks `comfy node validate` runs): node id, semver version, license, repository, [tool.comfy] fields,
icon, requirement ranges, classifiers, and the security scan for exec/eval and one-line multi-statements."""
import ast
import io
import re
import tokenize
from pathlib import Path
from urllib.parse import urlparse

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT, COMFY = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
REPOSITORY = PROJECT["urls"]["Repository"]
VERSION_PART = re.compile(r"^(?:(==|>=|<=|!=|~=|>|<|<>|=)\s*)?(\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?)?$")
VALID_OS_PREFIXES = ("Microsoft", "POSIX", "MacOS", "OS Independent")
VALID_ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                      "GPU :: Apple Metal"}
SHIPPED_PYTHON = ["__init__.py", "nodes", "distill_core"]


def node_id_problems(name: str) -> list[str]:
    """The registry's node-id rules; an empty list means the id is valid."""
    problems = []
    if not 0 < len(name) < 100:
        problems.append("must be 1-99 characters")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        problems.append("only letters, digits, '-', '_' and '.'")
    if re.search(r"[._-]{2}", name):
        problems.append("no consecutive special characters")
    if not name[:1].isalpha():
        problems.append("must start with a letter")
    if "comfy" in name.lower():
        problems.append("must not include 'ComfyUI'")
    return problems


@pytest.mark.parametrize("bad", ["ComfyUI-enhancer", "123-tool", "-tool", "a--b", "x" * 100, "a b", ""])
def test_the_node_id_rules_refuse_the_documented_bad_examples(bad):
    assert node_id_problems(bad)


def test_node_id_version_and_description():
    assert node_id_problems(PROJECT["name"]) == []
    assert re.fullmatch(r"\d+\.\d+\.\d+", PROJECT["version"]), "version must be X.Y.Z"
    assert PROJECT["description"].strip()
    assert "dynamic" not in PROJECT, "the registry reads a literal version"


def test_license_is_a_table_pointing_to_a_file_or_naming_a_license():
    license_entry = PROJECT["license"]
    assert isinstance(license_entry, dict) and license_entry.keys() & {"file", "text"}
    if "file" in license_entry:
        assert (ROOT / license_entry["file"]).is_file()
        assert (ROOT / license_entry["file"]).read_text(encoding="utf-8").strip()


def test_repository_url_and_publisher_fields():
    url = urlparse(REPOSITORY)
    assert url.scheme == "https" and url.netloc and not url.username and not url.password
    assert re.fullmatch(r"[a-z][a-z0-9-]*", COMFY["PublisherId"]), "publisher id: lowercase letters, digits, '-'"
    assert COMFY["DisplayName"].strip()
    for folder in COMFY.get("includes", []):
        assert (ROOT / folder).is_dir(), f"includes names a missing folder {folder}"


def test_icon_is_a_square_image_of_this_repository_at_most_400_pixels():
    from PIL import Image

    icon = urlparse(COMFY["Icon"])
    assert icon.scheme == "https" and icon.path.endswith((".png", ".jpg", ".jpeg", ".gif", ".svg"))
    repository_path = urlparse(REPOSITORY).path.strip("/")
    assert repository_path in icon.path, "the icon URL points into this repository"
    local = ROOT / icon.path.split("/main/", 1)[1]
    with Image.open(local) as image:
        width, height = image.size
    assert width == height <= 400


def test_version_ranges_and_classifiers_parse_as_the_registry_expects():
    for part in COMFY["requires-comfyui"].split(","):
        assert VERSION_PART.match(part.strip()), part
    classifiers = PROJECT.get("classifiers", [])
    for classifier in classifiers:
        if classifier.startswith("Operating System :: "):
            assert classifier.removeprefix("Operating System :: ").startswith(VALID_OS_PREFIXES), classifier
        if classifier.startswith("Environment :: "):
            assert classifier.removeprefix("Environment :: ") in VALID_ACCELERATORS, classifier


def test_requirements_txt_and_project_dependencies_agree():
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()]
    requirements = [line for line in lines if line and not line.startswith("#")]
    assert sorted(requirements) == sorted(PROJECT["dependencies"])


def shipped_python_files() -> list[Path]:
    files = []
    for entry in SHIPPED_PYTHON:
        path = ROOT / entry
        files.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return files


def test_security_scan_no_exec_eval_or_multiple_statements_on_one_line():
    """What the registry's ruff scan flags (S102 exec, S307 eval, E702 ';' between statements)."""
    findings = []
    for path in shipped_python_files():
        source = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("exec", "eval"):
                findings.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.func.id}()")
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.OP and token.string == ";":
                findings.append(f"{path.relative_to(ROOT)}:{token.start[0]} ';'")
    assert findings == []
