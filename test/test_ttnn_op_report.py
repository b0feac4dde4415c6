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
