"""The code layout README's "Code layout" section documents: the packages of `megatron_mm/`
top to bottom, each importing only packages listed below it. Every import of every module
(module level and inside functions; absolute and relative) is read with `ast`, nothing is
imported, so this takes well under a second."""

import ast
import functools
import os
import re

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "megatron_mm")


def documented_order(readme: str) -> list[str]:
    """The package names of README's "## Code layout" list (`- `name` ...`), top first."""
    section = re.search(r"^## Code layout\n(.*?)(?=^## )", readme, re.M | re.S)
    assert section, 'README.md has no "## Code layout" section'
    return re.findall(r"^- `(\w+)`", section.group(1), re.M)


def top_level_parts() -> set[str]:
    """The packages and modules directly under megatron_mm/ (cli.py -> cli)."""
    parts = set()
    for name in os.listdir(PACKAGE):
        if os.path.isfile(os.path.join(PACKAGE, name, "__init__.py")):
            parts.add(name)
        elif name.endswith(".py") and name != "__init__.py":
            parts.add(name[:-3])
    return parts


def imports_of(path: str, module: str) -> list[tuple[int, str]]:
    """(line, imported module or name) for every `import` in the file, relative ones resolved."""
    tree = ast.parse(open(path).read(), path)
    package = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


@functools.cache
def package_imports() -> tuple[tuple[str, int, str, str, str], ...]:
    """(file, line, imported name, importing package, imported package) for each import of one
    top-level part of megatron_mm by another ("" for megatron_mm/__init__.py itself)."""
    parts = top_level_parts()
    edges = []
    for folder, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, ROOT)
            module = rel[:-3].replace(os.sep, ".").removesuffix(".__init__")
            own = module.split(".")[1] if "." in module else ""
            for line, imported in imports_of(path, module):
                names = imported.split(".")
                if names[0] != "megatron_mm" or len(names) < 2:
                    continue
                # `from megatron_mm import data` names the package; `from megatron_mm import
                # __version__` names megatron_mm/__init__.py (which imports nothing of ours).
                target = names[1] if names[1] in parts else ""
                if target != own:
                    edges.append((rel, line, imported, own, target))
    return tuple(edges)


def test_readme_lists_every_package_once():
    with open(os.path.join(ROOT, "README.md")) as f:
        order = documented_order(f.read())
    assert len(order) == len(set(order)), f"listed twice: {order}"
    assert set(order) == top_level_parts(), (
        f"README's Code layout lists {sorted(order)}; megatron_mm/ holds {sorted(top_level_parts())}")


def test_no_package_imports_one_listed_above_it():
    with open(os.path.join(ROOT, "README.md")) as f:
        order = documented_order(f.read())
    rank = {name: i for i, name in enumerate(order)}
    wrong = []
    for path, line, imported, own, target in package_imports():
        if own == "":
            wrong.append(f"{path}:{line} imports {imported}: megatron_mm/__init__.py imports nothing of megatron_mm")
        elif own == "costs" and target not in ("config", ""):
            wrong.append(f"{path}:{line} imports {imported}: costs imports only config")
        elif target and rank[target] < rank[own]:
            wrong.append(f"{path}:{line} imports {imported}: {target} is listed above {own} in README's Code layout")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_between_packages():
    graph: dict[str, set[str]] = {}
    for _, _, _, own, target in package_imports():
        graph.setdefault(own, set()).add(target)
    done, path = set(), []

    def visit(node: str) -> None:
        if node in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(node):] + [node]))
        if node in done:
            return
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
