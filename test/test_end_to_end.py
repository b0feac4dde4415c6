"""End to end on the tiny checkpoint: deterministic tokens, the same tokens from the Python API
and the CLI, the KV-cached decode equal to a cache-free recomputation, float32 vs bfloat16
agreement (a floor, and every mismatch starting at a float32 near-tie), actions by the spec's
formula."""
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from conftest import checkpoint_action_stats, spec_action
from openvla_model import STAGES, InputError, UnnormKeyError, load_policy
from openvla_model.synthetic import synthetic_rgb

INSTR = "pick up the red cup"


def test_predict_returns_a_complete_result(tiny_policy, tiny_weights):
    r = tiny_policy.predict(synthetic_rgb(0), INSTR, unnorm_key="bridge_orig")
    assert r.action.shape == r.normalized.shape == r.tokens.shape == (7,)
    assert r.action.dtype == np.float32 and r.tokens.dtype == np.int64
    assert r.valid and not r.out_of_range.any()
    assert set(r.timings_ms) == set(STAGES) and all(v >= 0 for v in r.timings_ms.values())
    assert r.timings_ms["total"] >= r.timings_ms["vision"] + r.timings_ms["prefill"]
    # the tokens' actions by the spec's formula and the checkpoint's statistics (not the codec
    # predict itself calls); the gripper stays raw (mask false)
    stats = checkpoint_action_stats(tiny_weights, "bridge_orig")
    np.testing.assert_allclose(r.action, spec_action(r.tokens, stats), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(r.normalized, -1 + (2 * np.clip(31999 - r.tokens, 0, 254) + 1) / 255, atol=1e-7)
    assert r.action[6] == r.normalized[6]


def test_tokens_are_deterministic_across_calls_and_loads(tiny_policy, tiny_weights):
    rgb = synthetic_rgb(1)
    a = tiny_policy.predict(rgb, INSTR, "bridge_orig").tokens
    b = tiny_policy.predict(rgb, INSTR, "bridge_orig").tokens
    with load_policy(tiny_weights, device="cpu", dtype="float32") as other:
        c = other.predict(rgb, INSTR, "bridge_orig").tokens
    assert np.array_equal(a, b) and np.array_equal(a, c)


def test_tokens_depend_on_image_and_instruction(tiny_policy):
    base = tiny_policy.predict(synthetic_rgb(2), INSTR, "bridge_orig").tokens
    other_image = [tiny_policy.predict(synthetic_rgb(s), INSTR, "bridge_orig").tokens for s in (3, 4, 5)]
    other_instr = [tiny_policy.predict(synthetic_rgb(2), i, "bridge_orig").tokens
                   for i in ("open the drawer", "move the blue block left", "close the lid")]
    assert any(not np.array_equal(base, t) for t in other_image)
    assert any(not np.array_equal(base, t) for t in other_instr)


def reference_tokens_without_cache(policy, rgb, instruction):
    """Greedy decoding recomputing the whole sequence every step (no KV cache, no position
    bookkeeping): an independent check of the backend's cached decode."""
    m = policy.backend.modules
    ids = torch.as_tensor(policy.tokenizer.encode_prompt(instruction)).view(1, -1)
    px = policy.preprocessor(rgb)
    with torch.no_grad():
        patches = m.projector(m.vision(px))
        emb = m.llm.get_input_embeddings()
        seq = torch.cat([emb(ids[:, :1]), patches, emb(ids[:, 1:])], dim=1)
        out = []
        for _ in range(7):
            logits = m.llm(inputs_embeds=seq, use_cache=False).logits[:, -1]
            tok = logits.argmax(-1)
            out.append(int(tok))
            seq = torch.cat([seq, emb(tok.view(1, 1))], dim=1)
    return np.array(out)


@pytest.mark.parametrize("seed,instruction", [(0, INSTR), (6, "put the carrot in the pot")])
def test_cached_decode_equals_cache_free_recomputation(tiny_policy, seed, instruction):
    rgb = synthetic_rgb(seed)
    got = tiny_policy.predict(rgb, instruction, "bridge_orig").tokens
    assert np.array_equal(got, reference_tokens_without_cache(tiny_policy, rgb, instruction))


def test_the_29871_token_changes_the_prediction(tiny_policy, monkeypatch):
    """Dropping the trailing '▁' changes what the model sees (regression guard for the rule)."""
    rgb = synthetic_rgb(0)
    with_space = tiny_policy.predict(rgb, INSTR, "bridge_orig").tokens
    real = tiny_policy.tokenizer.encode_prompt
    monkeypatch.setattr(tiny_policy.tokenizer, "encode_prompt", lambda s: real(s)[:-1])
    without = tiny_policy.predict(rgb, INSTR, "bridge_orig").tokens
    assert not np.array_equal(with_space, without)


def test_cli_json_gives_the_api_tokens(tiny_policy, tiny_weights, tmp_path):
    rgb = synthetic_rgb(9)
    path = tmp_path / "frame.png"
    cv2.imwrite(str(path), rgb[..., ::-1])  # PNG is lossless: the CLI reads back the same RGB
    api = tiny_policy.predict(rgb, INSTR, "bridge_orig")
    cmd = [sys.executable, "-m", "openvla_model.cli_predict", "--weights", str(tiny_weights), "--image", str(path),
           "--instruction", INSTR, "--unnorm-key", "bridge_orig", "--device", "cpu", "--dtype", "float32", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) >= {"tokens", "normalized", "action", "timings_ms"}
    assert out["tokens"] == api.tokens.tolist()
    # the printed action is the printed tokens' action by the spec (not a copy of the API's)
    np.testing.assert_allclose(out["action"], spec_action(out["tokens"], checkpoint_action_stats(tiny_weights,
                                                                                                "bridge_orig")),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("args,msg", [
    (["--unnorm-key", "nope"], "unknown unnorm_key 'nope'"),
    ([], "unnorm_key is required"),
    (["--image", "/nonexistent.png"], "image not found"),
    (["--weights", "/nonexistent"], "weights directory not found"),
])
def test_cli_errors_are_one_clear_line(tiny_weights, tmp_path, args, msg):
    path = tmp_path / "frame.png"
    cv2.imwrite(str(path), synthetic_rgb(0))
    base = {"--weights": str(tiny_weights), "--image": str(path), "--instruction": INSTR}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    cmd = [sys.executable, "-m", "openvla_model.cli_predict", "--device", "cpu"] + [x for kv in base.items() for x in kv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and msg in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


# Measured on the tiny checkpoint (CPU, torch 2.9): 25/28 tokens agree; the only mismatch starts at a
# float32 top-1/top-2 margin of 0.037 logits (then the sequences differ). bf16 moves the logits by
# up to 0.126 here, so a first mismatch is a legitimate bf16 flip only where the float32 margin is
# below twice that. The floor allows one more early flip than measured on another CPU.
BF16_AGREEMENT_FLOOR = 21  # of 28 (measured 25)
BF16_NEAR_TIE = 0.25  # logits: 2 x the measured max |bf16 - float32| logit difference


def test_float32_vs_bfloat16_agreement(tiny_policy, tiny_weights):
    from openvla_model.bench import teacher_forced_logits

    rows, agree, total, unexplained = [], 0, 0, []
    with load_policy(tiny_weights, device="cpu", dtype="bfloat16") as bf16:
        for seed in range(4):
            rgb = synthetic_rgb(seed)
            a = tiny_policy.predict(rgb, INSTR, "bridge_orig")
            b = bf16.predict(rgb, INSTR, "bridge_orig")
            assert b.tokens.shape == (7,)
            # the first token sees no earlier disagreement: bf16 must land in the action range too
            assert not b.out_of_range[0]
            agree += int((a.tokens == b.tokens).sum())
            total += 7
            top = teacher_forced_logits(tiny_policy.backend.modules, tiny_policy.preprocessor(rgb),
                                        tiny_policy.prompt_ids(INSTR), a.tokens, torch.device("cpu"),
                                        torch.float32).topk(2, dim=-1).values
            margins = (top[:, 0] - top[:, 1]).tolist()
            diff = np.nonzero(a.tokens != b.tokens)[0]
            first = int(diff[0]) if diff.size else None
            rows.append(f"  image {seed}: float32 {a.tokens.tolist()} bf16 {b.tokens.tolist()} float32 margins "
                        f"{[round(m, 3) for m in margins]} first mismatch {first}")
            if first is not None and margins[first] >= BF16_NEAR_TIE:
                unexplained.append((seed, first, round(margins[first], 3)))
    assert bf16.backend is None  # closed by the context manager
    report = (f"float32 vs bfloat16 token agreement on the tiny random model: {agree}/{total} (floor "
              f"{BF16_AGREEMENT_FLOOR}, near-tie margin < {BF16_NEAR_TIE})\n" + "\n".join(rows))
    print("\n" + report)
    assert not unexplained, (f"bf16 first mismatch at a clear float32 margin (image, step, margin): "
                             f"{unexplained}\n" + report)
    assert agree >= BF16_AGREEMENT_FLOOR, report


def test_bad_inputs_raise_clear_errors(tiny_policy):
    with pytest.raises(InputError, match="uint8"):
        tiny_policy.predict(np.zeros((10, 10, 3), np.float32), INSTR, "bridge_orig")
    with pytest.raises(InputError, match="empty"):
        tiny_policy.predict(synthetic_rgb(0), "  ", "bridge_orig")
    with pytest.raises(UnnormKeyError, match="valid keys: bridge_orig, tiny_other_dataset"):
        tiny_policy.predict(synthetic_rgb(0), INSTR, "bridge")


def test_overlong_prompt_rejected_before_the_model_runs(tiny_policy):
    long_instruction = "ж" * 1999  # within the character limit; byte fallback: ~4000 tokens > 2048
    with pytest.raises(InputError, match="instruction too long"):
        tiny_policy.predict(synthetic_rgb(0), long_instruction, "bridge_orig")
