"""The TT-NN op and byte report (openvla_model.backends.ttnn.op_report) against independent counts.

The report runs the backend's real op graph on a MOCK N300 under ttnn.graph capture (reduced
depth: 1 decoder layer, 2 blocks per tower, full widths) and counts the *DeviceOperation nodes.
The expectations here come from elsewhere:
- ops per decoder layer: the same production layer run through the golden-function emulator
  (test/ttnn_golden) with a proxy that records every ttnn call the layer makes; each call is one
  device op except `all_reduce`, which ttnn 0.81.1 runs on a 1xN mesh as a reduce-scatter plus
  an all-gather (two device ops, two collective launches).
- weight bytes per chip per decode step: summed from the OpenVLA-7B sizes and the N300 profile's
  dtypes (whole 32x32 tiles: bf16 2048 B, bfloat8_b 1088 B per tile), not from the graph.
Mock runs are subprocesses under a timeout (a bad kernel ELF can hang tt-metal).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from ttnn_mock.mock_env import missing_prerequisites  # noqa: E402

_why = missing_prerequisites()
TIMEOUT_S = 600  # reduced-depth N300 capture: ~40 s warm, ~90 s with a cold JIT cache on 2 busy cores
COLLECTIVE_DEVICE_OPS = {"all_reduce": 2, "all_gather": 1,  # ttnn 0.81.1 on a 1xN mesh
                         "experimental.reduce_scatter_minimal_async": 1, "experimental.all_gather_async": 1}
# ttnn.reshape(x, logical_shape, padded_shape) with the padded shape unchanged is a view: no device op
NO_DEVICE_OP = {"reshape(view)"}


@pytest.fixture(scope="module")
def n300_report(tmp_path_factory):
    if _why is not None:
        pytest.skip(f"mock TT-NN devices unavailable: {_why}")
    from openvla_model.backends.ttnn.op_report import op_report

    work = tmp_path_factory.mktemp("op_report")
    return op_report("N300", llm_layers=1, vision_depth=3, timeout_s=TIMEOUT_S, work=work)


class _Counting:
    """Wraps GoldenTTNN: records the name of every ttnn call made while `active`."""

    def __init__(self, emu, calls, state, prefix=""):
        self._emu, self._calls, self._state, self._prefix = emu, calls, state, prefix

    def __getattr__(self, name):
        from ttnn_golden.emulator import _PASSTHROUGH

        attr = getattr(self._emu, name)
        if name in ("transformer", "experimental", "graph"):
            return _Counting(attr, self._calls, self._state, prefix=f"{name}.")
        if not callable(attr) or name in _PASSTHROUGH:
            return attr

        def call(*a, **k):
            if self._state["active"]:
                view = name == "reshape" and len(a) + ("padded_shape" in k) >= 3
                self._calls.append("reshape(view)" if view else self._prefix + name)
            return attr(*a, **k)
        return call


@pytest.fixture(scope="module")
def golden_layer_calls(tiny_weights, tiny_policy):
    """ttnn calls of decoder layer 0 in prefill and in one decode step, N300 profile, emulated."""
    import numpy as np
    from ttnn_golden.emulator import GoldenTTNN

    from openvla_model.backends.ttnn.backend import TtnnBackend
    from openvla_model.checkpoint import Checkpoint

    calls = {"prefill": [], "decode": []}
    state = {"active": False}
    tt = _Counting(GoldenTTNN(available_devices=2), None, state)
    be = TtnnBackend(tiny_policy.config, Checkpoint(tiny_weights), mesh_device="N300", tt=tt, cache_dir=None,
                     trace=False)
    try:
        layer = be.llm.layers[0]
        for phase in ("prefill", "decode"):
            orig = getattr(layer, phase)

            def recorded(*a, _orig=orig, _phase=phase, **k):
                tt._calls = calls[_phase] if not calls[_phase] else []  # the first call of each phase only
                state["active"] = True
                try:
                    return _orig(*a, **k)
                finally:
                    state["active"] = False
            setattr(layer, phase, recorded)
        px = tiny_policy.preprocessor((np.random.RandomState(0).rand(224, 224, 3) * 255).astype(np.uint8))
        be.generate(px, tiny_policy.prompt_ids("pick up the cup"), 2)  # one prefill + one decode step
    finally:
        be.close()
    assert calls["prefill"] and calls["decode"], calls
    return calls


def _device_ops(calls):
    return sum(0 if c in NO_DEVICE_OP else COLLECTIVE_DEVICE_OPS.get(c, 1) for c in calls)


@pytest.mark.slow
def test_decode_and_prefill_ops_per_layer_match_the_emulated_layer(n300_report, golden_layer_calls):
    want_decode = _device_ops(golden_layer_calls["decode"])
    want_prefill = _device_ops(golden_layer_calls["prefill"])
    assert n300_report["decode_ops_per_layer"] == want_decode, golden_layer_calls["decode"]
    assert n300_report["prefill_ops_per_layer"] == want_prefill, golden_layer_calls["prefill"]
    want_coll = sum(COLLECTIVE_DEVICE_OPS.get(c, 0) for c in golden_layer_calls["decode"])
    assert n300_report["decode_collectives_per_layer"] == want_coll
    print(f"\nN300 decode ops per decoder layer: {want_decode} (report {n300_report['decode_ops_per_layer']}), "
          f"prefill {want_prefill}")


@pytest.mark.slow
def test_collectives_and_host_transfers_of_one_decode_step(n300_report):
    d = n300_report["stages"]["decode"]
    # 2 all_reduce per layer (2 launches each) x 32 layers + the LM-head all_gather
    assert d.collectives == 32 * 2 * COLLECTIVE_DEVICE_OPS["all_reduce"] + 1
    # device-side feedback: argmax feeds the next step, positions advance on the device
    assert (d.h2d, d.d2h, d.syncs) == (0, 0, 0)
    # the vision towers run on different chips: one all-gather of their features (vision.py)
    assert n300_report["stages"]["vision"].collectives == 1


@pytest.mark.slow
def test_host_transfers_of_one_action_on_the_timed_path(n300_report):
    """The whole action's host traffic (every stage, all 6 decode steps): in, the image patches
    (ONE upload: each chip gets its own tower's patches, vision.py), the prompt ids (BOS and the rest: two uploads) and the decode start
    position (two 4-byte writes: int32 position, uint32 RoPE row); out, the 7 tokens in ONE read
    of 7 uint32; no synchronize_device; nothing uploaded from inside a decode or vision op (the
    vision heads ops replaced its tiled reshapes; prefill still has some: counted apart)."""
    io = n300_report["action_io"]
    assert n300_report["info"]["decode_steps_run"] == 6
    assert dict(io["by_stage"]) == {"h2d vision": 1, "h2d prefill": 4, "d2h tokens": 1}, io
    assert (io["h2d"], io["d2h"], io["outside_stages"]) == (5, 1, 0), io
    assert n300_report["stages"]["vision"].op_internal_uploads == 0
    assert n300_report["stages"]["decode"].op_internal_uploads == 0
    assert n300_report["stages"]["tokens"].op_internal_uploads == 0
    assert io["d2h_bytes"] == 7 * 4, io
    assert n300_report["syncs_per_action"] == 0
    assert n300_report["stages"]["tokens"].device_ops == 1  # the 7 token buffers concatenated


def _tile_bytes(rows, cols, dtype_bytes):
    return math.ceil(rows / 32) * math.ceil(cols / 32) * 1024 * dtype_bytes


@pytest.mark.slow
def test_decode_weight_bytes_per_chip_match_the_model_sizes(n300_report):
    """Every LM weight read once per step, per chip: N300 profile = bf16 QKV/WO/LM head, bfp8 FFN."""
    bf16, bfp8 = 2.0, 1088 / 1024
    hidden, inter, vocab, n = 4096, 11008, 32064, 2
    local_inter = math.ceil(inter / (32 * n)) * 32 * n // n
    per_layer = (_tile_bytes(hidden, 3 * hidden // n, bf16) + _tile_bytes(hidden // n, hidden, bf16)
                 + 2 * _tile_bytes(hidden, local_inter, bfp8) + _tile_bytes(local_inter, hidden, bfp8)
                 + 2 * _tile_bytes(1, hidden, bf16))  # the two RMSNorm gains
    head = _tile_bytes(hidden, math.ceil(vocab / (32 * n)) * 32, bf16) + _tile_bytes(1, hidden, bf16)
    want = 32 * per_layer + head
    got = n300_report["stages"]["decode"].weight_bytes
    assert abs(got - want) / want < 0.01, (got, want)


def _node(kind, name=None, connections=(), **params):
    p = dict(params)
    if name is not None:
        p["name"] = name
    return {"node_type": kind, "params": p, "connections": list(connections)}


def test_parse_graph_attributes_device_ops_and_transfers():
    """A hand-made call trace: stage / layer scopes, a device op nested in another (counted once),
    a device op without the DeviceOperation suffix, a host upload inside an op, a host read."""
    from openvla_model.backends.ttnn.op_report import MARK, parse_graph

    g = [
        _node("capture_start"),
        _node("function_start", MARK + "stage=decode#1"),                          # 1
        _node("function_start", MARK + "layer=3"),                                 # 2
        _node("function_start", "ttnn.linear"),                                    # 3
        _node("tensor", connections=[5], shape="Shape([1, 1, 1, 4096])", dtype="DataType::BFLOAT16",
              layout="Layout::TILE", size="8192", buffer_type="1", address="10", storage_type="DEVICE"),  # 4
        _node("function_start", "MatmulDeviceOperation", program_cache_hit="True"),  # 5
        _node("tensor", connections=[5], shape="Shape([4096, 64])", dtype="DataType::BFLOAT8_B",
              layout="Layout::TILE", size="262144", buffer_type="0", address="20", storage_type="DEVICE"),  # 6
        _node("function_start", "InnerDeviceOperation"),                           # 7: nested, not counted
        _node("function_end", "InnerDeviceOperation"),
        _node("function_start", "Tensor::to_device"),                              # 9: upload inside the op
        _node("tensor", connections=[9], shape="Shape([4, 128])", dtype="DataType::UINT32",
              layout="Layout::ROW_MAJOR", size="2048", storage_type="HOST"),
        _node("function_end", "Tensor::to_device"),
        _node("function_end", "MatmulDeviceOperation"),
        _node("function_end", "ttnn.linear"),
        _node("function_end", MARK + "layer=3"),
        _node("function_start", "SDPAOperation", program_cache_hit="False"),       # 15: no suffix, counted
        _node("function_end", "SDPAOperation"),
        _node("function_start", "Tensor::cpu"),                                    # 17: a host read
        _node("tensor", connections=[17], shape="Shape([1, 1])", dtype="DataType::UINT32",
              layout="Layout::ROW_MAJOR", size="4", storage_type="DEVICE"),
        _node("function_end", "Tensor::cpu"),
        _node("function_end", MARK + "stage=decode#1"),
        _node("function_start", "BinaryNgDeviceOperation"),                        # outside every stage
        _node("function_end", "BinaryNgDeviceOperation"),
        _node("capture_end"),
    ]
    ops, transfers = parse_graph(g)
    assert [(o.name, o.stage, o.step, o.layer) for o in ops] == [
        ("MatmulDeviceOperation", "decode", 1, 3), ("SDPAOperation", "decode", 1, None),
        ("BinaryNgDeviceOperation", None, None, None)]
    weight = ops[0].inputs[1]
    assert weight[2] == 2 * 128 * 1088  # 8 x 2 tiles of bfloat8_b at 1088 B, not the graph's 1 B / element
    assert transfers == [("h2d", "decode", 1, 2048.0, True), ("d2h", "decode", 1, 4.0, False)]


# ---- OpenVLA-OFT chunk (issue 15): the op report's --oft pass --------------------------------------------------
# Independent expectations: the plain prefill's layer in the SAME capture (the OFT pass runs the same decoder
# layers, bidirectional with a padding mask), the golden-emulated layer's ttnn calls, and weight bytes summed
# from the LIBERO head / proprio-projector sizes and the N300 profile's dtypes (whole tiles), not from the graph.
OFT_IMAGES, OFT_CHUNK, OFT_DIM, OFT_PROPRIO = 2, 8, 7, 8


@pytest.fixture(scope="module")
def n300_oft(tmp_path_factory):
    """(summary, raw records) of the reduced-depth N300 report with the OFT chunk captured."""
    import json

    if _why is not None:
        pytest.skip(f"mock TT-NN devices unavailable: {_why}")
    from openvla_model.backends.ttnn.op_report import op_report

    work = tmp_path_factory.mktemp("op_report_oft")
    summary = op_report("N300", llm_layers=1, vision_depth=3, timeout_s=TIMEOUT_S, work=work, oft=True)
    return summary, json.loads((work / "raw.json").read_text())


def _layer_ops(raw, stage):
    return [o for o in raw["ops"] if o["stage"] == stage and o["layer"] == 0]


def _check_oft(summary, raw, golden_prefill_calls):
    """The OFT stage counts against independent counts; AssertionError on the first mismatch."""
    from openvla_model.backends.ttnn.op_report import action_model, oft_model

    st, info = summary["stages"], summary["info"]["oft"]
    s_pad = info["padded_length"]
    assert (info["num_images"], info["chunk"], info["action_dim"]) == (OFT_IMAGES, OFT_CHUNK, OFT_DIM)
    assert info["sequence_length"] == 1 + OFT_IMAGES * 256 + 1 + 21 + OFT_CHUNK * OFT_DIM + 1  # BOS, patches,
    # proprio, prompt[1:], action rows, stop
    # -- the bidirectional prefill's decoder layer = the plain prefill's layer + ONE op: the single-input
    #    element-wise op ttnn's SDPA applies to the (1, 1, S, S) padding mask
    plain, oft = _layer_ops(raw, "prefill"), _layer_ops(raw, "oft_prefill")
    plain_names = [o["name"] for o in plain]
    extra = [i for i in range(len(oft)) if [o["name"] for o in oft[:i] + oft[i + 1:]] == plain_names]
    assert extra, ([o["name"] for o in oft], plain_names)
    mask_op = oft[extra[0]]
    assert [tuple(x[0]) for x in mask_op["inputs"]] == [(1, 1, s_pad, s_pad)], mask_op
    assert summary["oft_prefill_ops_per_layer"] == len(plain) + 1 == summary["prefill_ops_per_layer"] + 1
    assert summary["prefill_ops_per_layer"] == _device_ops(golden_prefill_calls)
    coll = lambda ops: sum(any(w in o["name"] for w in ("AllGather", "ReduceScatter", "AllReduce")) for o in ops)  # noqa: E731
    assert summary["oft_prefill_collectives_per_layer"] == coll(plain) == coll(oft)
    # -- vision: the plain vision call once per image (ops, weights, collectives, one upload each)
    assert st["oft_vision"].device_ops == OFT_IMAGES * st["vision"].device_ops
    assert st["oft_vision"].weight_bytes == OFT_IMAGES * st["vision"].weight_bytes
    assert st["oft_vision"].collectives == OFT_IMAGES * st["vision"].collectives
    # -- weights per chip, from the sizes (N300: bf16 projector dtype, LayerNorm gains bf16, fc1 column-sharded)
    dt = {"bfloat16": 2.0, "bfloat8_b": 1088 / 1024}[summary["info"]["profile"]["dtypes"]["projector"]]
    bf16, h, n = 2.0, 4096, 2
    t = _tile_bytes
    head = (2 * t(1, OFT_DIM * h, bf16) + t(OFT_DIM * h, h // n, dt) + t(1, h // n, dt)
            + 2 * (2 * t(1, h, bf16) + t(h, h, dt) + t(1, h, dt)) + 2 * t(1, h, bf16) + t(h, 32, dt) + t(1, 32, dt))
    proprio = t(32, h, dt) + t(1, h, dt) + t(h, h, dt) + t(1, h, dt)
    assert st["oft_head"].weight_bytes == head, (st["oft_head"].weight_bytes, head)
    assert st["oft_proprio"].weight_bytes == proprio, (st["oft_proprio"].weight_bytes, proprio)
    assert st["oft_projector"].weight_bytes == st["projector"].weight_bytes
    inter = 11008
    li = math.ceil(inter / (32 * n)) * 32 * n // n
    per_layer = (t(h, 3 * h // n, bf16) + t(h // n, h, bf16) + 2 * t(h, li, 1088 / 1024) + t(li, h, 1088 / 1024)
                 + 2 * t(1, h, bf16))
    assert st["oft_prefill"].weight_bytes == 32 * per_layer + t(1, h, bf16)  # + the final norm; no LM head
    assert st["oft_head"].collectives == 1  # fc1's all-gather
    # -- host traffic of one chunk: each image's patches, the proprio, the prompt ids in; one read of the chunk
    io = summary["oft_io"]
    assert dict(io["by_stage"]) == {"h2d oft_vision": OFT_IMAGES, "h2d oft_proprio": 1, "h2d oft_prefill": 1,
                                    "d2h oft_head": 1}, io
    assert io["d2h_bytes"] == t(OFT_CHUNK, OFT_DIM, 4.0)  # one float32 tile: 8 rows x 7 (32) columns
    # -- the model: chunk = its stages, per action = chunk / T, the plain action as the report's
    m = oft_model(summary)
    assert m["chunk_ms"] == pytest.approx(sum(st[s].modelled_us for s in (
        "oft_vision", "oft_projector", "oft_proprio", "oft_prefill", "oft_head")) / 1e3, abs=0.01)
    assert m["per_action_ms"] == pytest.approx(m["chunk_ms"] / OFT_CHUNK, abs=0.01)
    assert m["plain_action_ms"] == pytest.approx(action_model(summary)["action_ms"], abs=0.1)


@pytest.mark.slow
def test_oft_chunk_counts_match_independent_counts(n300_oft, golden_layer_calls):
    from openvla_model.backends.ttnn.op_report import format_report

    summary, raw = n300_oft
    _check_oft(summary, raw, golden_layer_calls["prefill"])
    text = format_report(summary)
    assert "OpenVLA-OFT chunk" in text and ">= 10 Hz control" in text
    print("\n" + "\n".join(text.splitlines()[text.splitlines().index(next(
        ln for ln in text.splitlines() if ln.startswith("OpenVLA-OFT chunk"))):]))


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["second image's vision not run", "one op less in the OFT prefill layer",
                                   "causal prefill (no padding mask)", "chunk read twice"])
def test_oft_chunk_check_fails_on_an_injected_fault(n300_oft, golden_layer_calls, fault):
    """The same check on the captured records with one fault injected (re-summarised): it must fail."""
    import copy

    from openvla_model.backends.ttnn.op_report import summarise

    _, raw = n300_oft
    raw = copy.deepcopy(raw)
    ops = raw["ops"]
    if fault == "second image's vision not run":
        vis = [i for i, o in enumerate(ops) if o["stage"] == "oft_vision"]
        drop = set(vis[len(vis) // 2:])
        raw["ops"] = [o for i, o in enumerate(ops) if i not in drop]
    elif fault == "one op less in the OFT prefill layer":
        i = next(i for i, o in enumerate(ops) if o["stage"] == "oft_prefill" and o["layer"] == 0
                 and "Matmul" in o["name"])
        del ops[i]
    elif fault == "causal prefill (no padding mask)":
        raw["ops"] = [o for o in ops if not (o["stage"] == "oft_prefill" and o["layer"] is not None and len(
            o["inputs"]) == 1 and o["inputs"][0][0][-2:] == [raw["info"]["oft"]["padded_length"]] * 2)]
    else:
        raw["transfers"].append([x for x in raw["transfers"] if x[0] == "d2h" and x[1] == "oft_head"][0])
    with pytest.raises(AssertionError):
        _check_oft(summarise(raw), raw, golden_layer_calls["prefill"])


def test_bench_oft_ttnn_report_ops_reaches_the_oft_report(monkeypatch):
    """`openvla-bench --oft --backend ttnn --mesh-device N300 --report ops` runs the op report WITH its OFT pass."""
    import openvla_model.backends.ttnn.op_report as rep
    from openvla_model import bench

    seen = []
    monkeypatch.setattr(rep, "main", lambda argv: seen.append(list(argv)) or 0)
    assert bench.main(["--oft", "--backend", "ttnn", "--mesh-device", "N300", "--report", "ops"]) == 0
    assert seen == [["--mesh-device", "N300", "--oft"]]


@pytest.mark.slow
def test_bench_oft_ttnn_without_a_card_says_so_in_one_line(capsys, monkeypatch):
    """--oft --backend ttnn times real chunks on a card; without one: exit 2, one line naming --report ops."""
    from pathlib import Path as _P

    if _P("/dev/tenstorrent").exists():
        pytest.skip("a Tenstorrent card is present: this checks the no-card message")
    pytest.importorskip("ttnn", reason="the ttnn package is not installed")
    from openvla_model import bench

    monkeypatch.delenv("TT_METAL_MOCK_CLUSTER_DESC_PATH", raising=False)
    assert bench.main(["--oft", "--backend", "ttnn", "--mesh-device", "N300", "--size", "tiny", "--runs", "1"]) == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("error: ")]
    assert len(err) == 1 and "no Tenstorrent card found" in err[0] and "--report ops" in err[0], err
