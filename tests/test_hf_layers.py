"""The hf_layers space (data-flow merging): vector -> layer path, the path model over the seeds' resident
layers (no weight copied, KV cache), exports (model directory, mergekit passthrough), PS+DFS seeds."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from evomerge.errors import UserError
from evomerge.layerpath import load, slices_of
from evomerge.passthrough import stack_layers
from evomerge.spaces.hf_layers import HFLayersSpace, HFLayersSpaceConfig

from hf_models import tiny_family

ROOT = Path(__file__).resolve().parent.parent
IDS = torch.tensor([[2, 5, 6, 7, 8, 9], [2, 10, 11, 12, 13, 14]])


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("layers")
    return root, *tiny_family(root, experts=("a", "b"))


def space(family, **kw) -> HFLayersSpace:
    root, base, experts = family
    cfg = dict(name="hf_layers", models={"base": str(base), "experts": {k: str(v) for k, v in experts.items()}},
               device="cpu", **kw)
    return HFLayersSpace(HFLayersSpaceConfig(**cfg), seed=0)


# a path that jumps between models and repeats a layer (base.0 twice)
PATH = [{"model": "base", "layer": 0}, {"model": "base", "layer": 1}, {"model": "a", "layer": 1},
        {"model": "a", "layer": 2}, {"model": "b", "layer": 0}, {"model": "base", "layer": 0}]


def vector_for(s: HFLayersSpace, path: list[dict]) -> np.ndarray:
    """The point whose included slots are `path` (in slot order), every other slot out."""
    x = np.clip(np.full(len(s.slots), -1.0), s.lower[:len(s.slots)], s.upper[:len(s.slots)])
    t = 0
    for step in path:
        while s.slots[t] != (step["model"], step["layer"]):
            t += 1
        x[t] = 0.3
        t += 1
    return x


def test_slots_decode_and_seeds(family):
    s = space(family, repeats=2)
    assert len(s.slots) == s.dim == 2 * 3 * 3  # repeats x models x layers
    assert s.slots[:4] == [("base", 0), ("base", 1), ("base", 2), ("a", 0)] and s.slots[9] == ("base", 0)
    assert s.decode(vector_for(s, PATH)) == {"method": "layers", "path": PATH}
    # the centre is the first model's own path; the seeds are each model's own path
    assert s.decode((s.lower + s.upper) / 2)["path"] == [{"model": "base", "layer": i} for i in range(3)]
    assert s.describe()["path_at_centre"] == "base.0 base.1 base.2"
    assert [[(p["model"], p["layer"]) for p in s.decode(x)["path"]] for x in s.seeds()] == [
        [(m, i) for i in range(3)] for m in ("base", "a", "b")]
    # no slot in: the largest entry's slot alone
    x = np.full(s.dim, -1.0)
    x[7] = -0.2
    assert s.decode(x)["path"] == [{"model": "b", "layer": 1}]
    assert space(family, include_base=False, repeats=1).slots[0] == ("a", 0)


def test_scales_only_at_jumps(family):
    s = space(family, repeats=2, scales=True)
    n = len(s.slots)
    assert s.dim == 2 * n and s.lower[n] == 0.5 and s.upper[-1] == 1.5
    x = np.concatenate([vector_for(s, PATH), np.full(n, 1.25)])
    path = s.decode(x)["path"]
    assert [p.get("scale") for p in path] == [None, None, 1.25, None, 1.25, 1.25]


def test_path_model_equals_the_stacked_checkpoint_and_copies_no_weight(family, tmp_path):
    from transformers import AutoModelForCausalLM

    root, base, experts = family
    s = space(family)
    rt = s.open_runtime("cpu")
    model = rt.materialize({"method": "layers", "path": PATH})
    assert model.config.num_hidden_layers == len(PATH)
    stack_layers(base, s.seed_paths, slices_of(PATH), tmp_path / "stacked")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "stacked").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, rtol=0, atol=1e-5)
    # every layer's parameters are the seed's own tensors
    layers = model.model.layers
    for step, layer in zip(PATH, layers):
        seed = rt.seed_models[step["model"]].model.layers[step["layer"]]
        assert [p.data_ptr() for p in layer.parameters()] == [p.data_ptr() for p in seed.parameters()]
    assert model.model.embed_tokens is rt.seed_models["base"].model.embed_tokens  # the first step's model
    assert model.lm_head is rt.seed_models["base"].lm_head  # the last step's
    assert [la.self_attn.layer_idx for la in layers] == list(range(len(PATH)))  # own KV-cache slots
    assert rt.seed_models["base"].model.layers[0].self_attn.layer_idx == 0  # the seeds untouched
    # another path re-points the same shell; the seeds still run as themselves
    other = rt.materialize({"method": "layers", "path": [{"model": "b", "layer": 2}]})
    assert other.config.num_hidden_layers == 1 and other.lm_head is rt.seed_models["b"].lm_head
    with torch.no_grad():
        seed_b = AutoModelForCausalLM.from_pretrained(experts["b"]).eval()
        torch.testing.assert_close(rt.seed_models["b"](IDS).logits, seed_b(IDS).logits, rtol=0, atol=1e-6)


def test_a_repeated_layer_generates_the_same_with_and_without_the_kv_cache(family, tmp_path):
    from transformers import AutoModelForCausalLM

    root, base, experts = family
    s = space(family)
    model = s.open_runtime("cpu").materialize({"method": "layers", "path": PATH})
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(IDS, use_cache=True, **kw)
        plain = model.generate(IDS, use_cache=False, **kw)
        stack_layers(base, s.seed_paths, slices_of(PATH), tmp_path / "stacked")
        ref = AutoModelForCausalLM.from_pretrained(tmp_path / "stacked").eval().generate(IDS, use_cache=True, **kw)
    assert torch.equal(cached, plain) and torch.equal(cached, ref)


def test_lm_tasks_scores_a_path_model(family):
    from evomerge.fitness.lm_tasks import LMTasksFitness, LMTasksFitnessConfig

    root, base, experts = family
    rows = [{"prompt": f"{i}+{i}=", "choices": [str(2 * i), "x"], "answer": 0, "split": "train"} for i in range(4)]
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fit = LMTasksFitness(LMTasksFitnessConfig(name="lm_tasks", tasks=[
        {"name": "mc", "path": str(root / "mc.jsonl"), "kind": "choice"}]))
    per = LMTasksFitness(LMTasksFitnessConfig(name="lm_tasks", choice_scoring="per_choice", tasks=[
        {"name": "mc", "path": str(root / "mc.jsonl"), "kind": "choice"}]))
    rt = space(family).open_runtime("cpu")
    model = rt.materialize({"method": "layers", "path": PATH})
    with torch.no_grad():
        ll = fit._choice_loglik(model, fit._encoded(rt.tokenizer, 0, "train"))
        ref = per._choice_loglik(model, per._encoded(rt.tokenizer, 0, "train"))
    np.testing.assert_allclose(np.concatenate(ll), np.concatenate(ref), atol=1e-4)


def test_scaled_path_saves_and_loads_with_its_scales(family, tmp_path):
    s = space(family, scales=True)
    n = len(s.slots)
    x = np.concatenate([vector_for(s, PATH), np.full(n, 0.8)])
    rt = s.open_runtime("cpu")
    recipe = s.decode(x)
    model = rt.materialize(recipe)
    with torch.no_grad():
        got = model(IDS).logits
        unscaled = rt.materialize({"method": "layers", "path": PATH})(IDS).logits
    assert (got - unscaled).abs().max() > 1e-3  # the scales change the model
    s.save(x, tmp_path / "m", {})
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["layer_input_scales"] == [1.0, 1.0, 0.8, 1.0, 0.8, 0.8]
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "m").eval()(IDS).logits, got, rtol=0, atol=1e-5)
    with pytest.raises(UserError, match="--mergekit: this path scales the input of a layer"):
        s.mergekit_config(recipe)


def test_bad_fields_are_refused(family):
    with pytest.raises(ValueError, match="repeats"):
        space(family, repeats=0)
    with pytest.raises(ValueError, match="scale_range.low: 0: a scale must be above 0"):
        space(family, scales=True, scale_range={"low": 0, "high": 1})
    root, base, experts = family
    with pytest.raises(ValueError, match="models.experts.base: the label 'base' is taken"):
        HFLayersSpaceConfig(name="hf_layers", models={"base": str(base), "experts": {"base": str(experts["a"])}})
    s = space(family)
    with pytest.raises(UserError, match=r"path\[0\].layer: 7 is outside the 3 layers"):
        s.open_runtime("cpu").materialize({"method": "layers", "path": [{"model": "a", "layer": 7}]})


def run_config(root: Path, base: str, experts: dict, out_name: str, evals: int = 6) -> dict:
    rows = [{"prompt": f"{i}+{i}=", "choices": [str(2 * i), "x", "y"], "answer": 0,
             "split": "train" if i < 6 else "test"} for i in range(9)]
    (root / "mc3.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"seed": 1,
            "space": {"name": "hf_layers", "device": "cpu", "repeats": 2,
                      "models": {"base": base, "experts": experts}},
            "strategy": {"name": "cmaes", "diagonal": True, "popsize": 3, "sigma0": 0.5, "x0": "center"},
            "fitness": {"name": "lm_tasks", "tasks": [{"name": "mc", "path": str(root / "mc3.jsonl"),
                                                       "kind": "choice"}]},
            "engine": {"workers": 1, "batch_size": 3},
            "budget": {"max_evals": evals}}


def test_search_export_and_a_run_as_a_seed_model(family, tmp_path):
    """In process: a search of the space, its best exported as a model directory (same logits) and as
    mergekit passthrough slices (mergekit-yaml's output equal to it); the finished run then a seed model."""
    from transformers import AutoModelForCausalLM

    from evomerge.config import validate
    from evomerge.engine import InProcessPool, search
    from evomerge.export import export
    from evomerge.rundir import RunDir
    from evomerge.spaces.merge_types import resolve_model

    root, base, experts = family
    cfg = validate(run_config(root, str(base), {k: str(v) for k, v in experts.items()}, "dfs"))
    out = tmp_path / "run"
    run = RunDir.claim(out)
    try:
        summary = search(cfg, run, progress=False, pool=InProcessPool)
    finally:
        run.close()
    evals = [json.loads(line) for line in (out / "evals.jsonl").read_text().splitlines()]
    assert len(evals) == 6 and all(e["recipe"]["method"] == "layers" and e["recipe"]["path"] for e in evals)
    assert "mc_test_accuracy" in summary["best"]["holdout"]
    best = json.loads((out / "best" / "recipe.json").read_text())

    msg = export(str(out), None, str(tmp_path / "m"), str(tmp_path / "m.yaml"))
    assert "mergekit config" in msg and "model directory" in msg
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    s = HFLayersSpace(cfg.space, 1)
    with torch.no_grad():
        want = s.open_runtime("cpu").materialize(best)(IDS).logits
        torch.testing.assert_close(exported(IDS).logits, want, rtol=0, atol=1e-5)
    mk = yaml.safe_load((tmp_path / "m.yaml").read_text())
    assert mk["merge_method"] == "passthrough" and len(mk["slices"]) == len(slices_of(best["path"]))
    exe = Path(sys.executable).with_name("mergekit-yaml")
    if not exe.exists():
        pytest.fail(f"mergekit-yaml is not installed beside {sys.executable} (pip install -e .[test])")
    r = subprocess.run([str(exe), str(tmp_path / "m.yaml"), str(tmp_path / "mk"), "--no-cuda", "--quiet",
                        "--no-copy-tokenizer"], capture_output=True, text=True,
                       env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "mk").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, want, rtol=0, atol=1e-5)

    # PS+DFS: the finished run as a seed model is its best/ model
    assert resolve_model(str(out), "base") == out / "best"
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(UserError, match="a run directory with no best/ model yet"):
        resolve_model(str(tmp_path / "unfinished"), "experts.ps")
    deep = tmp_path / "deep_run"  # a run whose best has another depth (6 layers): refused
    stack_layers(base, s.seed_paths, slices_of(PATH), deep / "best")
    (deep / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(UserError, match="models: expert deep has tensor model.layers.3"):
        HFLayersSpace(HFLayersSpaceConfig(name="hf_layers", device="cpu", models={
            "base": str(base), "experts": {"deep": str(deep)}}), 0)
    ps = tmp_path / "ps_run"  # a finished parameter-space run: its best/ is a merge of the family
    shutil.copytree(experts["b"], ps / "best")
    (ps / "config.yaml").write_text("seed: 0\n")
    s2 = HFLayersSpace(HFLayersSpaceConfig(name="hf_layers", device="cpu", models={
        "base": str(base), "experts": {"ps": str(ps), "a": str(experts["a"])}}), 0)
    assert s2.seed_paths["ps"] == ps / "best" and s2.labels == ["base", "ps", "a"]


def test_dry_run_shows_the_path_at_the_centre(cli, family):
    root, base, experts = family
    cfg = run_config(root, str(base), {k: str(v) for k, v in experts.items()}, "dry")
    cfg["space"]["scales"] = True
    (root / "dry.yaml").write_text(yaml.safe_dump(cfg))
    r = cli("--config", str(root / "dry.yaml"), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "dimension: 36" in r.stdout and 'path_at_centre: "base.0 base.1 base.2"' in r.stdout
    assert "slot.0/include/base.0 [-0.5, 1.5]" in r.stdout and "slot.17/scale/b.2 [0.5, 1.5]" in r.stdout


def test_the_memory_plan_counts_every_seed_model_resident(tmp_path, monkeypatch):
    """A worker holds all seed models on its GPU: a 7B Llama and three experts (bf16, 12.6 GiB each) fit an
    80 GiB GPU's budget and are refused on a 24 GiB one, from config.json alone (no weights)."""
    import json

    import evomerge.memplan as memplan
    from evomerge.spaces.hf_layers import HFLayersSpace, HFLayersSpaceConfig

    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
              "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 32, "vocab_size": 32000, "torch_dtype": "bfloat16", "tie_word_embeddings": False}
    for m in ("base", "a", "b", "c"):
        (tmp_path / m).mkdir()
        (tmp_path / m / "config.json").write_text(json.dumps(config))
    cfg = HFLayersSpaceConfig(name="hf_layers", device="cuda", models={
        "base": str(tmp_path / "base"), "experts": {k: str(tmp_path / k) for k in "abc"}})
    monkeypatch.setattr(memplan, "local_gpu_bytes", lambda: 80 << 30)
    big = HFLayersSpace.memory_plan(cfg, 1)
    assert big.fits and len(big.per_model) == 4 and abs(sum(b for _, b in big.per_model) / 2**30 - 50.2) < 0.1
    monkeypatch.setattr(memplan, "local_gpu_bytes", lambda: 24 << 30)
    small = HFLayersSpace.memory_plan(cfg, 1)
    assert not small.fits and small.why.startswith("space.models: the 4 seed models")
