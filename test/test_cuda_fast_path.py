"""The fast torch path (model/backends/torch_cuda.py) against the reference TorchBackend.

On the CPU the fast path runs the very same functions as on CUDA, eagerly (no graph capture):
fused weights, the static KV cache with its position/step counters on the device, prompt
padding to buckets with masking, and the decode step that CUDA captures as a graph. Those
tests pin its tokens AND logits to the reference on the tiny checkpoint. The CUDA tests add
graph capture, the compiled element-wise ops, bf16, and "no host sync between decode steps";
they skip here with the reason "no CUDA GPU".
"""
import json

import numpy as np
import pytest
import torch

from openvla_model.backends import create_backend
from openvla_model.backends.torch_backend import TorchBackend
from openvla_model.backends.torch_cuda import (ENV_FAST, FastTorchBackend, Ops, _check_ops, add_rms_norm,
                                               rms_norm, rope, silu_mul, use_fast_path)
from openvla_model.bench import teacher_forced_logits
from openvla_model.checkpoint import Checkpoint
from openvla_model.config import load_config
from openvla_model.errors import BackendError
from openvla_model.preprocess import Preprocessor
from openvla_model.synthetic import synthetic_rgb

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")

SHORT = "pick up the red cup"  # 22 prompt tokens with the tiny tokenizer: bucket 32
LONG = "put the blue block into the open drawer on the left of the sink next to the yellow towel"
N = 7


@pytest.fixture(scope="module")
def cpu_pair(tiny_weights, tiny):
    config = tiny[0]
    ref = TorchBackend(config, Checkpoint(tiny_weights), device="cpu", dtype="float32")
    fast = FastTorchBackend(config, reference=ref)
    yield ref, fast
    fast.close()


def _cases(tokenizer, pre, instructions=(SHORT, LONG), seeds=(0, 1, 2)):
    for seed in seeds:
        px = pre(synthetic_rgb(seed))
        for instr in instructions:
            yield seed, instr, px, tokenizer.encode_prompt(instr)


# -- CPU: the fast path's math against the reference -------------------------------------------

# float32 on the CPU: measured max |fast - teacher-forced reference| logit difference 6.3e-6 to
# 1.03e-5 at max |logit| 3.9-4.5 (summation order only). The bound is ~3x that: about 3e-5. An
# RMSNorm off by 0.01% (x1.0001) already moves the logits by 7e-4 to 1.1e-3.
LOGIT_REL_TOL = 7.5e-6

def test_fast_path_tokens_and_logits_equal_reference_on_cpu(cpu_pair, tiny):
    ref, fast = cpu_pair
    _, tokenizer, pre = tiny
    assert fast.describe()["cuda_graphs"] is False
    for seed, instr, px, ids in _cases(tokenizer, pre):
        want, _ = ref.generate(px, ids, N)
        got, timings = fast.generate(px, ids, N)
        assert np.array_equal(got, want), (seed, instr, got, want)
        # logits of every step (prefill + 6 cached decode steps) vs one cache-free forward
        tf = teacher_forced_logits(ref.modules, px, ids, want, ref.device, ref.dtype)
        fl = fast.last_logits(N)
        assert fl.shape == tf.shape == (N, 32064)
        err, scale = (fl - tf).abs().max().item(), tf.abs().max().item()
        assert err < LOGIT_REL_TOL * scale, (f"image {seed} {instr!r}: max |logit diff| {err:.3g} > "
                                             f"{LOGIT_REL_TOL} x max |logit| {scale:.3g} = {LOGIT_REL_TOL * scale:.3g}")
        assert set(timings) == {"vision", "projector", "prefill", "decode"}
        assert len(fast.last_decode_steps_ms) == N - 1


