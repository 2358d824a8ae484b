"""The package's house rules, read from its source: one-way imports, no circles, no CLI flags below the CLI.

Imports are collected from every ``import`` statement, also inside functions (a lazy import that closes a circle
still ties two modules together). Flags are looked for in string constants that are not docstrings.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from pruning.cli.parser import build_parser, flag
from pruning.errors import OptionError

ROOT = Path(__file__).resolve().parents[1]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z_]+")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: str) -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted((ROOT / package).rglob("*.py"))}


def imported(tree: ast.Module, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``tree`` imports: ``from a import b`` is ``a.b`` when that is a module, else
    ``a``; ``import a.b`` is ``a.b``."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if full in known:
                    found.add(full)
                elif node.module in known:
                    found.add(node.module)
    return found


def import_graph(package: str) -> dict[str, set[str]]:
    trees = modules(package)
    known = set(trees)
    return {name: imported(tree, known) - {name} for name, tree in trees.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circles_inside_pruning():
    graph = import_graph("pruning")
    assert "pruning.cli.prune" in graph and "pruning.infer.fusion" in graph["pruning.sparse24"]
    assert find_cycle(graph) is None


@pytest.mark.parametrize(
    "package, forbidden",
    [
        ("wanda_kernels", ("pruning", "bench", "tests", "transformers")),
        ("pruning", ("bench", "tests")),
        ("bench", ("tests",)),
    ],
)
def test_imports_go_one_way(package, forbidden):
    for name, tree in modules(package).items():
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            bad = [n for n in names if n.split(".")[0] in forbidden]
            assert not bad, f"{name} imports {bad}"


def test_library_modules_do_not_import_the_cli():
    for name, tree in modules("pruning").items():
        if name.startswith("pruning.cli") or name == "pruning.__main__":
            continue
        assert not {m for m in imported(tree, set(modules("pruning"))) if m.startswith("pruning.cli")}, name


def _docstring_nodes(tree: ast.Module) -> set[int]:
    nodes = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                nodes.add(id(body[0].value))
    return nodes


def test_no_library_module_below_the_cli_names_a_flag():
    """Library errors name parameters; the CLI spells them as flags (pruning.errors.OptionError). Other programs'
    flags (pip's, in an argv) are not ours to spell."""
    from pruning.cli.parser import build_parser

    ours = {option for option in build_parser()._option_string_actions if option.startswith("--")}
    assert {"--model", "--sparsity_ratio", "--save_model"} <= ours
    found = []
    for name, tree in modules("pruning").items():
        if name.startswith("pruning.cli"):
            continue
        docstrings = _docstring_nodes(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                found += [f"{name}:{node.lineno}: {m}" for m in FLAG.findall(node.value) if m in ours]
    assert not found


def _option_templates() -> list[tuple[str, str]]:
    """(module, template text) of every OptionError-like call in the library whose message is a literal."""
    templates = []
    for name, tree in modules("pruning").items():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and node.args):
                continue
            func = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            if not func.endswith("OptionError"):
                continue
            message = node.args[0]
            parts = message.values if isinstance(message, ast.JoinedStr) else [message]
            templates.append((name, "".join(p.value for p in parts if isinstance(p, ast.Constant))))
    return templates


def test_every_option_a_library_error_names_is_a_flag_of_the_cli():
    parser_flags = {option for action in build_parser()._actions for option in action.option_strings}
    templates = _option_templates()
    assert len(templates) >= 8  # the placement, data, loading, config, sparse24 and plan errors
    for module, template in templates:
        for option in re.findall(r"\{(\w+)\}", template):
            assert flag(option) in parser_flags, f"{module}: {{{option}}} is no flag ({template!r})"


def test_option_errors_read_as_parameters_in_the_library_and_as_flags_in_the_cli():
    err = OptionError("{use_variant} needs {method} wanda; seqlen={{seqlen}} stays literal")
    assert str(err) == "use_variant needs method wanda; seqlen={seqlen} stays literal"
    assert err.spelled(flag) == "--use_variant needs --prune_method wanda; seqlen={seqlen} stays literal"
    assert isinstance(err, ValueError)
