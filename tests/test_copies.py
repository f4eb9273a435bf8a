"""Model files stand alone, so a piece two of them need is copied, marked on the line above its def or class:

    # Copied from san.HungarianMatcher
    class HungarianMatcher(nn.Module):

This test fails when a marked copy differs from its source, character for character (the copy may not rename either),
when the source is gone, or when a model file imports another file of this project. Nothing rewrites code: the reader
fixes the copy, or the source, by hand."""
import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^\s*# Copied from (\w+)\.([\w.]+)\s*$")


def model_files():
    return sorted(p for p in REPO.glob("*.py") if re.search(r"^TASK = ", p.read_text(), re.M))


def definitions(source):
    """{name: (first line, source text)} of the top-level functions and classes, and Class.method for methods; a
    definition starts at its first decorator."""
    tree, found, lines = ast.parse(source), {}, source.splitlines()

    def span(node):
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        return first, "\n".join(lines[first - 1:node.end_lineno])

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            found[node.name] = span(node)
            if isinstance(node, ast.ClassDef):
                for sub in node.body:
                    if isinstance(sub, ast.FunctionDef):
                        found[f"{node.name}.{sub.name}"] = span(sub)
    return found


def marked_copies(source):
    """[(marker line, module, name, copied text)] for every marker in `source`."""
    lines, defs = source.splitlines(), definitions(source)
    by_line = {line: (name, text) for name, (line, text) in defs.items()}
    copies = []
    for i, line in enumerate(lines, start=1):
        match = MARKER.match(line)
        if match:
            name, text = by_line.get(i + 1, (None, None))
            if text is None:
                raise AssertionError(f"line {i}: '# Copied from' must stand on the line above a def or class")
            copies.append((i, match.group(1), match.group(2), text))
    return copies


def drift(source, sources):
    """Problems of the marked copies in `source`, given {module: its source}: [] when every copy is exact."""
    problems = []
    for line, module, name, text in marked_copies(source):
        if module not in sources:
            problems.append(f"line {line}: copied from {module}.{name}, but there is no {module}.py")
            continue
        original = definitions(sources[module]).get(name)
        if original is None:
            problems.append(f"line {line}: {module}.py has no {name} any more")
        elif original[1] != text:
            problems.append(f"line {line}: the copy of {module}.{name} differs from its source")
    return problems


def test_the_checker_catches_a_drifted_copy():
    source = "def matcher(a):\n    return a + 1\n"
    exact = "# Copied from src.matcher\ndef matcher(a):\n    return a + 1\n"
    drifted = "# Copied from src.matcher\ndef matcher(a):\n    return a + 2\n"
    renamed = "# Copied from src.matcher\ndef hungarian(a):\n    return a + 1\n"
    assert drift(exact, {"src": source}) == []
    assert "differs" in drift(drifted, {"src": source})[0]
    assert "differs" in drift(renamed, {"src": source})[0]
    assert "no gone.py" in drift(exact.replace("src.", "gone."), {"src": source})[0]
    decorated = "@cache\ndef matcher(a):\n    return a + 1\n"
    assert drift("# Copied from src.matcher\n" + decorated, {"src": decorated}) == []
    assert "differs" in drift("# Copied from src.matcher\n" + decorated, {"src": source})[0]
    with pytest.raises(AssertionError, match="line above a def"):
        marked_copies("# Copied from src.matcher\n\nx = 1\n")


@pytest.mark.parametrize("path", model_files(), ids=lambda p: p.name)
def test_marked_copies_equal_their_sources(path):
    sources = {p.stem: p.read_text() for p in REPO.glob("*.py")}
    assert drift(path.read_text(), sources) == []


@pytest.mark.parametrize("path", model_files(), ids=lambda p: p.name)
def test_a_model_file_imports_no_project_file(path):
    project = {p.stem for p in REPO.glob("*.py")}
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & project, f"{path.name} imports {sorted(imported & project)}"
