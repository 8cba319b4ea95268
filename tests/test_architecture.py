"""The package structure as the code really imports it: no cycles, nothing importing from a layer above it,
and one output channel (no print outside greenrun.core.output)."""

from __future__ import annotations

import ast
from pathlib import Path

import greenrun

ROOT = Path(greenrun.__file__).resolve().parent

# Lowest first. A module may import its own layer or lower ones; packages count as one layer each.
LAYERS = [
    {"greenrun", "greenrun.core"},
    {"greenrun.storage", "greenrun.runtime", "greenrun.data"},
    {"greenrun.ckpt"},
    {"greenrun.train"},
    {"greenrun.config"},
    {
        "greenrun.trainer",
        "greenrun.trainer_state",
        "greenrun.accounting",
        "greenrun.elastic",
        "greenrun.runs",
        "greenrun.fit",
        "greenrun.history",
        "greenrun.plan",
        "greenrun.interop",  # a run's model out: the trainer samples through it, export and sample read runs
    },
    {"greenrun.smoke"},
    {"greenrun.job", "greenrun.report"},  # report reads what a job wrote (runs.py for an s3:// run)
    {"greenrun.launch"},  # several processes of one job through torch's launcher; each worker runs job.py
    {"greenrun.cli", "greenrun.__main__"},
]


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(("greenrun", *path.relative_to(ROOT).with_suffix("").parts))
        mods[name.removesuffix(".__init__")] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> greenrun modules it imports anywhere in its body (lazy and TYPE_CHECKING imports included)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "greenrun":
                for alias in node.names:  # `from greenrun.train import model` imports greenrun.train.model
                    sub = f"{node.module}.{alias.name}"
                    targets.add(sub if sub in mods else node.module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.split(".")[0] == "greenrun"}
        graph[name] = {t for t in targets if t in mods and t != name}
    return graph


def _layer(module: str) -> int:
    best = None
    for rank, members in enumerate(LAYERS):
        for member in members:
            if (module == member or module.startswith(member + ".")) and (
                best is None or len(member) > best[1]
            ):
                best = (rank, len(member))
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS in {__file__}"
    return best[0]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_nothing_imports_from_a_layer_above_it():
    upward = [
        f"{src} (layer {_layer(src)}) imports {dst} (layer {_layer(dst)})"
        for src, dsts in sorted(import_graph().items())
        for dst in sorted(dsts)
        if _layer(dst) > _layer(src)
    ]
    assert upward == []


def test_every_module_has_a_layer():
    for module in _modules():
        _layer(module)


def test_one_output_channel_no_print_outside_core_output():
    found = []
    for name, path in _modules().items():
        if name == "greenrun.core.output":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                found.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}")
    assert found == [], "use logging or greenrun.core.output: " + ", ".join(found)


def test_no_changelog_comments_in_the_code():
    found = [
        f"{path.relative_to(ROOT.parent)}:{i}"
        for path in _modules().values()
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if "# FIX:" in line
    ]
    assert found == [], "history belongs in git: " + ", ".join(found)


def test_the_add_an_optimizer_diff_in_architecture_md_works(monkeypatch):
    """Apply the documented diff's Python to the optimizer module, then build, validate and step with it."""
    import re

    import torch

    from greenrun.train import memory, model, optimizer

    doc = (ROOT.parent / "docs" / "ARCHITECTURE.md").read_text()
    hunk = re.search(r"\+\+\+ b/greenrun/train/optimizer.py\n((?:\+.*\n)+)", doc).group(1)
    code = "\n".join(line[1:] for line in hunk.splitlines())
    monkeypatch.setattr(optimizer.OPTIMIZERS, "_options", dict(optimizer.OPTIMIZERS._options))
    exec(compile(code, "ARCHITECTURE.md", "exec"), vars(optimizer))  # noqa: S102 - our own documentation
    cfg = optimizer.OptimizerConfig(name="sgd", lr=0.1)
    assert optimizer.validate(cfg) == []
    net = model.GPT(model.ModelConfig(n_layer=1, n_embd=32, n_head=2, seq_len=16, vocab_size=300))
    opt = optimizer.build(cfg, net)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"]
    x = torch.randint(300, (2, 17))
    _, loss = net(x[:, :-1], x[:, 1:])
    loss.backward()
    opt.step()
    est = memory.estimate(net.cfg, 2, 16, "fp32", ["none"], "sgd")
    assert est.optimizer_state == 4 * model.count_params(net.cfg, non_embedding=False)