def test_prompt_padding_and_stale_cache_slots_never_leak(cpu_pair, tiny):
    """Bucket 1 (no padding), 16 and 64 give the same logits, although padded and stale cache
    slots hold real (non-zero) keys/values from the pad tokens and from earlier calls."""
    ref, _ = cpu_pair
    config, tokenizer, pre = tiny
    backends = [FastTorchBackend(config, reference=ref, prompt_bucket=b) for b in (1, 16, 64)]
    for seed, instr, px, ids in _cases(tokenizer, pre, seeds=(3, 4)):
        logits, tokens = [], []
        for be in backends:
            t, _ = be.generate(px, ids, N)
            tokens.append(t)
            logits.append(be.last_logits(N))
        for t, lg in zip(tokens[1:], logits[1:]):
            assert np.array_equal(t, tokens[0])
            assert torch.allclose(lg, logits[0], rtol=0, atol=1e-4 * logits[0].abs().max().item())
    assert backends[2]._kv.abs().sum() > 0  # the slots past each prompt were written (pads)


def test_kv_cache_grows_for_a_long_prompt(cpu_pair, tiny):
    ref, _ = cpu_pair
    config, tokenizer, pre = tiny
    fast = FastTorchBackend(config, reference=ref)
    cap0 = fast.describe()["kv_cache_capacity"]
    instr = "pick up the " + "qzx" * 60  # unknown letters: about one token per character
    ids = tokenizer.encode_prompt(instr)
    assert config.num_patches + ids.size + N > cap0
    px = pre(synthetic_rgb(5))
    want, _ = ref.generate(px, ids, N)
    got, _ = fast.generate(px, ids, N)
    assert np.array_equal(got, want)
    assert fast.describe()["kv_cache_capacity"] >= config.num_patches + ids.size + N
    # and a short prompt still works after the reallocation
    ids = tokenizer.encode_prompt(SHORT)
    assert np.array_equal(fast.generate(px, ids, N)[0], ref.generate(px, ids, N)[0])


def test_num_tokens_other_than_seven(cpu_pair, tiny):
    ref, fast = cpu_pair
    _, tokenizer, pre = tiny
    px, ids = pre(synthetic_rgb(6)), tokenizer.encode_prompt(SHORT)
    for n in (1, 2, 20):  # 20 > the initial token slots: buffers are re-allocated
        assert np.array_equal(fast.generate(px, ids, n)[0], ref.generate(px, ids, n)[0])


def test_fused_weights_replace_the_originals_without_copies(cpu_pair):
    ref, fast = cpu_pair
    layer = ref.modules.llm.model.layers[0]
    qkv, gu = fast.w.qkv[0], fast.w.gate_up[0]
    q, k, v = layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight
    assert q.data_ptr() == qkv.data_ptr()
    assert k.data_ptr() == qkv.data_ptr() + q.numel() * q.element_size()
    assert v.data_ptr() == k.data_ptr() + k.numel() * k.element_size()
    assert layer.mlp.gate_proj.weight.data_ptr() == gu.data_ptr()
    assert torch.equal(qkv, torch.cat([q, k, v]))
    # a second fast backend on the same modules reuses the fused matrices
    again = FastTorchBackend(ref.config, reference=ref)
    assert again.w.qkv[0].data_ptr() == qkv.data_ptr() and torch.equal(again.w.qkv[0], qkv)


def test_random_full_checkpoint_stand_in_loads_and_agrees(tiny_weights, tiny):
    """RandomCheckpoint (what openvla-bench uses for the full size) on the tiny architecture:
    deterministic, norms at 1, and the fast path agrees with the reference on it."""
    from openvla_model.full_config import RandomCheckpoint

    config, tokenizer, pre = tiny
    a = TorchBackend(config, RandomCheckpoint(seed=1), device="cpu", dtype="float32")
    b = TorchBackend(config, RandomCheckpoint(seed=1), device="cpu", dtype="float32")
    wa, wb = a.modules.llm.lm_head.weight, b.modules.llm.lm_head.weight
    assert torch.equal(wa, wb) and 0.015 < wa.std().item() < 0.025
    assert torch.equal(a.modules.llm.model.norm.weight, torch.ones_like(a.modules.llm.model.norm.weight))
    fast = FastTorchBackend(config, reference=a)
    px, ids = pre(synthetic_rgb(0)), tokenizer.encode_prompt(SHORT)
    assert np.array_equal(fast.generate(px, ids, N)[0], b.generate(px, ids, N)[0])


