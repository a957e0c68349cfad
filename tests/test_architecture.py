"""The import-layer contract: vitlab's layers only import downwards, its packages import each other without cycles,
and an import inside a function (outside the command line) has a stated reason.

The graph is read from the source with :mod:`ast` (no import runs): module-level and function-level imports,
relative imports resolved, ``if TYPE_CHECKING:`` blocks left out (they never run). A package that imports its names
on first use (PEP 562) lists them in a module-level ``_EXPORTS = {name: ".module"}``: each module named there counts
as a module-level import of the package. docs/architecture.md describes
the layers; a new module gets its layer from the longest matching prefix in :data:`LAYERS`.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "vitlab"

# lowest first; a module may import its own layer and the layers below it
LAYERS: list[tuple[str, ...]] = [
    # leaf utilities: exceptions, atomic writes, devices, preprocessing records, label sets (stdlib / torch only)
    ("vitlab.errors", "vitlab.atomic", "vitlab.devices", "vitlab.home", "vitlab.lazy", "vitlab.preprocessing",
     "vitlab.labels"),
    ("vitlab.models",),
    # measurements and CPU kernels of a built model (FLOPs, memory, benchmarks, the oneDNN swap, ONNX / int8)
    ("vitlab.compute",),
    ("vitlab.checkpoints.files",),  # safe file readers and writers
    ("vitlab.hub",),  # names -> local files
    ("vitlab.checkpoints",),  # layouts, reading, building; never the hub
    ("vitlab.factory", "vitlab"),  # create_model(pretrained=) / load / read_checkpoint: hub, then checkpoints
    ("vitlab.data",),
    ("vitlab.evaluate",),
    ("vitlab.train",),
    ("vitlab.tasks",),  # what composes training and evaluation
    ("vitlab.inspect", "vitlab.selfsup", "vitlab.experiments", "vitlab.serve"),
    ("vitlab.cli", "vitlab.__main__"),
]

# importer -> imported pairs that break the layering today; fixing one means deleting it here
KNOWN_UPWARD: set[str] = set()

# cycles between packages today (each as its sorted members); fixing one means deleting it here
KNOWN_CYCLES: set[tuple[str, ...]] = set()

# imports inside functions outside vitlab/cli, by (importing module, imported module's first two dotted parts): why
# each is not at module level. Optional dependencies stay optional; heavy ones load when first needed so that
# `import vitlab` and the command line start fast.
OPTIONAL = "optional dependency"
HEAVY = "start-up time (a heavy import only this function needs)"
POSIX = "POSIX-only module"
IN_FUNCTION_REASONS: dict[tuple[str, str], str] = {
    ("vitlab.checkpoints.files", "torch"): "torch's private restricted unpickler, needed only for legacy files",
    ("vitlab.compute.bench", "timm"): OPTIONAL + " (timm is the benchmark's reference)",
    ("vitlab.compute.bench", "torch.profiler"): HEAVY,
    ("vitlab.compute.deploy", "importlib"): OPTIONAL + " (onnx / onnxruntime, named in the error)",
    ("vitlab.data.arrays", "mlxtend"): OPTIONAL,
    ("vitlab.data.images", "tifffile"): OPTIONAL,
    ("vitlab.models.lora", "peft"): OPTIONAL + " (the lora extra, named in the error; slow to import)",
    ("vitlab.models.lora", "peft.tuners"): OPTIONAL + " (the lora extra)",
    ("vitlab.models.tokenizer", "tokenizers"): OPTIONAL + " (the text extra, named in the error)",
    ("vitlab.models.tokenizer", "sentencepiece"): OPTIONAL + " (the text extra, named in the error)",
    ("vitlab.data.arrays", "sklearn.datasets"): OPTIONAL,
    ("vitlab.experiments.families", "sklearn.datasets"): OPTIONAL + " (only the default sample-photos images need it)",
    ("vitlab.data.arrays", "torchvision.datasets"): HEAVY,
    ("vitlab.data.loaders", "torchvision.transforms"): HEAVY,
    ("vitlab.data.hf", "datasets"): OPTIONAL + " (the hf extra, named in the error)",
    ("vitlab.data.hf_tables", "pyarrow"): OPTIONAL + " (installed with datasets, the hf extra)",
    ("vitlab.data.hf_tables", "pyarrow.parquet"): OPTIONAL + " (installed with datasets, the hf extra)",
    ("vitlab.evaluate.features", "tqdm"): OPTIONAL,
    ("vitlab.evaluate.retrieval", "tqdm"): OPTIONAL,
    ("vitlab.evaluate.report", "matplotlib"): HEAVY,
    ("vitlab.evaluate.report", "matplotlib.patches"): HEAVY,
    ("vitlab.evaluate.report", "matplotlib.pyplot"): HEAVY,
    ("vitlab.tasks.finetune", "PIL"): HEAVY,
    ("vitlab.tasks.suite_config", "tomllib"): "Python >= 3.11 only",
    ("vitlab.experiments.common", "matplotlib"): HEAVY,
    ("vitlab.experiments.common", "matplotlib.pyplot"): HEAVY,
    ("vitlab.hub.download", "fcntl"): POSIX,
    ("vitlab.hub.download", "vitlab.checkpoints"): HEAVY + " (the checkpoints package loads torch; only a download "
                                                           "needs the file check)",
    ("vitlab.hub.download", "tqdm"): OPTIONAL,
    ("vitlab.hub.hf", "huggingface_hub"): OPTIONAL,
    ("vitlab.hub.hf", "huggingface_hub.errors"): OPTIONAL,
    ("vitlab.hub.hf", "huggingface_hub.utils"): OPTIONAL,
    ("vitlab.hub.upload", "huggingface_hub"): OPTIONAL,
    ("vitlab.hub.upload", "huggingface_hub.errors"): OPTIONAL,
    ("vitlab.hub.upload", "httpx"): OPTIONAL,  # huggingface_hub's HTTP client, for its connection errors
    ("vitlab.inspect.figures", "matplotlib"): HEAVY,
    ("vitlab.inspect.figures", "matplotlib.figure"): HEAVY,
    ("vitlab.preprocessing", "torch"): HEAVY + " (a Preprocessing record is plain data)",
    ("vitlab.preprocessing", "torchvision.transforms"): HEAVY,
    ("vitlab.serve.app", "anyio"): OPTIONAL + " (the serve extra)",
    ("vitlab.serve.app", "fastapi"): OPTIONAL + " (the serve extra)",
    ("vitlab.serve.engine", "matplotlib"): HEAVY,
    ("vitlab.serve.server", "uvicorn"): OPTIONAL + " (the serve extra)",
    ("vitlab.serve.server", "uvicorn.protocols"): OPTIONAL + " (the serve extra)",
    ("vitlab.train.checkpoint", "torch.distributed"): HEAVY + " (FSDP state-dict helpers, distributed runs only)",
    ("vitlab.train.distributed", "torch.distributed"): HEAVY + " (FSDP, distributed runs only)",
    ("vitlab.train.objectives", "torchvision.transforms"): HEAVY,
    ("vitlab.train.predict_files", "pyarrow"): OPTIONAL + " (parquet files; installed with datasets, the hf extra)",
    ("vitlab.train.predict_files", "pyarrow.parquet"): OPTIONAL + " (installed with datasets, the hf extra)",
    ("vitlab.train.progress", "tqdm"): OPTIONAL,
    ("vitlab.train.runfolder", "fcntl"): POSIX,
    ("vitlab.train.trackers", "mlflow.entities"): OPTIONAL + " (the mlflow extra, named in the error)",
    ("vitlab.train.trackers", "mlflow.tracking"): OPTIONAL + " (the mlflow extra, named in the error)",
    ("vitlab.train.trackers", "torch.utils"): OPTIONAL + " (torch.utils.tensorboard needs the tensorboard extra)",
    ("vitlab.train.trackers", "wandb"): OPTIONAL + " (the wandb extra, named in the error)",
}

@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    imported: str  # dotted module name (vitlab modules: the module itself, else the name as written)
    file: Path
    line: int
    in_function: bool


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _is_lazy_exports(node: ast.AST) -> bool:
    """``_EXPORTS = {...}`` (the lazily imported names of a package: name -> module)."""
    return (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
            and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets))


def _resolve(package: list[str], module: str) -> str:
    """The dotted name of ``module`` (``..models.vit``, or absolute) imported from inside ``package``."""
    level = len(module) - len(module.lstrip("."))
    if not level:
        return module
    base = package[:len(package) - (level - 1)]
    return ".".join(base + ([module[level:]] if module[level:] else []))


def import_graph() -> list[Import]:
    """Every import statement in vitlab that runs (module level or in a function), one entry per imported module."""
    mods = _modules()
    found = []
    for name, path in mods.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]

        def visit(node: ast.AST, in_function: bool, name=name, path=path, package=package) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and _is_type_checking(child):
                    continue
                if not in_function and _is_lazy_exports(child):
                    modules = {v.value for v in child.value.values if isinstance(v, ast.Constant)}
                    found.extend(Import(name, _resolve(package, m), path, child.lineno, False) for m in sorted(modules))
                inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if isinstance(child, ast.Import):
                    for alias in child.names:
                        found.append(Import(name, alias.name, path, child.lineno, in_function))
                elif isinstance(child, ast.ImportFrom):
                    module = _resolve(package, "." * child.level + (child.module or ""))
                    if module in mods:  # `from pkg import sub` imports the module pkg.sub
                        targets = {f"{module}.{a.name}" if f"{module}.{a.name}" in mods else module
                                   for a in child.names}
                    else:
                        targets = {module}
                    found.extend(Import(name, t, path, child.lineno, in_function) for t in sorted(targets))
                visit(child, inner)

        visit(ast.parse(path.read_text(), str(path)), False)
    return found


def layer_of(module: str) -> int:
    """The index in :data:`LAYERS` of the longest prefix that matches ``module``."""
    best, best_len = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"{module}: no layer in tests/test_architecture.py LAYERS"
    return best


def _internal(graph: list[Import]) -> list[Import]:
    return [i for i in graph if i.imported == "vitlab" or i.imported.startswith("vitlab.")]


def upward_imports(graph: list[Import]) -> dict[str, Import]:
    """``"importer -> imported"`` for each import of a higher layer (the first statement of each pair)."""
    found: dict[str, Import] = {}
    for imp in _internal(graph):
        if layer_of(imp.imported) > layer_of(imp.importer):
            found.setdefault(f"{imp.importer} -> {imp.imported}", imp)
    return found


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def package_cycles(graph: list[Import]) -> set[tuple[str, ...]]:
    """The strongly connected components (of two or more) of the graph between vitlab's top-level packages."""
    edges: dict[str, set[str]] = defaultdict(set)
    for imp in _internal(graph):
        a, b = _package(imp.importer), _package(imp.imported)
        if a != b:
            edges[a].add(b)
    nodes = sorted(set(edges) | {b for targets in edges.values() for b in targets})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: set[tuple[str, ...]] = set()

    def strongconnect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.add(tuple(sorted(component)))

    for v in nodes:
        if v not in index:
            strongconnect(v)
    return components


