"""The hf_mixture space and M2N2's coefficient form over checkpoints: members are segment lists,
workers build each child from the memory-mapped seeds in place."""
import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.errors import UserError
from evomerge.spaces.hf_mixture import HFMixtureSpace, HFMixtureSpaceConfig
from evomerge.populations import SpaceInfo, build_strategy
from evomerge.populations.m2n2 import M2N2Config

from hf_models import tiny_family


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    return root, *tiny_family(root)


def space(family, **kw):
    root, base, experts = family
    cfg = dict(name="hf_mixture", models={"base": str(base), "experts": {k: str(v) for k, v in experts.items()}},
               cache_dir=str(root / "cache"), **kw)
    return HFMixtureSpace(HFMixtureSpaceConfig(**cfg), seed=0)


def flat_models(family, labels):
    root, base, experts = family
    paths = {"base": base, **experts}
    states = [load_file(str(paths[k] / "model.safetensors")) for k in labels]
    return states


def test_cells_seeds_recipe_round_trip(family):
    s = space(family, chunk_size=100, include_base=True)
    assert s.labels == ["base", "a", "b", "c"] and s.dim == len(s.cells) * 4
    name = "model.layers.0.mlp.up_proj.weight"  # 64 x 32 = 2048 elements: 21 chunks of <= 100
    assert [(lo, hi) for n, lo, hi in s.cells if n == name][-2:] == [(1900, 2000), (2000, 2048)]
    seeds = s.seeds()
    assert all(np.array_equal(s.coefficients(x)[:, i], np.ones(len(s.cells))) for i, x in enumerate(seeds))
    x = np.repeat(np.random.default_rng(0).normal(size=(5, 4)), [3, 7, 1, len(s.cells) - 12, 1], axis=0).reshape(-1)
    recipe = s.decode(x)
    assert recipe["method"] == "mixture" and len(recipe["segments"]) == 5
    assert recipe["segments"][1][:2] == [s.cells[3][0], s.cells[3][1] // 100]
    np.testing.assert_allclose(s.cell_coefficients(json.loads(json.dumps(recipe))), s.coefficients(x), atol=1e-6)


def test_gram_and_in_place_materialization(family):
    s = space(family, chunk_size=100)
    s.prepare()
    states = flat_models(family, s.labels)
    for i in (0, 5, len(s.cells) - 1):
        name, lo, hi = s.cells[i]
        block = torch.stack([st[name].reshape(-1)[lo:hi].double() for st in states])
        np.testing.assert_allclose(s.gram[i], (block @ block.T).numpy(), rtol=1e-12)
    assert space(family, chunk_size=100).prepare() == s.gram_path()  # cached: loaded, not recomputed
    rt = s.open_runtime("cpu")
    ptrs = {n: t.data_ptr() for n, t in rt.targets.items()}
    c = np.random.default_rng(1).normal(size=(len(s.cells), 3))
    model = rt.materialize(s.decode(c.reshape(-1)))
    assert all(t.data_ptr() == ptrs[n] for n, t in rt.targets.items())
    params = dict(model.named_parameters())
    for i in (0, 7, len(s.cells) - 1):
        name, lo, hi = s.cells[i]
        want = sum(float(np.float32(c[i, k])) * st[name].reshape(-1)[lo:hi] for k, st in enumerate(states))
        torch.testing.assert_close(params[name].detach().reshape(-1)[lo:hi], want, rtol=0, atol=1e-5)


def test_m2n2_children_are_the_models_their_coefficients_say(family):
    """The SLERP angle from the Gram matrices equals the angle between the materialized models."""
    s = space(family)
    s.prepare()
    info = SpaceInfo(dim=s.dim, seeds=tuple(s.seeds()), gram=s.gram)
    st = build_strategy(M2N2Config(name="m2n2", form="coefficients", archive_size=4, mutation_std=0.0), info, 0)
    from evomerge.populations.base import Result

    seeds = st.ask(3)
    st.tell([Result(c, fitness=0.5 + 0.1 * i, scores=np.array([i % 2, 1 - i % 2, 1.0])) for i, c in enumerate(seeds)])
    children = st.ask(4)
    assert len(children) == 4 and all(ch.x.shape == (s.dim,) for ch in children)
    rt = s.open_runtime("cpu")

    def vec(x):
        return torch.cat([p.detach().reshape(-1).double().clone() for n, p in
                          rt.materialize(s.decode(x)).named_parameters() if n in s.tensor_cells])

    a, b = children[0].tag, children[1].tag
    va, vb = vec(st.materialize(a)), vec(st.materialize(b))
    assert st.dot(a, b) == pytest.approx(float(va @ vb), rel=1e-5)
    assert st.cosine(a, b) == pytest.approx(float(va @ vb / (va.norm() * vb.norm())), rel=1e-5)
    assert st.summary()["bytes_per_member_mean"] <= len(s.cells) * (8 + 3 * 8)


def test_dense_m2n2_and_strategy_chunks_are_refused(family):
    s = space(family)
    s.prepare()
    info = SpaceInfo(dim=s.dim, seeds=tuple(s.seeds()), gram=s.gram)
    with pytest.raises(UserError, match="strategy.form: a mixture space"):
        build_strategy(M2N2Config(name="m2n2"), info, 0)
    with pytest.raises(UserError, match="strategy.chunk_size: a mixture space sets the grid"):
        build_strategy(M2N2Config(name="m2n2", form="coefficients", chunk_size=8, mutation_std=0.0), info, 0)


def test_m2n2_over_checkpoints_end_to_end(cli, family, tmp_path):
    root, base, experts = family
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b), "split": "train" if i < 12 else "test"}
            for i, (a, b) in enumerate((i % 5, i % 3) for i in range(16))]
    (tmp_path / "add.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "seed": 0,
        "space": {"name": "hf_mixture", "cache_dir": str(root / "cache"),
                  "models": {"base": str(base), "experts": {k: str(v) for k, v in experts.items()}}},
        "strategy": {"name": "m2n2", "form": "coefficients", "archive_size": 4, "mutation_std": 0.0},
        "fitness": {"name": "lm_tasks", "tasks": [{"name": "add", "path": str(tmp_path / "add.jsonl"),
                                                   "kind": "generate", "max_new_tokens": 3}]},
        "engine": {"workers": 2, "batch_size": 2},
        "budget": {"max_evals": 8},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    r = cli("--config", str(tmp_path / "cfg.yaml"), "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluations"] == 8 and summary["failed"] == 0
    assert summary["strategy"]["form"] == "coefficients"
    evals = [json.loads(line) for line in (out / "evals.jsonl").read_text().splitlines()]
    assert all(e["recipe"]["method"] == "mixture" and e["recipe"]["models"] == ["a", "b", "c"] for e in evals)
    seeds = sorted(e["recipe"]["segments"][0][2] for e in evals if e["id"] < 3)
    assert seeds == [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    assert (out / "best" / "recipe.json").exists()
    r = cli("export", str(out), "--eval-id", str(evals[-1]["id"]), "--to", str(tmp_path / "exp"),
            "--mergekit", str(tmp_path / "mk.yaml"))
    assert r.returncode == 0, r.stderr
    mk = yaml.safe_load((tmp_path / "mk.yaml").read_text())
    assert mk["merge_method"] == "linear" and mk["parameters"] == {"normalize": False} and len(mk["models"]) == 3
    s = space(family)
    want = s.open_runtime("cpu").materialize(evals[-1]["recipe"])
    from transformers import AutoModelForCausalLM

    got = AutoModelForCausalLM.from_pretrained(tmp_path / "exp")
    for (n, p), (_, q) in zip(want.named_parameters(), got.named_parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)
