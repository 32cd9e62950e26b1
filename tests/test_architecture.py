"""The layout stays as docs/architecture.md draws it: data flows one way, the core imports
neither Discord nor torch, no import cycle, and no module or class grows past a reader's
patience."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bot", "cogs")
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 250
# The only modules of bot/ that may import discord: the command line, the Bot subclass (the
# composition root of the Discord side, which also loads the cogs), the API address, what the
# bot registers with Discord by itself (commands, invite) and the doctor that checks it.
DISCORD_SIDE = {"bot.__main__", "bot.app", "bot.discord_api", "bot.discord_setup", "bot.doctor"}
TORCH_SIDE_PREFIX = "bot.pipelines"


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_at_run_time(path: Path) -> set[str]:
    """Modules imported anywhere in the file (functions too), except under TYPE_CHECKING."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return names


def project_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_at_run_time(path) & known.keys() for name, path in known.items()}


def test_no_import_cycle():
    graph = project_graph()
    # A package importing its own submodules (its __init__ re-exports) is not a cycle.
    for name, targets in graph.items():
        graph[name] = {t for t in targets if not t.startswith(name + ".")}
    state: dict[str, str] = {}
    cycles = []

    def walk(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycles.append([*trail[trail.index(target) :], target])
            elif target not in state:
                walk(target, [*trail, target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    assert cycles == []


def test_the_core_imports_neither_discord_nor_torch_nor_cogs():
    for name, path in modules().items():
        if not name.startswith("bot.") or name.startswith(TORCH_SIDE_PREFIX):
            continue
        imported = imports_at_run_time(path)
        roots = {module.split(".")[0] for module in imported}
        if name not in DISCORD_SIDE:
            assert not roots & {"discord", "cogs"}, name
        assert not roots & {"torch", "diffusers", "transformers"}, name


def test_cogs_never_import_torch():
    for name, path in modules().items():
        if name.startswith("cogs"):
            imported = imports_at_run_time(path)
            assert not any(m.startswith(TORCH_SIDE_PREFIX) for m in imported), name
            assert not {m.split(".")[0] for m in imported} & {"torch", "diffusers"}, name


def test_modules_and_classes_stay_small():
    too_long = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{name}: {lines} lines")
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                size = node.end_lineno - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    too_long.append(f"{name}.{node.name}: {size} lines")
    assert too_long == []


def test_only_bot_db_writes_sql():
    for name, path in modules().items():
        if name.startswith("bot.db"):
            continue
        assert "aiosqlite" not in {m.split(".")[0] for m in imports_at_run_time(path)}, name


MAX_FUNCTION_LINES = 60
MAX_PARAMETERS = 7  # self and cls not counted
DOCSTRING_PAST_LINES = 20
# The refusals a member's request can meet, answered by the one funnel (cogs/common.py).
REFUSAL_NAMES = {
    "Refused",
    "InvalidRequest",
    "AdmissionRefused",
    "QuotaExceeded",
    "TooManyQueued",
    "CostOverCap",
    "MemberBanned",
    "PromptBlocked",
    "ShuttingDown",
    "ImageRejected",
    "OperationRefused",
    "DefaultsRefused",
    "JobStillRunning",
}
# The funnel answers refusals; the desk may finish admitting a prompt's other jobs first.
MAY_CATCH_REFUSALS = {"cogs.common", "cogs.admission"}
QUEUE_INDEX_CHANGES = {"add", "remove", "load", "claimed"}
QUEUE_INDEX_OWNERS = {"bot.service", "bot.executor", "bot.queue"}


def functions() -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    found = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                found.append((f"{name}.{node.name}:{node.lineno}", node))
    return found


def is_slash_command(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """A slash command's callback takes one parameter per option Discord shows."""
    return any("command" in ast.unparse(decorator) for decorator in node.decorator_list)


def parameter_count(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    arguments = node.args
    named = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]
    count = len(named) + bool(arguments.vararg) + bool(arguments.kwarg)
    return count - bool(named and named[0].arg in ("self", "cls"))


def test_functions_stay_short_and_narrow_and_the_long_ones_say_why():
    problems = []
    for where, node in functions():
        size = node.end_lineno - node.lineno + 1
        if size > MAX_FUNCTION_LINES:
            problems.append(f"{where}: {size} lines")
        if parameter_count(node) > MAX_PARAMETERS and not is_slash_command(node):
            problems.append(f"{where}: {parameter_count(node)} parameters")
        if size > DOCSTRING_PAST_LINES and ast.get_docstring(node) is None:
            problems.append(f"{where}: {size} lines and no docstring")
    assert problems == []


def test_only_the_funnel_and_the_desk_catch_refusals():
    catching = []
    for name, path in modules().items():
        if not name.startswith("cogs") or name in MAY_CATCH_REFUSALS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ExceptHandler) and node.type is not None:
                caught = {n.id for n in ast.walk(node.type) if isinstance(n, ast.Name)}
                caught |= {n.attr for n in ast.walk(node.type) if isinstance(n, ast.Attribute)}
                if caught & REFUSAL_NAMES:
                    catching.append(f"{name}:{node.lineno}")
    assert catching == []


def test_only_the_service_changes_the_queue_index():
    changing = []
    for name, path in modules().items():
        if name in QUEUE_INDEX_OWNERS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in QUEUE_INDEX_CHANGES
                and isinstance(node.func.value, ast.Attribute)
                and node.func.value.attr in ("queue", "_queue")
            ):
                changing.append(f"{name}:{node.lineno}")
    assert changing == []
