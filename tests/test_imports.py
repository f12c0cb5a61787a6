"""The package's import graph (every import, function-local ones included), read with the standard
library: no cycles, and layers only import downwards (core <- backends <- methods <- API <- launchers)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moe_peft_ds"
BACKENDS = {
    "moe_peft_ds.backends.hf",
    "moe_peft_ds.backends.hf_families",
    "moe_peft_ds.backends.hf_load",
    "moe_peft_ds.backends.deepspeed_moe",
    "moe_peft_ds.backends.megatron",
}
METHODS = {
    "moe_peft_ds.sieve",
    "moe_peft_ds.mixlora",
    "moe_peft_ds.continual",
    "moe_peft_ds.multi_adapter",
    "moe_peft_ds.profiling",
    "moe_peft_ds.selection",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``module -> package modules it imports`` (absolute and relative imports, at any depth)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    assert _cycle(import_graph()) is None, " -> ".join(_cycle(import_graph()))


def test_backends_import_neither_methods_nor_other_backends():
    graph = import_graph()
    for backend in BACKENDS:
        family = (
            {backend, "moe_peft_ds.backends.hf", "moe_peft_ds.backends.hf_families"} if "hf" in backend else {backend}
        )
        assert not graph[backend] & METHODS, (backend, graph[backend] & METHODS)
        assert not graph[backend] & (BACKENDS - family), (backend, graph[backend] & (BACKENDS - family))
        assert "moe_peft_ds" not in graph[backend]  # nor the public API


def test_the_graph_is_read_right():
    graph = import_graph()
    assert "moe_peft_ds.config" in graph["moe_peft_ds.lora"]  # from .config import LoRAConfig
    assert "moe_peft_ds.lora" in graph["moe_peft_ds.backends.hf"]  # from ..lora import ...
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
