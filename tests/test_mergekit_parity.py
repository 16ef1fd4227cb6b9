"""evomerge's merges reproduce mergekit 0.1.5's `mergekit-yaml` output, for every method mergekit registers.

mergekit is in the dev extra. The executable is `mergekit-yaml` beside this Python (the venv's, also when PATH
lacks the venv's bin, as under `make test`), else $EVOMERGE_MERGEKIT_YAML, else PATH. Without one every test
here FAILS (install the dev extra: pip install -e '.[dev]'), unless EVOMERGE_ALLOW_NO_MERGEKIT=1 (then they skip).

End to end: for each case an hf_merge space over a tiny random Llama family (float32; 3 experts, or what the
method takes: slerp, nearswap and arcee_fusion 1, nuslerp 2) decodes a random point, its runtime materializes
the recipe in place, and `space.mergekit_config(recipe)` (per-group values as per-tensor conditional
parameters) is run by mergekit-yaml, all cases in one mergekit process. Deterministic methods: every tensor
within 1e-6 (max abs difference).

Random masks (dare_ties, dare_linear, della, della_linear) cannot be the same masks: mergekit draws them with
torch.bernoulli from torch's global generator (seeded by --random-seed), evomerge from a hash of (recipe seed,
tensor, expert, element), so that a recipe gives the same model on any device and in slices. They are checked
statistically, for evomerge and for mergekit alike:
- one expert (its mask and rescaling can be read off the merge: merged - base = c x mask x s x delta):
  the number of kept entries against its expectation (keep probability `density` for DARE; for DELLA's
  MagPrune `density - epsilon + 2 epsilon x rank`, rank normalized within each row) and, so that the rank
  dependence is tested, the sum of kept x (rank - 1/2) against its expectation, each within 5 standard
  deviations (a MagPrune that ignored epsilon is ~6 off on the tiny family); the rescale factor s constant
  over each tensor's kept entries (to float32 rounding); for DELLA s = L1(delta) /
  L1(kept delta) exactly (both rescale to the L1 norm; s = 1 with rescale false); for DARE evomerge's
  s = 1/density exactly while mergekit 0.1.5 rescales to the L1 norm (the same in expectation): its s lies
  within 6 standard deviations of 1/density, the relative standard deviation of an L1 norm over a
  Bernoulli(density) subset of n entries being sqrt((1 - density) / (n density)) x sqrt(1 + cv^2), with cv ~ 0.76
  the coefficient of variation of |delta| for Gaussian deltas (tensors of 512+ entries);
- three experts: the share of entries the merge changes (kept by some expert and, with sign election, agreeing)
  is a draw of the same distribution for both: the two shares within 6 standard deviations of a difference of
  binomial shares.
"""
import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))  # the bench script imports its sibling bench/common.py
_spec = importlib.util.spec_from_file_location("merge_parity", ROOT / "bench" / "merge_parity.py")
merge_parity = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("merge_parity", merge_parity)
_spec.loader.exec_module(merge_parity)

MERGEKIT = merge_parity.find_mergekit()
NO_MERGEKIT = "no mergekit-yaml found: install the dev extra: pip install -e '.[dev]'"
if MERGEKIT is None and os.environ.get("EVOMERGE_ALLOW_NO_MERGEKIT") == "1":
    pytestmark = pytest.mark.skip(reason=NO_MERGEKIT + " (skipped: EVOMERGE_ALLOW_NO_MERGEKIT=1)")

