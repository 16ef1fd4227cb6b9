"""The memory plan of a merging worker (evomerge.memplan): tensors from headers or configs, the byte counts,
the tier placement, and the CLI's refusal of a plan that does not fit. Headers and configs only: no models
are loaded, no Ray, no GPU."""
import json
import struct
import sys

import pytest
import yaml

from evomerge import memplan
from evomerge.errors import UserError
from evomerge.headers import model_tensors
from evomerge.memplan import GIB, MIB, MemoryConfig, make_plan
from evomerge.spaces.hf_merge import HFMergeSpace

# a tiny Llama: hidden 8, intermediate 16, 2 layers, 2 heads of 4, 1 kv head, vocab 10
TINY = dict(architectures=["LlamaForCausalLM"], hidden_size=8, intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, vocab_size=10, tie_word_embeddings=False,
            torch_dtype="bfloat16")
# per layer: q 8x8 + k 4x8 + v 4x8 + o 8x8 + gate/up 16x8 each + down 8x16 + two norms of 8 = 592
TINY_PARAMS = 2 * 592 + 10 * 8 + 8 + 10 * 8  # layers, embed, norm, lm_head = 1352


def config_dir(root, name="m", **over):
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({**TINY, **over}))
    return d


def numel(tensors):
    total = 0
    for shape, _ in tensors.values():
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


@pytest.fixture(autouse=True)
def _no_gpu_questions(monkeypatch):
    """The plans here never ask this machine about a GPU (device auto is told there is none)."""
    monkeypatch.setattr(memplan, "local_cuda", lambda: False)

    def _refuse(*a, **k):
        raise AssertionError("measured a GPU")

    monkeypatch.setattr(memplan, "measure_h2d_gbps", _refuse)


# tensors -------------------------------------------------------------------------------------

def test_config_only_llama_tensors(tmp_path):
    t = model_tensors(config_dir(tmp_path))
    assert numel(t) == TINY_PARAMS
    assert list(t)[:2] == ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"]
    assert t["model.layers.1.self_attn.k_proj.weight"] == ((4, 8), "BF16")  # 1 kv head of 4
    assert t["model.layers.1.mlp.down_proj.weight"] == ((8, 16), "BF16")
    assert t["model.layers.0.post_attention_layernorm.weight"] == ((8,), "BF16")
    assert t["lm_head.weight"] == ((10, 8), "BF16") and t["model.norm.weight"] == ((8,), "BF16")
    assert not any("inv_freq" in n or n.endswith(".bias") for n in t)
    assert len(t) == 3 + 2 * 9


def test_config_only_tied_qwen2_mistral_head_dim_and_default_dtype(tmp_path):
    tied = model_tensors(config_dir(tmp_path, "tied", tie_word_embeddings=True))
    assert "lm_head.weight" not in tied and numel(tied) == TINY_PARAMS - 80
    qwen = model_tensors(config_dir(tmp_path, "qwen", architectures=["Qwen2ForCausalLM"]))
    assert qwen["model.layers.0.self_attn.q_proj.bias"] == ((8,), "BF16")
    assert qwen["model.layers.1.self_attn.v_proj.bias"] == ((4,), "BF16")
    assert "model.layers.0.self_attn.o_proj.bias" not in qwen
    assert numel(qwen) == TINY_PARAMS + 2 * (8 + 4 + 4)
    mistral = model_tensors(config_dir(tmp_path, "mistral", architectures=["MistralForCausalLM"], head_dim=16,
                                       torch_dtype=None))
    assert mistral["model.layers.0.self_attn.q_proj.weight"] == ((32, 8), "F32")  # 2 heads of 16, float32
    assert mistral["model.layers.0.self_attn.o_proj.weight"] == ((8, 32), "F32")
    nokv = model_tensors(config_dir(tmp_path, "nokv", num_key_value_heads=None, torch_dtype=None,
                                    dtype="float16"))
    assert nokv["model.layers.0.self_attn.k_proj.weight"] == ((8, 8), "F16")  # kv heads default to heads


