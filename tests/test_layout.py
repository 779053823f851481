"""The package's shape holds (DESIGN.md "Direction of imports"; issue 14's bars): which module may
import which, and no module grows past ~500 lines without saying why at its top. Read from the
source with `ast`, so a violation names the file, the line and the import."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lmschool"
LONG_REASON = "This module is long because"   # the phrase a module over MAX_LINES opens with
MAX_LINES = 520

# (modules, by path prefix relative to lmschool/) -> imports they must never make
FORBIDDEN = [
    ("data/", ("lmschool.model", "lmschool.generate", "lmschool.trainer", "lmschool.checkpoint")),
    ("world/", ("torch", "lmschool.model", "lmschool.generate", "lmschool.checkpoint", "lmschool.trainer",
                "lmschool.evaluate", "lmschool.runtime")),
    ("losses/", ("lmschool.model", "lmschool.trainer", "lmschool.generate", "lmschool.checkpoint")),
    ("report/", ("torch", "lmschool.model", "lmschool.generate", "lmschool.checkpoint", "lmschool.tokenizer")),
]
# Nothing low imports a stage or a command; only these may.
MAY_IMPORT_STAGES = ("cli.py", "pipeline.py", "commands/", "stages/", "__main__.py")


def modules():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def imports(path: Path):
    """(line, imported module name) of every import in the file, relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.lineno, node.module
            for alias in node.names:   # `from lmschool import distributed` imports lmschool.distributed
                yield node.lineno, f"{node.module}.{alias.name}"


def name(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def test_import_directions():
    bad = []
    for path in modules():
        rel = name(path)
        for prefix, banned in FORBIDDEN:
            if rel.startswith(prefix):
                bad += [f"lmschool/{rel}:{line} imports {mod}" for line, mod in imports(path)
                        if any(mod == b or mod.startswith(b + ".") for b in banned)]
        if not rel.startswith(MAY_IMPORT_STAGES):
            bad += [f"lmschool/{rel}:{line} imports {mod} (a stage or a command)" for line, mod in imports(path)
                    if mod.startswith(("lmschool.stages", "lmschool.commands"))]
        if rel != "distributed.py":
            bad += [f"lmschool/{rel}:{line} imports {mod} (only distributed.py may)" for line, mod in imports(path)
                    if mod.startswith("torch.distributed")]
    assert not bad, "\n".join(bad)


def test_no_module_is_long_without_a_reason():
    long = [f"lmschool/{name(p)}: {n} lines" for p in modules()
            if (n := len(p.read_text().splitlines())) > MAX_LINES
            and LONG_REASON not in (ast.get_docstring(ast.parse(p.read_text())) or "")]
    assert not long, f"over {MAX_LINES} lines without '{LONG_REASON} ...' in the module docstring: {long}"


def test_every_module_opens_with_what_it_is():
    missing = [name(p) for p in modules()
               if p.name != "__init__.py" and not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, missing


@pytest.mark.parametrize("module", ["hf", "runtime", "cli", "data/text", "data/prompts", "data/jsonl"])
def test_modules_have_tests(module):
    """Every module is imported by some test (the listed ones had none before issue 14)."""
    dotted = "lmschool." + module.replace("/", ".")
    tests = Path(__file__).resolve().parent
    assert any(dotted in t.read_text() for t in tests.glob("test_*.py")), dotted


def test_test_files_mirror_the_package():
    """tests/test_a_b.py tests lmschool/a/b.py (or the module lmschool/a_b.py, or the package
    lmschool/a_b/): a reader finds a module's tests by its path."""
    tests = Path(__file__).resolve().parent
    orphans = []
    for t in sorted(tests.glob("test_*.py")):
        parts = t.stem[len("test_"):].split("_")
        if t.stem == "test_layout":
            continue
        if not ((PACKAGE.joinpath(*parts[:-1]) / f"{parts[-1]}.py").is_file()
                or (PACKAGE / f"{'_'.join(parts)}.py").is_file() or PACKAGE.joinpath(*parts).is_dir()):
            orphans.append(t.name)
    assert not orphans, f"test files that name no module: {orphans}"