def _key(imp: Import) -> tuple[str, str]:
    return imp.importer, ".".join(imp.imported.split(".")[:2])


def unexplained_in_function_imports(graph: list[Import]) -> dict[tuple[str, str], Import]:
    """Imports inside functions outside vitlab/cli without a reason in :data:`IN_FUNCTION_REASONS`."""
    found: dict[tuple[str, str], Import] = {}
    for imp in graph:
        if imp.in_function and not imp.importer.startswith("vitlab.cli") and _key(imp) not in IN_FUNCTION_REASONS:
            found.setdefault(_key(imp), imp)
    return found


def _where(imp: Import) -> str:
    return f"{imp.file.relative_to(PACKAGE.parent)}:{imp.line}"


def test_every_module_has_a_layer():
    for name in _modules():
        layer_of(name)


def test_no_layer_imports_a_higher_one():
    found = upward_imports(import_graph())
    new = {k: v for k, v in found.items() if k not in KNOWN_UPWARD}
    assert not new, "imports of a higher layer (see docs/architecture.md): " + "; ".join(
        f"{_where(imp)} {key} (layer {LAYERS[layer_of(imp.importer)][0]} imports layer "
        f"{LAYERS[layer_of(imp.imported)][0]})"
        for key, imp in sorted(new.items()))
    fixed = KNOWN_UPWARD - set(found)
    assert not fixed, f"fixed upward imports still listed in KNOWN_UPWARD: {sorted(fixed)}"