def test_full_config_is_the_released_architecture(tmp_path):
    from openvla_model.full_config import FULL_PARAM_COUNT, write_full_config
    from openvla_model.modeling import OpenVLAModules

    config = load_config(write_full_config(tmp_path / "full"))
    with torch.device("meta"):
        modules = OpenVLAModules(config)
    assert sum(p.numel() for p in modules.parameters()) == FULL_PARAM_COUNT == 7_541_237_184
    assert modules.vision_dim == 2176 and config.llm.hidden_size == 4096 and config.vocab_size == 32064
    assert config.action_dim == 7 and config.num_patches == 256


# -- selection and the element-wise ops ----------------------------------------------------------

def test_fast_path_is_selected_on_cuda_and_switchable(tiny_weights, tiny, monkeypatch):
    config = tiny[0]
    monkeypatch.delenv(ENV_FAST, raising=False)
    assert use_fast_path(torch.device("cuda")) and not use_fast_path(torch.device("cpu"))
    assert not use_fast_path(torch.device("cuda"), fast=False) and use_fast_path(torch.device("cpu"), fast=True)
    monkeypatch.setenv(ENV_FAST, "0")
    assert not use_fast_path(torch.device("cuda"))
    monkeypatch.setenv(ENV_FAST, "1")
    assert use_fast_path(torch.device("cpu"))
    be = create_backend("torch", config, Checkpoint(tiny_weights), device="cpu", dtype="float32")
    assert isinstance(be, FastTorchBackend) and be.describe()["path"] == "fast"
    monkeypatch.setenv(ENV_FAST, "maybe")
    with pytest.raises(BackendError, match=ENV_FAST):
        use_fast_path(torch.device("cpu"))
    monkeypatch.delenv(ENV_FAST)
    be = create_backend("torch", config, Checkpoint(tiny_weights), device="cpu", dtype="float32")
    assert type(be) is TorchBackend
    be = create_backend("torch", config, Checkpoint(tiny_weights), device="cpu", dtype="float32", fast=True)
    assert isinstance(be, FastTorchBackend)


