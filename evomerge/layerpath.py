"""Layer paths (data-flow merging, Akiba et al. 2024): a model that runs a sequence of transformer layers
drawn from seed models, built over the seeds' resident modules without copying a weight.

A path is a list of steps `{"model": label, "layer": i}` (optionally `"scale": s`, a factor on the
hidden state entering that layer). The path model is a shallow structural copy of a seed model whose
decoder layer list holds the seeds' own layer modules: each step gets a shallow copy of its layer (and of
the submodules that carry `layer_idx`, the attention's KV-cache index) renumbered to its position, sharing
every Parameter; a scaled step wraps its layer in `ScaledInput`. As in mergekit's passthrough (and
`passthrough.stack_layers`), the embeddings come from the first step's model and the final norm and head
from the last step's (a model with tied embeddings: the first's, as its checkpoint holds one matrix).
torch and transformers are imported when a runtime is made, not with this module.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from .errors import UserError
from .runtime import ResidentModel

SCALES_KEY = "layer_input_scales"  # config.json of a saved scaled path: one factor per layer (1: none)


def slots(labels: list[str], layers: int, repeats: int) -> list[tuple[str, int]]:
    """The paper's slot layout: the layers of every seed model in order, the whole sequence `repeats` times;
    slot t is layer t mod L of model (t // L) mod M."""
    return [(labels[(t // layers) % len(labels)], t % layers) for t in range(repeats * len(labels) * layers)]


def slices_of(path: list[dict]) -> list[dict]:
    """Consecutive layers of one model as passthrough slices: [{"model", "layers": [start, end)}]."""
    out: list[dict] = []
    for step in path:
        last = out[-1] if out else None
        if last is not None and last["model"] == step["model"] and last["layers"][1] == step["layer"]:
            last["layers"][1] += 1
        else:
            out.append({"model": step["model"], "layers": [step["layer"], step["layer"] + 1]})
    return out


def scaled(path: list[dict]) -> bool:
    return any(step.get("scale", 1.0) != 1.0 for step in path)


def layer_list(model):
    """(the inner model, the name of its decoder layer list): the ModuleList child of `model.base_model`
    with config.num_hidden_layers entries."""
    import torch

    inner = model.base_model
    n = model.config.num_hidden_layers
    for name, child in inner.named_children():
        if isinstance(child, torch.nn.ModuleList) and len(child) == n:
            return inner, name
    raise UserError(f"{type(model).__name__}: no decoder layer list of {n} layers found")


def _positioned(module, idx: int):
    """A shallow copy of `module` whose `layer_idx` (and its submodules') is `idx`; Parameters shared."""
    new = copy.copy(module)
    new.__dict__["_modules"] = dict(module._modules)
    if hasattr(module, "layer_idx"):
        new.__dict__["layer_idx"] = idx
    for name, child in module._modules.items():
        if child is not None and any(hasattr(m, "layer_idx") for m in child.modules()):
            new._modules[name] = _positioned(child, idx)
    return new


def _scaled_input_class():
    import torch

    class ScaledInput(torch.nn.Module):
        """A decoder layer whose input hidden state is multiplied by `scale` (a jump between models)."""

        def __init__(self, layer, scale: float):
            super().__init__()
            self.layer = layer
            self.scale = scale

        def forward(self, hidden_states, *args, **kwargs):
            return self.layer(hidden_states * self.scale, *args, **kwargs)

        def __getattr__(self, name):  # the layer's own attributes (e.g. attention_type) read through
            try:
                return super().__getattr__(name)
            except AttributeError:
                modules = self.__dict__.get("_modules", {})
                if "layer" not in modules:
                    raise
                return getattr(modules["layer"], name)

    return ScaledInput


class PathBuilder:
    """Path models over resident seed models {label: transformers model} (same architecture)."""

    def __init__(self, models: dict):
        self.models = models
        first = next(iter(models.values()))
        self.depth = first.config.num_hidden_layers
        self.layers = {}
        for label, m in models.items():
            inner, name = layer_list(m)
            self.layers[label] = getattr(inner, name)
        self.layers_name = name
        self.prefix = first.base_model_prefix
        self.tied = bool(getattr(first.config, "tie_word_embeddings", False))
        self._cache: dict = {}
        self._scaled = _scaled_input_class()
        # the shell: new Module objects down to the layer list, everything else the seeds' own
        self.shell = copy.copy(first)
        self.shell.__dict__["_modules"] = dict(first._modules)
        self.inner = copy.copy(first.base_model)
        self.inner.__dict__["_modules"] = dict(first.base_model._modules)
        self.shell._modules[self.prefix] = self.inner
        self.shell.__dict__["config"] = copy.deepcopy(first.config)
        self.inner.__dict__["config"] = self.shell.config
        self.layer_types = getattr(first.config, "layer_types", None)

    def check(self, path: list[dict]) -> None:
        if not path:
            raise UserError("path: empty (a layer path needs at least one layer)")
        for k, step in enumerate(path):
            if step["model"] not in self.models:
                raise UserError(f"path[{k}].model: {step['model']!r} is not one of {sorted(self.models)}")
            if not 0 <= step["layer"] < self.depth:
                raise UserError(f"path[{k}].layer: {step['layer']} is outside the {self.depth} layers")

    def _step(self, step: dict, pos: int):
        scale = float(step.get("scale", 1.0))
        key = (step["model"], step["layer"], pos, scale)
        if key not in self._cache:
            layer = _positioned(self.layers[step["model"]][step["layer"]], pos)
            self._cache[key] = layer if scale == 1.0 else self._scaled(layer, scale)
        return self._cache[key]

    def build(self, path: list[dict]):
        """The path's model (the shell, re-pointed: one path at a time)."""
        import torch

        self.check(path)
        first, last = self.models[path[0]["model"]], self.models[path[-1]["model"]]
        for name in list(self.inner._modules):
            if name == self.layers_name:
                continue
            src = first if _is_embedding(first.base_model._modules[name]) else last
            self.inner._modules[name] = src.base_model._modules[name]
        for name in list(self.shell._modules):
            if name != self.prefix:
                self.shell._modules[name] = (first if self.tied else last)._modules[name]
        self.inner._modules[self.layers_name] = torch.nn.ModuleList([self._step(s, i) for i, s in enumerate(path)])
        self.shell.config.num_hidden_layers = len(path)
        if isinstance(self.layer_types, list):
            self.shell.config.layer_types = [self.layer_types[s["layer"]] for s in path]
        return self.shell


def _is_embedding(module) -> bool:
    import torch

    return isinstance(module, torch.nn.Embedding) or any(isinstance(m, torch.nn.Embedding) for m in module.modules())


class PathRuntime(ResidentModel):
    """A worker's seed models, each loaded once onto `device`; `materialize(recipe)` builds the recipe's
    path model over them (no weight copied). `paths`: label -> model directory, the first one's config and
    tokenizer are the path model's."""

    def __init__(self, paths: dict[str, Path], dtype: str, device: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from .weights import torch_dtype

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.paths = dict(paths)
        self.seed_models = {
            label: AutoModelForCausalLM.from_pretrained(
                p, dtype="auto" if dtype == "auto" else torch_dtype(dtype)).to(self.device).eval()
            for label, p in paths.items()}
        self.tokenizer = AutoTokenizer.from_pretrained(next(iter(paths.values())))
        self.builder = PathBuilder(self.seed_models)
        self.targets = {}
        self.recipe: dict | None = None
        self.model = None

    def materialize(self, recipe: dict):
        self.recipe = recipe
        self.model = self.builder.build(recipe["path"])
        return self.model

    def save(self, directory: Path) -> None:
        save_path(self.paths, self.recipe["path"], Path(directory))


def save_path(paths: dict[str, Path], path: list[dict], out: Path) -> int:
    """The path as a from_pretrained directory: its layers copied (passthrough.stack_layers over the seed
    checkpoints); a scaled path's factors in config.json (`layer_input_scales`), which `load` applies and
    a plain from_pretrained ignores. Returns the number of layers."""
    from .passthrough import stack_layers

    first = next(iter(paths.values()))
    n = stack_layers(first, paths, slices_of(path), out)
    config = json.loads((out / "config.json").read_text())
    types = config.get("layer_types")
    if isinstance(types, list):  # each layer's own kind
        src = json.loads((Path(paths[path[0]["model"]]) / "config.json").read_text()).get("layer_types")
        if isinstance(src, list):
            config["layer_types"] = [src[s["layer"]] for s in path]
    if scaled(path):
        config[SCALES_KEY] = [float(s.get("scale", 1.0)) for s in path]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return n


def load(directory: Path, **kwargs):
    """A saved path model with its input scales applied (from_pretrained alone ignores them)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    factors = getattr(model.config, SCALES_KEY, None)
    if factors:
        inner, name = layer_list(model)
        wrap = _scaled_input_class()
        layers = getattr(inner, name)
        for i, s in enumerate(factors):
            if s != 1.0:
                layers[i] = wrap(layers[i], float(s))
    return model
