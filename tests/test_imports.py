"""The house's layering: no module of minimoe imports, even lazily inside a function, a module that imports
it back (the circles once between distributed and errors, and student, heads and export.hf)."""
import ast
import os

import minimoe

PACKAGE = os.path.dirname(os.path.abspath(minimoe.__file__))


def _imports() -> dict[str, set[str]]:
    """Module -> the minimoe modules it imports anywhere in its text (relative imports)."""
    graph = {}
    for root, _, files in os.walk(PACKAGE):
        if os.path.basename(root) == "remote":  # the code model folders carry: standalone by design
            continue
        for f in files:
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
            mod = rel.removesuffix(".__init__")
            package = mod if f == "__init__.py" else mod.rsplit(".", 1)[0]
            targets = graph.setdefault(mod, set())
            for node in ast.walk(ast.parse(open(os.path.join(root, f)).read())):
                if isinstance(node, ast.ImportFrom) and node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                    for alias in node.names:
                        sub = f"{target}.{alias.name}"
                        is_module = os.path.isfile(os.path.join(os.path.dirname(PACKAGE),
                                                                *sub.split(".")) + ".py")
                        targets.add(sub if is_module else target)
    return graph


def test_no_import_cycles():
    graph, cycles, done = _imports(), [], set()

    def visit(mod, path):
        if mod in path:
            cycles.append(" -> ".join(path[path.index(mod):] + [mod]))
            return
        if mod in done:
            return
        done.add(mod)
        for target in sorted(graph.get(mod, ())):
            visit(target, path + [mod])

    for mod in sorted(graph):
        visit(mod, [])
    assert graph["minimoe.student"] and not cycles, cycles