def test_elementwise_ops_trace_as_one_graph_and_match_transformers():
    """fullgraph tracing (what torch.compile needs) works, and the eager ops are transformers'."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, rotate_half

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 5, 64, generator=g).to(torch.bfloat16)
    u = torch.randn(1, 5, 64, generator=g).to(torch.bfloat16)
    norm = LlamaRMSNorm(64, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64, generator=g) + 0.5)
    w = norm.weight.detach()
    qk = torch.randn(1, 5, 6, 16, generator=g).to(torch.bfloat16)
    cos, sin = torch.randn(1, 5, 1, 16, generator=g).to(torch.bfloat16), torch.randn(1, 5, 1, 16, generator=g).to(
        torch.bfloat16)
    gu = torch.randn(1, 5, 2 * 32, generator=g).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(rms_norm(x, w, 1e-5), norm(x))
        assert torch.equal(add_rms_norm(x, u, w, 1e-5)[1], norm(x + u))
        assert torch.equal(rope(qk, cos, sin), qk * cos + rotate_half(qk) * sin)
        assert torch.equal(silu_mul(gu), torch.nn.functional.silu(gu[..., :32]) * gu[..., 32:])
        for fn, args in ((rms_norm, (x, w, 1e-5)), (add_rms_norm, (x, u, w, 1e-5)), (rope, (qk, cos, sin)),
                         (silu_mul, (gu,))):
            traced = torch.compile(fn, backend="eager", fullgraph=True)(*args)
            want = fn(*args)
            for a, b in zip(traced if isinstance(traced, tuple) else (traced,), want if isinstance(want, tuple)
                            else (want,)):
                assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_ops_check_accepts_exact_kernels(dtype):
    """The gate's accepting side: the eager ops, and ops that keep float32 intermediates and round
    once at the end (what a fused kernel without per-op precision casts does), pass."""
    good = _check_ops(Ops(), torch.device("cpu"), dtype, 64, 4, 16, 96, 1e-5, (1, 9))
    assert "max relative difference" in good.check_note
    fused = Ops()
    for name in ("rms_norm", "rope", "silu_mul"):
        eager = getattr(Ops(), name)
        setattr(fused, name, lambda *a, _f=eager: _f(*[t.float() if torch.is_tensor(t) else t for t in a]).to(dtype))
    _check_ops(fused, torch.device("cpu"), dtype, 64, 4, 16, 96, 1e-5, (1, 9))


def test_compiled_ops_check_rejects_wrong_kernels():
    """The start-up check that guards compiled ops catches an op that computes the wrong thing."""
    bad = Ops()
    bad.rope = lambda x, cos, sin: x * cos  # forgot the rotation
    with pytest.raises(RuntimeError, match="differ from eager"):
        _check_ops(bad, torch.device("cpu"), torch.float32, 64, 4, 16, 96, 1e-5, (1, 9))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_ops_check_rejects_a_near_miss(dtype):
    """The gate's passing side: a compiled RMSNorm 0.5% off (x1.005) must be rejected too, not
    only an op that computes something else entirely."""
    near = Ops()
    near.rms_norm = lambda x, w, eps: rms_norm(x, w, eps) * 1.005
    with pytest.raises(RuntimeError, match="differ from eager"):
        _check_ops(near, torch.device("cpu"), dtype, 64, 4, 16, 96, 1e-5, (1, 9))


@pytest.mark.slow
def test_bench_tiny_cpu_writes_a_complete_report(tiny_weights, tmp_path, capsys):
    from openvla_ros.bench import main  # the openvla-bench entry point: includes the node's image conversion

    out = tmp_path / "bench.json"
    assert main(["--weights", str(tiny_weights), "--device", "cpu", "--runs", "2", "--draft", "0,6",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    stages = report["paths"]["torch-fast"]["stages"]
    for s in ("image_conversion", "preprocess", "vision", "projector", "prefill", "decode_step_1", "decode_step_6",
              "detokenize", "total"):
        assert stages[s]["n"] == 2 and stages[s]["median_ms"] >= 0, s
    # the draft paths check greedy-exactness (tokens and accepted count) on every run they time
    assert set(report["paths"]) == {"torch-fast", "torch-reference", "hf-generate", "torch-fast+draft0",
                                    "torch-fast+draft6"}
    assert report["drafts"] == [0, 6]
    assert "decode_step_1" in report["paths"]["torch-fast+draft0"]["stages"]
    assert "decode_step_1" not in report["paths"]["torch-fast+draft6"]["stages"]  # all 7 tokens from one pass
    assert report["ratios"]["torch-fast+draft6 / torch-fast (total)"] > 0
    assert report["paths"]["torch-reference"]["default"] and not report["paths"]["torch-fast"]["default"]
    assert all(v > 0 for v in report["ratios"].values())
    a = report["agreement"]
    assert a["n_cases"] == 8 and a["fast_equal"] == 8 and a["hf_equal"] == 8
    assert report["image_conversion"].startswith("openvla_ros.image_conversion.image_msg_to_rgb")
    printed = capsys.readouterr().out
    assert "ratio hf-generate / torch-fast" in printed and "token agreement" in printed
    assert "ratio torch-fast+draft6 / torch-fast (total)" in printed


@pytest.mark.parametrize("argv, message", [
    (["--draft", "7"], "--draft"),
    (["--draft", "some"], "--draft"),
    (["--report", "ops"], "--report ops needs --backend ttnn"),
    (["--report", "ops", "--backend", "ttnn"], "--report ops needs --backend ttnn and --mesh-device"),
])
def test_bench_refuses_bad_options_in_one_line(argv, message, capsys, monkeypatch):
    from openvla_model.bench import main

    monkeypatch.delenv("MESH_DEVICE", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


# -- CUDA ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cuda_pair(tiny_weights, tiny):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    config = tiny[0]
    ref = TorchBackend(config, Checkpoint(tiny_weights), device="cuda", dtype="bfloat16")
    yield ref
    ref.close()


def _check_bf16_agreement(fast, ref, tokenizer, pre):
    """bf16: tokens must match unless the reference itself is at a near-tie between the two
    tokens (then the gap is reported); logits must agree closely up to the first mismatch."""
    mismatches, total = [], 0
    for seed, instr, px, ids in _cases(tokenizer, pre, seeds=(0, 1, 2, 3)):
        want, _ = ref.generate(px, ids, N)
        got, _ = fast.generate(px, ids, N)
        tf = teacher_forced_logits(ref.modules, px, ids, want, ref.device, ref.dtype)
        fl = fast.last_logits(N)
        diff = np.nonzero(got != want)[0]
        k = int(diff[0]) if diff.size else N - 1
        scale = tf.abs().max().item()
        assert (fl[:k + 1] - tf[:k + 1]).abs().max().item() < 0.03 * scale, (seed, instr)
        total += 1
        if diff.size:
            gap = (tf[k, int(want[k])] - tf[k, int(got[k])]).item()
            mismatches.append((seed, instr, k, gap))
            assert gap < 0.01 * scale, f"mismatch with a clear reference margin: {mismatches[-1]}"
    assert len(mismatches) <= total // 4, mismatches


@requires_cuda
def test_cuda_fast_path_graphs_and_compiled_ops_match_reference(cuda_pair, tiny):
    ref = cuda_pair
    config, tokenizer, pre = tiny
    fast = FastTorchBackend(config, reference=ref)
    _check_bf16_agreement(fast, ref, tokenizer, pre)
    d = fast.describe()
    assert d["cuda_graphs"] and d["graphs_captured"] >= 4 and not d["graph_failures"], d
    assert fast.preprocess_device.startswith("cuda")


@requires_cuda
def test_cuda_fast_path_graphs_with_eager_ops_match_reference(cuda_pair, tiny):
    ref = cuda_pair
    config, tokenizer, pre = tiny
    fast = FastTorchBackend(config, reference=ref, compile_ops=False)
    _check_bf16_agreement(fast, ref, tokenizer, pre)
    assert fast.describe()["elementwise_ops"] == "eager"


@requires_cuda
def test_cuda_no_host_sync_between_decode_steps(cuda_pair, tiny):
    ref = cuda_pair
    config, tokenizer, pre = tiny
    fast = FastTorchBackend(config, reference=ref)
    px = Preprocessor(config, device="cuda")(synthetic_rgb(0))
    ids = tokenizer.encode_prompt(SHORT)
    first, _ = fast.generate(px, ids, N)  # captures the graphs (capture itself synchronises)
    with torch.inference_mode():
        torch.cuda.set_sync_debug_mode("error")
        try:
            fast.launch(px, ids, N)  # everything up to the pinned token copy: must not sync
        finally:
            torch.cuda.set_sync_debug_mode(0)
        again, timings = fast.collect()
    assert np.array_equal(first, again)
    assert all(v > 0 for v in timings.values()) and len(fast.last_decode_steps_ms) == N - 1


@requires_cuda
def test_cuda_policy_defaults_to_the_fast_path(tiny_weights):
    from openvla_model import load_policy

    with load_policy(tiny_weights, device="cuda") as policy:
        assert isinstance(policy.backend, FastTorchBackend)
        assert policy.preprocessor.device.type == "cuda"
        r = policy.predict(synthetic_rgb(0), SHORT, unnorm_key="bridge_orig")
        assert r.tokens.shape == (N,) and r.timings_ms["decode"] > 0