OPERATORS = ["linear", "task_arithmetic", "ties", "ties_unnormalized", "slerp"]
EXACT = [case for case, *_ in merge_parity.HF_CASES]
RANDOM = [case for case, *_ in merge_parity.HF_RANDOM_CASES]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Every case's tensors, ours and mergekit's: what evomerge computes, then one mergekit run for all.

    {case: (ours, theirs, extra)}: the reference operators (merge_tensor) on random Llama checkpoints, every
    hf_merge case (materialized by the space's runtime, exported by its mergekit_config), a passthrough layer
    stack, an hf_mixture recipe and, where the hf_layers space exists, an unscaled layer path."""
    if MERGEKIT is None:
        pytest.fail(NO_MERGEKIT, pytrace=False)
    import numpy as np
    from safetensors.torch import load_file

    from evomerge.passthrough import mergekit_passthrough, stack_layers
    from evomerge.spaces.hf_mixture import HFMixtureSpace, HFMixtureSpaceConfig

    sys.path.insert(0, str(ROOT / "tests"))
    from hf_models import tiny_family

    root = tmp_path_factory.mktemp("mergekit_parity")
    ours, extra, jobs, failed = {}, {}, [], {}

    paths = merge_parity.build_models(root / "models", hidden=64, layers=2, intermediate=128, vocab=256)
    base = merge_parity.load_state(paths["base"])
    experts = [merge_parity.load_state(p) for p in paths["experts"]]
    deltas = [{k: e[k] - base[k] for k in base} for e in experts]
    for method in OPERATORS:
        ours[method] = merge_parity.evomerge_merge(method, base, experts,
                                                   {k: torch.empty_like(v) for k, v in base.items()}, deltas=deltas)
        jobs.append((method, merge_parity.mergekit_config(method, paths)))

    fam_base, fam = tiny_family(root / "family")
    fam_state = {label: merge_parity.load_state(p) for label, p in [("base", fam_base), *fam.items()]}
    for i, (case, method, n, options, normalize) in enumerate(merge_parity.HF_CASES + merge_parity.HF_RANDOM_CASES):
        try:
            space = merge_parity.hf_space(method, fam_base, dict(list(fam.items())[:n]), root / f"tv_{case}",
                                          options=options, normalize=normalize)
            recipe = merge_parity.hf_recipe(space, 3 + i)
            ours[case] = merge_parity.materialized(space, recipe)
            config = space.mergekit_config(recipe)
        except Exception as e:  # that case's test fails with it; the others still run
            failed[case] = f"{case}: {type(e).__name__}: {e}"
            continue
        extra[case] = {"recipe": recipe, "groups": {t: recipe["groups"][g] for t, g in space.tensor_group.items()},
                       "base": fam_state["base"], "experts": [fam_state[lbl] for lbl in space.labels]}
        jobs.append((case, config))

    one_base, one = tiny_family(root / "one", experts=("a",))
    models = {"base": one_base, "a": one["a"]}
    slices = [{"model": "base", "layers": [0, 2]}, {"model": "a", "layers": [1, 3]}]
    stack_layers(one_base, models, slices, root / "passthrough_ours")
    ours["passthrough"] = load_file(str(root / "passthrough_ours" / "model.safetensors"))
    jobs.append(("passthrough", mergekit_passthrough(models, slices)))

    spec = {"base": str(fam_base), "experts": {k: str(v) for k, v in fam.items()}}
    space = HFMixtureSpace(HFMixtureSpaceConfig(name="hf_mixture", include_base=True, cache_dir=str(root / "mix"),
                                                models=spec), seed=0)
    recipe = space.decode(np.random.default_rng(3).normal(0.3, 0.5, space.dim))
    ours["mixture"] = merge_parity.materialized(space, recipe)
    jobs.append(("mixture", space.mergekit_config(recipe)))

    try:
        layers = hf_layers_case(root, fam_base, fam)
    except Exception as e:
        failed["hf_layers"] = f"hf_layers: {type(e).__name__}: {e}"
        layers = None
    if layers is not None:
        ours["hf_layers"], config = layers
        jobs.append(("hf_layers", config))

    merge_parity.run_mergekit_many(MERGEKIT, [(config, root / f"mk_{case}") for case, config in jobs])
    out = {case: (ours[case], merge_parity.load_state(root / f"mk_{case}"), extra.get(case)) for case, _ in jobs}
    return {**out, **{case: why for case, why in failed.items()}}


def case_of(cases: dict, case: str):
    """(ours, theirs, extra) of a case; fails with the reason where evomerge could not build it."""
    if isinstance(cases[case], str):
        pytest.fail(cases[case], pytrace=False)
    return cases[case]


def hf_layers_case(root: Path, base: Path, experts: dict):
    """(the tensors of an unscaled layer path of the hf_layers space, its mergekit passthrough config), or None
    while that space does not exist."""
    try:
        from evomerge.spaces import hf_layers
    except ImportError:
        return None
    import inspect

    import numpy as np

    names = [n for n, c in vars(hf_layers).items() if inspect.isclass(c) and c.__module__ == hf_layers.__name__]
    space_cls = next((vars(hf_layers)[n] for n in names if n.endswith("Space") and not n.endswith("Config")), None)
    cfg_cls = next((vars(hf_layers)[n] for n in names if n.endswith("SpaceConfig")), None)
    if space_cls is None or cfg_cls is None:
        return None
    cfg = cfg_cls(name="hf_layers", models={"base": str(base), "experts": {k: str(v) for k, v in experts.items()}})
    space = space_cls(cfg, seed=0)
    rng = np.random.default_rng(5)
    for _ in range(50):  # a path the export can write as passthrough slices (no scales)
        recipe = space.decode(rng.uniform(space.lower, space.upper))
        try:
            config = space.mergekit_config(recipe)
        except Exception:
            continue
        model = space.open_runtime("cpu").materialize(recipe)  # state_dict: a repeated layer's tensors too
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, config
    return None


def max_diff(ours: dict, theirs: dict) -> float:
    assert set(theirs) == set(ours), set(theirs) ^ set(ours)
    worst = 0.0
    for name, t in theirs.items():
        assert t.shape == ours[name].shape and t.dtype == ours[name].dtype == torch.float32, name
        worst = max(worst, float((t - ours[name]).abs().max()))
    return worst


@pytest.mark.parametrize("method", OPERATORS)
def test_operator_matches_mergekit(cases, method):
    """The reference operators (merge.merge_tensor) on random checkpoints equal mergekit's merge."""
    ours, theirs, _ = cases[method]
    worst = max_diff(ours, theirs)
    assert worst <= 1e-6, f"{method}: max abs diff {worst:.3e} vs mergekit"


@pytest.mark.parametrize("case", EXACT)
def test_hf_merge_matches_mergekit(cases, case):
    """A random recipe of the hf_merge space, materialized in place, equals mergekit-yaml's merge of its export."""
    ours, theirs, _ = case_of(cases, case)
    worst = max_diff(ours, theirs)
    assert worst <= 1e-6, f"{case}: max abs diff {worst:.3e} vs mergekit"


def rank_norm(delta: torch.Tensor) -> torch.Tensor:
    """Each entry's magnitude rank within its row, in [0, 1] (DELLA's MagPrune ranks within rows)."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).float()
    return (ranks / max(rows.shape[1] - 1, 1)).reshape(delta.shape)


def keep_probabilities(method: str, delta: torch.Tensor, density: float, epsilon: float | None) -> torch.Tensor:
    """Each entry's keep probability: density (DARE), or DELLA's MagPrune by magnitude rank within rows."""
    if method.startswith("dare") or density >= 1:
        return torch.full_like(delta, min(density, 1.0))
    return (density - epsilon) + rank_norm(delta) * 2 * epsilon


def check_one_expert(case: str, method: str, merged: dict, info: dict, rescale: bool, who: str) -> None:
    base, delta_of = info["base"], info["experts"][0]
    # statistics: (value, expectation, variance); "rank score": the sum of kept x (rank - 1/2), sensitive to how
    # the keep probabilities depend on the magnitude rank
    kept = {"kept entries": [0.0, 0.0, 0.0], "rank score": [0.0, 0.0, 0.0]}
    normalized = method == "della"  # della normalizes by default: the one expert's weight divides out
    for name, b in base.items():
        group = info["groups"][name]
        delta = (delta_of[name] - b).float()
        w, d = group["weight"][0], group["density"][0]
        eps = group["epsilon"][0] if "epsilon" in group else None
        diff = (merged[name].float() - b.float())
        mask = diff != 0
        p = keep_probabilities(method, delta, d, eps).double()
        c = rank_norm(delta).double() - 0.5
        for part, weight in (("kept entries", torch.ones_like(c)), ("rank score", c)):
            kept[part][0] += float((mask.double() * weight).sum())
            kept[part][1] += float((p * weight).sum())
            kept[part][2] += float((p * (1 - p) * weight * weight).sum())
        if not mask.any():
            continue
        c = 1.0 if normalized else w
        x, y = c * delta[mask], diff[mask]
        s = float((x * y).sum() / (x * x).sum())  # the rescale factor: diff = s x c x delta on kept entries
        # float32 rounding of (base + change) - base: a few ulps of the merged value per entry
        room = 4 * torch.finfo(torch.float32).eps * (b.float()[mask].abs() + merged[name].float()[mask].abs())
        assert bool(((y - s * x).abs() <= room + 1e-4 * (s * x).abs()).all()), \
            f"{who} {case} {name}: the rescale factor varies over the tensor"
        l1 = float(delta.abs().sum() / delta[mask].abs().sum())
        if d >= 1 or not rescale:
            expect = 1.0
        elif method.startswith("della") or who == "mergekit":
            expect = l1  # the L1 norm rescale, exactly given the mask
        else:
            expect = 1 / d  # evomerge's DARE: 1 / density
        tol = float((room * x.abs()).sum() / (x * x).sum()) + 1e-5 * expect  # s's rounding, from the entries'
        assert abs(s - expect) <= tol, f"{who} {case} {name}: s {s:.6g}, expected {expect:.6g} +- {tol:.2g}"
        if method.startswith("dare") and rescale and d < 1 and delta.numel() >= 512:
            sd = math.sqrt((1 - d) / (delta.numel() * d)) * math.sqrt(1 + 0.76 ** 2)
            assert abs(s * d - 1) <= 6 * sd, f"{who} {case} {name}: s {s:.5g} vs 1/density {1 / d:.5g}"
    for part, (value, expected, var) in kept.items():
        assert abs(value - expected) <= 5 * math.sqrt(var) + 1, \
            f"{who} {case}: {part} {value:.0f}, expected {expected:.0f} +- {math.sqrt(var):.0f}"


@pytest.mark.parametrize("case", RANDOM)
def test_random_masks_match_mergekit_in_distribution(cases, case):
    """DARE / DELLA: the kept shares and the rescaling of evomerge and mergekit, statistically (module doc)."""
    ours, theirs, info = case_of(cases, case)
    assert set(theirs) == set(ours)
    for name, t in theirs.items():
        assert t.shape == ours[name].shape and t.dtype == ours[name].dtype == torch.float32, name
    method = info["recipe"]["method"]
    rescale = info["recipe"].get("options", {}).get("rescale", True)
    if case.endswith("_1expert"):
        check_one_expert(case, method, ours, info, rescale, "evomerge")
        check_one_expert(case, method, theirs, info, rescale, "mergekit")
        return
    base = info["base"]
    n = sum(b.numel() for b in base.values())
    share = {who: sum(int((m[k] != base[k]).sum()) for k in base) / n for who, m in (("ours", ours), ("mk", theirs))}
    p = (share["ours"] + share["mk"]) / 2
    sd = math.sqrt(2 * p * (1 - p) / n)
    assert abs(share["ours"] - share["mk"]) <= 6 * sd + 1e-9, f"{case}: changed share {share} (sd {sd:.2e})"


def test_passthrough_matches_mergekit(cases):
    """A layer stack (frankenmerge) equals mergekit's passthrough, bit for bit."""
    ours, theirs, _ = cases["passthrough"]
    assert set(ours) == set(theirs)
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) == 0.0


if importlib.util.find_spec("evomerge.spaces.hf_layers") is not None:  # the hf_layers space, once it exists
    def test_hf_layers_unscaled_path_matches_mergekit(cases):
        """An hf_layers path without scales, exported as passthrough slices, is mergekit's model."""
        assert "hf_layers" in cases, "no hf_layers recipe exported as mergekit passthrough"
        ours, theirs, _ = case_of(cases, "hf_layers")
        assert set(theirs) <= set(ours)
        assert max((ours[k] - theirs[k]).abs().max().item() for k in theirs) <= 1e-6


def test_exported_mixture_yaml_reproduces_the_mixture(cases):
    """An hf_mixture recipe (one coefficient per tensor and seed) is mergekit's linear, unnormalized."""
    ours, theirs, _ = cases["mixture"]
    assert set(theirs) <= set(ours)
    assert max((ours[k] - theirs[k]).abs().max().item() for k in theirs) <= 1e-6