def test_config_only_other_architectures_are_refused_naming_the_file(tmp_path):
    d = config_dir(tmp_path, architectures=["GPT2LMHeadModel"])
    with pytest.raises(UserError) as e:
        model_tensors(d)
    msg = str(e.value)
    assert str(d / "config.json") in msg and "GPT2LMHeadModel" in msg and "Qwen2ForCausalLM" in msg
    assert "\n" not in msg
    (d / "config.json").write_text(json.dumps({k: v for k, v in TINY.items() if k != "hidden_size"}))
    with pytest.raises(UserError, match="config.json: no hidden_size"):
        model_tensors(d)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: no model.safetensors, model.safetensors.index.json or config.json"):
        model_tensors(tmp_path / "empty")


def test_header_reading_from_a_real_file_reads_no_data(tmp_path):
    import torch
    from safetensors.torch import save_file

    d = tmp_path / "real"
    d.mkdir()
    file = d / "model.safetensors"
    save_file({"w": torch.zeros(3, 5, dtype=torch.bfloat16), "b": torch.zeros(7), "pos": torch.arange(4),
               "h": torch.zeros(2, 2, dtype=torch.float16)}, str(file))
    want = {"w": ((3, 5), "BF16"), "b": ((7,), "F32"), "pos": ((4,), "I64"), "h": ((2, 2), "F16")}
    assert model_tensors(d) == want
    # the data is never read: a file cut right after its header reads the same
    n = struct.unpack("<Q", file.read_bytes()[:8])[0]
    file.write_bytes(file.read_bytes()[:8 + n])
    assert model_tensors(d) == want
    # shards of an index, in the index's order
    sh = tmp_path / "sharded"
    sh.mkdir()
    save_file({"x": torch.zeros(2)}, str(sh / "a.safetensors"))
    save_file({"y": torch.zeros(3, dtype=torch.bfloat16)}, str(sh / "b.safetensors"))
    (sh / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"y": "b.safetensors", "x": "a.safetensors"}}))
    assert model_tensors(sh) == {"y": ((3,), "BF16"), "x": ((2,), "F32")}


