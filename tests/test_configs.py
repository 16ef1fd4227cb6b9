"""Every shipped config runs through the real command (on a freshly built tiny family where it names
the demo zoo; an API config against its server, started on a free port)."""
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """The demo family the tinylm configs name, in its tiny size (built in about 20 s)."""
    from evomerge.demos.tinylm import build_family

    out = tmp_path_factory.mktemp("zoo") / "tinylm"
    build_family(out, size="tiny", skills=["upper", "sort", "count"])
    return out


# API configs and the config whose models their server serves (as each one's header says)
SERVED_BY = {"tinylm_api_cmaes.yaml": "tinylm_ties_cmaes.yaml"}


# configs whose seed model is a finished run of another config (PS+DFS): that config, and the --set key naming it
SEEDED_BY = {"tinylm_ps_dfs.yaml": ("tinylm_ties_cmaes.yaml", "space.models.experts.ps")}


# run in full by tests/test_e2e.py (the default search, through two Ray workers)
RUN_ELSEWHERE = {"quickstart.yaml"}


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")
                                          if p.name not in RUN_ELSEWHERE))
def test_every_shipped_config_runs(cli, tmp_path, config, request):
    from evomerge.serve.harness import LocalServer

    out = tmp_path / "run"
    path = ROOT / "configs" / config
    text = path.read_text()
    n, sets = 120, []
    if "zoo/tinylm" in text:  # point the config at a freshly built tiny family; fewer (slower) evaluations
        zoo = str(request.getfixturevalue("zoo"))
        path = tmp_path / config
        path.write_text(text.replace("zoo/tinylm", zoo))
        n = 12
    fitness = yaml.safe_load(text)["fitness"]["name"]
    if fitness == "lm_eval":  # lm-eval's harness per candidate: slower still
        n = 8
    if fitness == "api":  # serve its models on a free port, as its header says
        assert config in SERVED_BY, f"{config}: say which config's models its server serves"
        served = tmp_path / "served.yaml"
        served.write_text((ROOT / "configs" / SERVED_BY[config]).read_text().replace("zoo/tinylm", zoo))
        server = LocalServer("--config", str(served))
        request.addfinalizer(server.close)
        n, sets = 4, ["--set", f"fitness.base_url={server.url}"]
    if config in SEEDED_BY:  # the run it takes as a seed model first, on the same tiny family
        first, key = SEEDED_BY[config]
        seeded = tmp_path / first
        seeded.write_text((ROOT / "configs" / first).read_text().replace("zoo/tinylm", zoo))
        r = cli("--config", str(seeded), "--set", f"budget.max_evals={n}", "--out", str(tmp_path / "seed_run"),
                "--no-progress")
        assert r.returncode == 0, r.stderr
        sets = ["--set", f"{key}={tmp_path / 'seed_run'}"]
    r = cli("--config", str(path), "--set", f"budget.max_evals={n}", *sets, "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluations"] == n
    # the best model, or for an API-only search (the weights live behind the server) its recipe
    assert (out / "best" / ("recipe.json" if sets else "model.safetensors")).exists()
    assert (out / "config.yaml").exists() and len((out / "evals.jsonl").read_text().splitlines()) == n