def test_no_cycles_between_packages():
    found = package_cycles(import_graph())
    assert found - KNOWN_CYCLES == set(), f"import cycles between packages: {sorted(found - KNOWN_CYCLES)}"
    assert KNOWN_CYCLES - found == set(), f"fixed cycles still listed in KNOWN_CYCLES: {sorted(KNOWN_CYCLES - found)}"


def test_imports_inside_functions_have_a_reason():
    graph = import_graph()
    found = unexplained_in_function_imports(graph)
    assert not found, ("imports inside functions with no reason (move them to module level, or add the optional "
                     "dependency / start-up reason to IN_FUNCTION_REASONS): "
                     + "; ".join(f"{_where(imp)} imports {imp.imported}" for imp in found.values()))
    stale = set(IN_FUNCTION_REASONS) - {_key(i) for i in graph if i.in_function}
    assert not stale, f"IN_FUNCTION_REASONS entries with no such import: {sorted(stale)}"


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The contract catches what it is for: a model module importing the training package, and a cycle."""
    fake = tmp_path / "vitlab"
    for sub in ("models", "train"):
        (fake / sub).mkdir(parents=True)
        (fake / sub / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "models" / "vit.py").write_text("def f():\n    from ..train import loop\n")
    (fake / "train" / "loop.py").write_text("from ..models import vit\n")
    (fake / "models" / "__init__.py").write_text('_EXPORTS = {"vit": ".vit", "train": "..train.loop"}\n')
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    graph = import_graph()
    assert set(upward_imports(graph)) == {"vitlab.models.vit -> vitlab.train.loop",
                                          "vitlab.models -> vitlab.train.loop"}  # a lazy export counts
    assert package_cycles(graph) == {("vitlab.models", "vitlab.train")}
    assert set(unexplained_in_function_imports(graph)) == {("vitlab.models.vit", "vitlab.train")}
