"""Package-level guarantees: light import, config validation, error mapping."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dask_rag import errors
from dask_rag.config import (
    BatchConfig,
    EmbedConfig,
    IndexSpec,
    RagConfig,
    ServeConfig,
    parse_factory,
)


def test_import_pulls_no_heavy_modules():
    code = (
        "import sys, dask_rag\n"
        "from dask_rag import DistributedIndex, IndexSpec\n"
        "heavy = ['torch', 'faiss', 'sentence_transformers', 'cupy', 'vllm', 'bm25s',"
        " 'transformers', 'scann', 'onnxruntime', 'onnx']\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("factory,kind", [
    ("Flat", "flat"), ("IVF256,Flat", "ivf"), ("IVF64,PQ16", "ivf"),
    ("IVF64,PQ16x8,RFlat", "ivf"), ("IVF64,PQ8,Refine(Flat)", "ivf"), ("HNSW32", "hnsw"),
    ("ScaNN", "scann"), ("ScaNN200", "scann"),
])
def test_parse_factory(factory, kind):
    assert parse_factory(factory).kind == kind


def test_refine_detected():
    info = parse_factory("IVF64,PQ16,RFlat")
    assert info.refine and info.base_factory == "IVF64,PQ16"


@pytest.mark.parametrize("factory", ["IVF,Flat", "LSH", "Flat,IVF", "", "HNSW", "IVF0,Flat"])
def test_unknown_factory_rejected(factory):
    with pytest.raises(errors.InvalidInput, match="factory"):
        IndexSpec(factory=factory)


@pytest.mark.parametrize("kwargs,field", [
    ({"n_shards": 0}, "n_shards"),
    ({"metric": "cosine"}, "metric"),
    ({"sharding": "ivf", "factory": "Flat"}, "sharding"),
    ({"train_size": 0}, "train_size"),
    ({"nprobe": -1}, "nprobe"),
    ({"backend": "torch", "factory": "HNSW32"}, "backend"),
    ({"sharding": "ivf", "factory": "ScaNN"}, "sharding"),
])
def test_index_spec_validation_names_field(kwargs, field):
    with pytest.raises(errors.InvalidInput, match=field):
        IndexSpec(**kwargs)


def test_sharding_auto():
    assert IndexSpec(factory="IVF16,Flat").resolved_sharding == "ivf"
    assert IndexSpec(factory="Flat").resolved_sharding == "hash"


def test_other_configs_validate():
    with pytest.raises(errors.InvalidInput, match="precision"):
        EmbedConfig(precision="fp8")
    with pytest.raises(errors.InvalidInput, match="max_batch"):
        BatchConfig(max_batch=0)
    with pytest.raises(errors.InvalidInput, match="mode"):
        RagConfig(mode="magic")
    with pytest.raises(errors.InvalidInput, match="port"):
        ServeConfig(port=70000)
    # frozen and hashable: usable as a per-worker cache key
    assert hash(EmbedConfig()) == hash(EmbedConfig())
    with pytest.raises(AttributeError):
        EmbedConfig().model = "x"  # type: ignore[misc]


def test_spec_round_trip():
    spec = IndexSpec(factory="IVF32,PQ8", n_shards=3, metric="l2")
    assert IndexSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(errors.InvalidInput, match="unknown"):
        IndexSpec.from_dict({"bogus": 1})


def test_http_status_table():
    assert errors.http_status(errors.InvalidInput("x")) == 422
    assert errors.http_status(errors.MalformedRequest("x")) == 400
    assert errors.http_status(errors.PayloadTooLarge("x")) == 413
    assert errors.http_status(errors.Unauthorized("x")) == 401
    assert errors.http_status(errors.IndexNotFound("x")) == 404
    assert errors.http_status(errors.Overloaded("x", 2)) == 429
    assert errors.http_status(errors.RequestTimeout("x")) == 504
    assert errors.http_status(errors.ShardUnavailable("x")) == 503
    assert errors.http_status(RuntimeError("x")) == 500


def test_overloaded_keeps_retry_after_when_pickled():
    import pickle

    exc = pickle.loads(pickle.dumps(errors.Overloaded("busy", retry_after=3.5)))
    assert exc.retry_after == 3.5 and str(exc) == "busy"


def test_cli_parses_every_command():
    from dask_rag.cli import _serve_config, build_parser

    parser = build_parser()
    args = parser.parse_args(["serve", "--index", "idx", "--busy-wait-ms", "12"])
    cfg = _serve_config(args)
    assert cfg.batch.busy_wait_ms == 12.0 and cfg.batch.max_batch == 128
    demo = _serve_config(parser.parse_args(["demo", "--no-serve"]))
    assert demo.batch.busy_wait_ms == 25.0 and demo.batch.max_wait_ms == 0.0


def test_layer_contract_holds():
    """The package's layers (pyproject's [tool.importlinter]): each imports only from layers
    below it, index/ and embed/ never import each other, serve/ never imports them."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint), "--no-cache"], cwd=root, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("target, dev", [("demo", False), ("test", True)])
def test_make_demo_installs_the_runtime_only(tmp_path, target, dev):
    """On a fresh machine ``make demo`` installs the package and its runtime dependencies, not
    the test toolchain (moto, flask, schemathesis, ...); ``make test`` adds the dev extra.
    Read from make's dry run into an empty venv path (nothing is installed)."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    plan = subprocess.run(["make", "-n", target, f"VENV={tmp_path / 'venv'}"], cwd=root,
                          capture_output=True, text=True, check=True).stdout
    installs = [line for line in plan.splitlines() if "pip install" in line]
    assert any(line.rstrip().endswith("-e .") for line in installs), installs
    assert any(".[dev]" in line for line in installs) == dev, installs
    torch_first = next(i for i, line in enumerate(installs) if "torch==" in line)
    assert torch_first == 0  # the local CPU wheel, before anything can pull CUDA wheels


def _import_graph() -> dict[str, set[str]]:
    """dask_rag's modules -> the dask_rag modules they import (anywhere in the file, function
    bodies included; not under ``if TYPE_CHECKING:``, which never runs)."""
    import ast

    root = Path(__file__).resolve().parent.parent
    files = {".".join(f.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): f
             for f in (root / "dask_rag").rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        tree = ast.parse(path.read_text())
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        skip = {id(sub) for node in ast.walk(tree) if isinstance(node, ast.If)
                and "TYPE_CHECKING" in ast.unparse(node.test) for sub in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                subs = [f"{base}.{a.name}" for a in node.names]
                names = [s for s in subs if s in files]
                if len(names) < len(subs):
                    names.append(base)
            for name in names:
                while name and name not in files:
                    name = name.rsplit(".", 1)[0] if "." in name else ""
                if name and name != mod:
                    graph[mod].add(name)
    return graph


def test_no_import_cycles_inside_the_package():
    """No module of dask_rag reaches itself through its imports (#27)."""
    graph = _import_graph()
    assert len(graph) > 50 and "dask_rag.index.sparse" in graph["dask_rag.index.tasks"]
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = 1
        for dep in sorted(graph[mod]):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep):], dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    assert not cycles, cycles[:5]
