"""The README's reading map: every function its rows name is defined in a file the row names."""
import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def defined_names(path):
    """Names of the module's functions, classes, methods and top-level assignments."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def test_every_name_of_the_reading_map_is_defined_where_its_row_says():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    table = readme.split("## Reading the code")[1].split("\n\n")[1]
    rows = [line.split("|")[1:-1] for line in table.splitlines()[2:]]
    assert len(rows) >= 10
    for _, functions, files in rows:
        defined = set().union(*(defined_names(f) for f in re.findall(r"`([\w/]+\.py)`", files)))
        for name in re.findall(r"`([\w.]+)`", functions):
            assert set(name.split(".")) <= defined, (name, files)
