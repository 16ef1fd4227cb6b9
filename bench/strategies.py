"""nevergrad (NGOpt) and CMA-ES against random search at equal evaluation budgets: best-fitness curves.

    python bench/strategies.py [--only digits tinylm] [--seeds 0 1 2]

digits: the quickstart setting (merging the two pretrained digit experts; 19,210 coordinates),
10,000 evaluations. tinylm: configs/tinylm_ties_cmaes.yaml's layer-wise TIES space over the
tiny-LM experts and its fitness (choice tasks since the demo config switched to them; curves quoted
before that were scored by greedy generation) (build them first: python run.py zoo tinylm --out
zoo/tinylm), 240 evaluations.
Each run is `python run.py --config ... --set strategy...`; the curve is the best training fitness
seen after each tenth of the budget, averaged over seeds. Results: bench/results/strategies.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import yaml

from common import ROOT, run_py, write_results

SETTINGS = {
    "digits": ("configs/quickstart.yaml", 10_000, {
        "random": {"name": "random", "sigma": 0.01},
        "cmaes": {"name": "cmaes", "diagonal": True, "popsize": 32, "sigma0": 0.01},
        "ngopt": {"name": "nevergrad", "optimizer": "NGOpt", "sigma": 0.01},
        "m2n2": None,  # the config's own strategy, for reference
    }),
    "tinylm": ("configs/tinylm_ties_cmaes.yaml", 240, {
        "random": {"name": "random"},
        "cmaes": None,  # the config's own (separable CMA-ES, popsize 12)
        "ngopt": {"name": "nevergrad", "optimizer": "NGOpt", "x0": "center"},
    }),
}


def curve(out: Path, budget: int) -> list[float]:
    fits = [json.loads(line).get("fitness") for line in (out / "evals.jsonl").read_text().splitlines()]
    best = np.maximum.accumulate([f if f is not None else -np.inf for f in fits])
    return [float(best[min(len(best), budget * k // 10) - 1]) for k in range(1, 11)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=list(SETTINGS))
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="strategies-bench-"))
    results = {}
    for setting in args.only:
        config, budget, strategies = SETTINGS[setting]
        results[setting] = {}
        for name, strategy in strategies.items():
            curves = []
            for seed in args.seeds:
                cfg = yaml.safe_load((ROOT / config).read_text())
                cfg["seed"] = seed
                cfg["budget"] = {"max_evals": budget}
                if strategy is not None:
                    cfg["strategy"] = strategy
                path = tmp / f"{setting}-{name}-{seed}.yaml"
                path.write_text(yaml.safe_dump(cfg))
                out = tmp / f"{setting}-{name}-{seed}"
                run_py("--config", str(path), "--out", str(out), "--no-progress")
                curves.append(curve(out, budget))
            mean = np.mean(curves, axis=0)
            results[setting][name] = {"curve_mean": [round(float(v), 4) for v in mean],
                                      "final_per_seed": [round(c[-1], 4) for c in curves]}
            print(setting, name, "best after 10%..100% of the budget:", " ".join(f"{v:.3f}" for v in mean), flush=True)
    write_results(ROOT / "bench" / "results" / "strategies.json", results, merge=True)


if __name__ == "__main__":
    main()