def test_bad_headers_name_the_file(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    f = d / "model.safetensors"
    for data in (b"abc", struct.pack("<Q", 10 ** 9) + b"{}", struct.pack("<Q", 5) + b"nope!",
                 struct.pack("<Q", 2) + b"[]"):
        f.write_bytes(data)
        with pytest.raises(UserError, match=str(f)) as e:
            model_tensors(d)
        assert "\n" not in str(e.value)
    f.unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    with pytest.raises(UserError, match="gone.safetensors listed in the index does not exist"):
        model_tensors(d)


# byte counts -----------------------------------------------------------------------------------

def plan(tensors, method="ties", labels=("a", "b", "c"), resident="bfloat16", delta="auto", device="cpu",
         **kw):
    memory = kw.pop("memory", MemoryConfig())
    return make_plan(tensors, method=method, labels=labels, resident_dtype=resident, delta_dtype=delta,
                     device=device, memory=memory, host_bytes=kw.pop("host_bytes", 64 * GIB), **kw)


def test_resident_and_inputs_bytes_per_method(tmp_path):
    t = model_tensors(config_dir(tmp_path))  # bf16, 1352 parameters
    bf = 2 * TINY_PARAMS
    p = plan(t)
    assert (p.resident, p.params, p.inputs_per_tensor, p.inputs_bytes) == (bf, TINY_PARAMS, 4, 4 * bf)
    assert plan(t, resident="float32").resident == 2 * bf
    assert plan(t, resident="auto").resident == bf  # the checkpoint's dtype
    assert plan(t, delta="float32").inputs_bytes == bf + 3 * 2 * bf  # base bf16 + float32 deltas
    lin = plan(t, method="linear")
    assert lin.inputs_bytes == 3 * bf and lin.inputs_per_tensor == 3
    assert not any(k[0] in ("base", "delta") for k in lin.tiers)
    assert lin.tier("expert", "b", "lm_head.weight") == "device"
    sl = plan(t, method="slerp", labels=("a",))
    assert sl.inputs_bytes == 2 * bf and {k[:2] for k in sl.tiers} == {("base", "base"), ("expert", "a")}
    # unlimited CPU: everything read in place, nothing streams
    assert p.budget is None and p.fits and p.staging == 0 and p.streamed_bytes == 0
    assert set(p.tiers.values()) == {"device"} and len(p.tiers) == 4 * len(t)
    assert p.tier("delta", "c", "model.layers.1.mlp.up_proj.weight") == "device"
    with pytest.raises(KeyError):
        p.tier("delta", "z", "model.norm.weight")


def test_integer_tensors_are_not_merge_inputs():
    t = {"w": ((4,), "F32"), "pos": ((8,), "I64")}
    p = plan(t, resident="bfloat16")
    assert p.resident == 4 * 2 + 8 * 8  # integer buffers keep their dtype in the resident model
    assert p.inputs_bytes == 4 * 4 * 4 and p.tensors == 1
    assert not any(k[2] == "pos" for k in p.tiers)


# placement -------------------------------------------------------------------------------------

FOUR = {n: ((256,), "F32") for n in "abcd"}  # 1 KiB each; task_arithmetic with one expert: 2 KiB per tensor


def placed(budget, host, **kw):
    memory = MemoryConfig(budget_gib=budget / GIB, host_gib=host / GIB, slice_mib=1, h2d_gbps=10.0)
    return plan(FOUR, method="task_arithmetic", labels=("e",), resident="float32", memory=memory, **kw)


def tiers_of(p):
    return {n: {p.tier(k, lbl, n) for k, lbl in (("base", "base"), ("delta", "e"))} for n in FOUR}


def test_all_inputs_on_the_device_when_they_fit():
    p = placed(4096 + 8192, 0)
    assert p.fits and p.staging == 0 and p.streamed_bytes == 0
    assert p.bytes_per_tier == {"device": 8192, "host": 0, "disk": 0}


def test_partial_device_then_host_then_disk():
    # resident 4096, staging 2 x 2 inputs x min(1 MiB, 1024) = 4096, room for one tensor (2048)
    p = placed(4096 + 4096 + 2048, 4096)
    assert p.fits and p.resident == 4096 and p.staging == 4096
    assert tiers_of(p) == {"a": {"device"}, "b": {"host"}, "c": {"host"}, "d": {"disk"}}
    assert p.bytes_per_tier == {"device": 2048, "host": 4096, "disk": 2048}
    assert p.streamed_bytes == 6144 and p.streamed_tensors == 3
    assert p.transfer_s == pytest.approx(6144 / 10e9) and p.h2d_source == "memory.h2d_gbps"
    assert tiers_of(placed(4096 + 4096 + 2048, 1 * GIB))["d"] == {"host"}  # room on the host
    full = placed(4096 + 4096 + 2048, 0)  # host full -> disk
    assert [tiers_of(full)[n] for n in "abcd"] == [{"device"}, {"disk"}, {"disk"}, {"disk"}]
    assert any("disk tier" in n for n in full.notes)


def test_whole_tensors_first_fit_in_checkpoint_order():
    t = {"big0": ((1024,), "F32"), "small": ((128,), "F32"), "rest": ((128,), "F32"),
         **{f"big{i}": ((1024,), "F32") for i in (1, 2, 3)}}  # inputs 4 KiB or 512 B, two per tensor
    resident, staging = 4 * 4096 + 2 * 512, 2 * 2 * 4096
    memory = MemoryConfig(budget_gib=(resident + staging + 1024) / GIB, host_gib=1, slice_mib=1)
    p = plan(t, method="task_arithmetic", labels=("e",), resident="float32", memory=memory)
    assert p.fits and (p.resident, p.staging) == (resident, staging)
    assert p.tier("base", "base", "big0") == "host"  # 8 KiB does not fit in the 1 KiB left ...
    assert p.tier("delta", "e", "small") == "device"  # ... the next tensor does, whole
    assert p.tier("base", "base", "rest") == "host"  # no room left for a second
    assert {p.tier("delta", "e", f"big{i}") for i in (1, 2, 3)} == {"host"}


def test_staging_is_capped_by_the_slice():
    t = {"w": ((4 * MIB,), "BF16")}  # 8 MiB per input
    memory = MemoryConfig(budget_gib=0.02, slice_mib=2)  # 20.5 MiB: resident 8, staging 12, the rest 0.5
    p = plan(t, method="ties", labels=("a", "b"), memory=memory)
    assert p.staging == 2 * 3 * 2 * MIB and p.tier("base", "base", "w") in ("host", "disk")


def test_resident_model_too_big_is_refused_with_the_sizes():
    t = {"w": ((3 * GIB // 4,), "F32")}  # 3 GiB in float32
    p = plan(t, resident="float32", device="cuda", gpu_bytes=4 * GIB)
    assert not p.fits and p.budget == int(0.9 * 4 * GIB) and p.reserve == GIB
    for part in ("3.00 GiB in float32", "reserve (1.00 GiB)", "budget (3.60 GiB of a 4.00 GiB GPU)",
                 "a GPU with more memory", "space.dtype: bfloat16", "memory.reserve_gib"):
        assert part in p.why, (part, p.why)
    assert "\n" not in p.why and p.lines()[-1] == f"  does not fit: {p.why}"
    assert not p.tiers and p.streamed_bytes == 0
    # only what would help: neither bfloat16 (1.5 GiB) nor a smaller reserve fits 3 GiB in 0.9 GiB
    hopeless = plan(t, resident="float32", device="cuda", gpu_bytes=GIB)
    assert not hopeless.fits and hopeless.why.endswith("use a GPU with more memory")
    assert plan(t, resident="bfloat16", device="cuda", gpu_bytes=2 * GIB).fits is False
    # the reserve: 10% of the GPU, at least 1 GiB; the budget 90%
    big = plan(t, resident="bfloat16", device="cuda", gpu_bytes=40 * GIB)
    assert big.fits and big.reserve == 4 * GIB and big.budget == 36 * GIB


def test_streaming_buffers_that_do_not_fit_are_refused():
    t = {"w": ((64 * MIB,), "BF16"), "v": ((64 * MIB,), "BF16")}  # 128 MiB each, resident 256 MiB
    memory = MemoryConfig(budget_gib=0.5, reserve_gib=0.2, slice_mib=64)
    p = plan(t, memory=memory, device="cuda", gpu_bytes=GIB)
    assert not p.fits and "streaming buffers" in p.why and "memory.slice_mib" in p.why
    ok = plan(t, memory=memory.model_copy(update={"slice_mib": 1}), device="cuda", gpu_bytes=GIB)
    assert ok.fits and ok.staging == 2 * 4 * MIB


def test_bandwidth_assumed_without_a_gpu_and_the_table():
    t = {"w": ((64 * MIB,), "BF16")}
    p = plan(t, device="cuda", gpu_bytes=4 * GIB, memory=MemoryConfig(budget_gib=1.5, reserve_gib=1, slice_mib=8))
    assert p.fits and p.streamed_bytes > 0
    assert (p.h2d_gbps, p.h2d_source, p.h2d_measured) == (20.0, "assumed", False)
    text = "\n".join(p.lines())
    for part in ("memory plan (its GPU", "resident", "budget", "reserve", "staging", "device", "host",
                 "disk", "GB per candidate", "20 GB/s (assumed)", "fits"):
        assert part in text, part
    unknown = plan(t, device="cuda", gpu_bytes=None)
    assert unknown.fits and "space.memory.gpu_gib" in "\n".join(unknown.lines())


# a space's plan ---------------------------------------------------------------------------------

def space_cfg(root, method="ties", **kw):
    from evomerge.spaces.hf_merge import HFMergeSpaceConfig

    base = config_dir(root, "base")
    experts = {k: str(config_dir(root, k)) for k in ("a", "b")}
    experts = experts if method != "slerp" else {"a": experts["a"]}
    return HFMergeSpaceConfig(name="hf_merge", method=method, models={"base": str(base), "experts": experts},
                              cache_dir=str(root / "tv"), **kw)


def test_memory_plan_of_a_space_devices(tmp_path):
    p = HFMergeSpace.memory_plan(space_cfg(tmp_path, dtype="float32"), workers_per_node=3)
    assert p.device == "cpu" and p.fits and p.workers_per_node == 3 and p.labels == ("a", "b")
    assert p.resident == 4 * TINY_PARAMS  # space.dtype defaults to float32
    g = HFMergeSpace.memory_plan(space_cfg(tmp_path, memory={"gpu_gib": 24}), workers_per_node=1)
    assert g.device == "cuda" and g.gpu_bytes == 24 * GIB and g.fits
    assert HFMergeSpace.memory_plan(space_cfg(tmp_path, method="linear"), 1).inputs_bytes == 2 * 2 * TINY_PARAMS


def test_memory_plan_of_a_space_refuses_a_cache_without_room(tmp_path, monkeypatch):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(memplan.shutil, "disk_usage", lambda p: usage(100, 90, 10))
    p = HFMergeSpace.memory_plan(space_cfg(tmp_path), 1)
    assert not p.fits and str(tmp_path / "tv") in p.why and "task vectors of 2 experts" in p.why
    assert "\n" not in p.why
    assert HFMergeSpace.memory_plan(space_cfg(tmp_path, method="linear"), 1).fits  # no task vectors


# the CLI ----------------------------------------------------------------------------------------

def real_family(root):
    """A base and two experts with real (tiny, random) safetensors weights and a config."""
    import torch
    from safetensors.torch import save_file

    tensors = model_tensors(config_dir(root, "shape"))
    dirs = {}
    for i, name in enumerate(("base", "a", "b")):
        d = config_dir(root, name, torch_dtype="float32")
        torch.manual_seed(i)
        save_file({n: torch.randn(s) for n, (s, _) in tensors.items()}, str(d / "model.safetensors"))
        dirs[name] = str(d)
    return dirs


def cli_config(root, **space):
    dirs = real_family(root)
    (root / "t.jsonl").write_text(json.dumps({"prompt": "ab", "answer": "c"}) + "\n")
    cfg = {"space": {"name": "hf_merge", "method": "ties", "cache_dir": str(root / "tv"),
                     "models": {"base": dirs["base"], "experts": {"a": dirs["a"], "b": dirs["b"]}}, **space},
           "strategy": {"name": "random"},
           "fitness": {"name": "lm_tasks", "tasks": [{"name": "t", "path": str(root / "t.jsonl"),
                                                      "kind": "generate"}]},
           "engine": {"workers": 1}, "budget": {"max_evals": 2}}
    path = root / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_a_run_whose_plan_does_not_fit_is_refused_before_the_run_directory(tmp_path, capfd):
    from evomerge.cli import main

    config = cli_config(tmp_path, device="cuda", memory={"gpu_gib": 0.001})
    out = tmp_path / "run"
    capfd.readouterr()
    rc = main(["--config", config, "--out", str(out), "--no-progress"])
    err = capfd.readouterr().err
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: space.memory: the resident model"), err
    assert "GPU" in lines[0] and not out.exists()
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()


def test_dry_run_prints_the_plan(tmp_path, capfd):
    from evomerge.cli import main

    config = cli_config(tmp_path)
    capfd.readouterr()
    assert main(["--config", config, "--dry-run"]) == 0
    text = capfd.readouterr().out
    assert "memory plan (the CPU, per worker; 1 worker per node):" in text
    assert "nothing streams" in text and text.rstrip().endswith("fits")
    assert not (tmp_path / "tv").exists()  # a dry run writes nothing


def test_bandwidth_is_measured_only_on_a_local_gpu_when_something_streams(monkeypatch):
    calls = []
    monkeypatch.setattr(memplan, "local_cuda", lambda: True)
    monkeypatch.setattr(memplan, "measure_h2d_gbps", lambda: calls.append(1) or 12.5)
    t = {"w": ((64 * MIB,), "BF16")}
    streaming = MemoryConfig(budget_gib=1.5, reserve_gib=1, slice_mib=8)
    p = plan(t, device="cuda", gpu_bytes=4 * GIB, memory=streaming)
    assert (p.h2d_gbps, p.h2d_source, p.h2d_measured, len(calls)) == (12.5, "measured", True, 1)
    assert p.transfer_s == pytest.approx(p.streamed_bytes / 12.5e9)
    assert plan(t, device="cuda", gpu_bytes=4 * GIB, memory=streaming, measure_h2d=False).h2d_source == "assumed"
    assert plan(t, device="cuda", gpu_bytes=40 * GIB).streamed_bytes == 0  # everything resident: nothing timed
    assert plan(t, device="cuda", gpu_bytes=40 * GIB, memory=MemoryConfig(h2d_gbps=3)).h2d_gbps == 3
    assert len(calls) == 1


def test_a_worker_sharing_its_gpu_plans_with_its_share():
    from evomerge.memplan import MemoryConfig, make_plan

    tensors = {"model.layers.0.mlp.up_proj.weight": ((1024, 1024), "BF16")}
    kw = dict(method="ties", labels=["a"], resident_dtype="auto", delta_dtype="auto", device="cuda",
              memory=MemoryConfig(), gpu_bytes=40 << 30, measure_h2d=False)
    whole, half = make_plan(tensors, **kw), make_plan(tensors, gpu_share=0.5, **kw)
    assert whole.budget == int(0.9 * (40 << 30)) and half.budget == int(0.45 * (40 << 30))
    assert whole.reserve == 4 << 30 and half.reserve == 2 << 30
