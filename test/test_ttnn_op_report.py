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
def n300_run(tmp_path_factory):
    """(summary, work dir holding raw.json) of the reduced-depth N300 report: ONE mock run per module."""
    if _why is not None:
        pytest.skip(f"mock TT-NN devices unavailable: {_why}")
    from openvla_model.backends.ttnn.op_report import op_report

    work = tmp_path_factory.mktemp("op_report")
    return op_report("N300", llm_layers=1, vision_depth=3, timeout_s=TIMEOUT_S, work=work), work


@pytest.fixture(scope="module")
def n300_report(n300_run):
    return n300_run[0]


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
    positions (two writes of 4 bytes per decode row: int32 positions, uint32 RoPE rows); out, the 7
    tokens of every decode row in ONE read of 7 x max_batch uint32; no synchronize_device; nothing uploaded from inside a decode or vision op (the
    vision heads ops replaced its tiled reshapes; prefill still has some: counted apart)."""
    io = n300_report["action_io"]
    assert n300_report["info"]["decode_steps_run"] == 6
    assert dict(io["by_stage"]) == {"h2d vision": 1, "h2d prefill": 4, "d2h tokens": 1}, io
    assert (io["h2d"], io["d2h"], io["outside_stages"]) == (5, 1, 0), io
    assert n300_report["stages"]["vision"].op_internal_uploads == 0
    assert n300_report["stages"]["decode"].op_internal_uploads == 0
    assert n300_report["stages"]["tokens"].op_internal_uploads == 0
    assert io["d2h_bytes"] == 7 * 4 * 4, io  # 7 uint32 of each of the N300 profile's 4 decode rows (max_batch)
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


# ---- Several robots (issue 14): the op report's batch captures and model -------------------------------------------
# Independent expectations: max_batch read from the profile file (config/ttnn/N300.yaml), the single action of the
# SAME capture (its vision, prefill, decode steps), the op sequence of generate_batch as docs/ttnn.md "Several
# robots" states it (one batched vision pass: the single vision + the prefix concat for B > 1; per item one prefill
# = the single prefill + the slice of its patches; the decode steps of every row once), the fill_cache calls made
# (spied on ttnn.fill_cache: item, slot), and the host traffic of a batch: 1 patches upload (B images), per item
# ids + LM-head row index, 2 decode-start writes, 1 read of (7, max_batch) uint32 tokens.


@pytest.fixture(scope="module")
def n300_raw(n300_run):
    import json

    return json.loads((n300_run[1] / "raw.json").read_text())


def _max_batch(mesh):
    import yaml

    return int(yaml.safe_load((HERE.parent / "config" / "ttnn" / f"{mesh}.yaml").read_text())["max_batch"])


def _check_batch(summary, raw):
    """The batch captures' counts against independent counts; AssertionError on the first mismatch."""
    from collections import Counter

    mb = _max_batch("N300")
    caps = summary["batch"]
    assert [c["size"] for c in caps] == [2, mb]
    single = summary["stages"]
    plain_step_ops = Counter(o["step"] for o in raw["ops"] if o["stage"] == "decode")
    assert sorted(plain_step_ops) == list(range(1, 7))
    layers = summary["info"]["llm_layers"]
    vision_upload = [t[3] for t in raw["transfers"] if t[0] == "h2d" and t[1] == "vision" and not t[4]]
    for c, rc in zip(caps, raw["batch"]):
        b = c["size"]
        ops = rc["ops"]
        # one prefill per item, in slots 0..B-1, each filling its own slot: 2 fill_cache (K, V) per layer
        assert {o["step"] for o in ops if o["stage"] == "batch_prefill"} == set(range(b))
        fills = Counter(map(tuple, c["fill_cache_slots"]))
        assert fills == {(i, i): 2 * layers for i in range(b)}, fills
        fill_ops = Counter(o["step"] for o in ops
                           if o["stage"] == "batch_prefill" and o["name"] == "UpdateKVCacheOperation")
        assert fill_ops == {i: 2 * layers for i in range(b)}, fill_ops
        # each item's prefill = the single action's prefill + the slice of its patches from the batch
        assert [it["device_ops"] for it in c["items"]] == [single["prefill"].device_ops + 1] * b
        # ONE batched vision pass (not B): the single vision's ops + the prefix rows concatenated per item
        assert c["stage_ops"]["vision"] == single["vision"].device_ops + 1
        # weights read once for all images (B reads would be B x): the one extra read is the prefix rows'
        # (1, 1, 32, width) constant that the concat copies per item
        assert single["vision"].weight_bytes <= c["vision_weight_bytes"] < 1.01 * single["vision"].weight_bytes
        assert c["stage_ops"]["projector"] == single["projector"].device_ops
        # the decode steps run ONCE for all rows: step k has the single action's step k's device ops
        assert c["decode_steps_run"] == 6
        assert c["decode_step_ops"] == [plain_step_ops[k] for k in range(1, 7)]
        assert c["stage_ops"]["tokens"] == single["tokens"].device_ops
        assert c["tokens_shape"] == [b, 7]
        # host traffic of a batch
        io = c["io"]
        want = {"h2d batch_vision": 1, "h2d batch_start": 2, "d2h batch_tokens": 1,
                **{f"h2d batch_prefill#{i}": 2 for i in range(b)}}
        assert dict(io["by_stage"]) == want, io
        assert (io["h2d"], io["d2h"], io["outside_stages"]) == (2 * b + 3, 1, 0), io
        assert io["d2h_bytes"] == 7 * mb * 4, io  # (1, 7, max_batch) uint32 in one read
        up = [t[3] for t in rc["transfers"] if t[1] == "batch_vision" and t[0] == "h2d"]
        assert up == [b * vision_upload[0]], (up, vision_upload)  # the B images' patches in one upload
        assert c["unattributed_ops"] == 0


def _check_batch_model(summary, sizes):
    """batch_model's rows = the sum of their parts (recomputed here from the captures and the single action)."""
    from openvla_model.backends.ttnn.op_report import action_model, batch_model

    mb = _max_batch("N300")
    caps = {c["size"]: c for c in summary["batch"]}
    act = action_model(summary)
    m = batch_model(summary, sizes)
    assert [r["batch"] for r in m["rows"]] == sorted(set(sizes) | {1})

    def vp(b):
        if b == 1:
            return act["stage_ms"]["vision"] + act["stage_ms"]["projector"]
        if b in caps:
            return caps[b]["stage_ms"]["vision"] + caps[b]["stage_ms"]["projector"]
        lo, hi = max(k for k in [1, *caps] if k < b), min(k for k in caps if k > b)
        return vp(lo) + (b - lo) / (hi - lo) * (vp(hi) - vp(lo))

    def decode(c, b):
        if b == c["size"]:
            return c["stage_ms"]["decode"]
        # items 0..b-1 of the largest capture: its step less the KV of the rows that now idle, at the
        # cost model's interleaved DRAM bandwidth (180 GB/s; SDPA decode is memory-bound in the model)
        seqs = [it["sequence_length"] for it in c["items"]]
        return c["stage_ms"]["decode"] - (_kv_step_bytes(seqs, mb) - _kv_step_bytes(seqs[:b], mb)) / 180e6

    def group(b):
        if b == 1:
            return act["action_ms"]
        c = caps.get(b, caps[mb])
        return (vp(b) + sum(it["prefill_ms"] for it in c["items"][:b]) + c["start_ms"]
                + 6 * decode(c, b) + c["stage_ms"]["tokens"])

    base = None
    for r in m["rows"]:
        b = r["batch"]
        want = (b // mb) * group(mb) + (group(b % mb) if b % mb else 0.0)
        assert r["batch_ms"] == pytest.approx(want, rel=1e-9), (b, r["batch_ms"], want)
        assert r["per_robot_latency_ms"] == r["batch_ms"]  # every robot's action ends with the batch
        assert r["actions_per_s"] == pytest.approx(b * 1e3 / want, rel=1e-9)
        base = base or r
        assert r["throughput_vs_batch1"] == pytest.approx(r["actions_per_s"] / base["actions_per_s"], rel=1e-9)
    assert m["rows"][0]["batch_ms"] == pytest.approx(act["action_ms"], rel=1e-12)  # B = 1 is the report's action
    return m


@pytest.mark.slow
def test_batch_capture_counts_match_independent_counts(n300_report, n300_raw):
    from openvla_model.backends.ttnn.op_report import format_report, to_json

    _check_batch(n300_report, n300_raw)
    m = _check_batch_model(n300_report, [1, 2, 3, 4, 8])  # 3: interpolated vision; 8: two groups of 4
    assert m["rows"][-1]["groups"] == 2
    text = format_report(n300_report, [1, 2, 4])
    section = text[text.index("Several robots"):]
    rows = [ln for ln in section.splitlines() if ln.startswith("| ") and ln[2].isdigit()]
    assert [int(ln.split("|")[1]) for ln in rows] == [1, 2, 4]
    assert "every robot's action completes at the end of the batch's decode" in section
    j = to_json(n300_report, [1, 2, 4])
    assert [r["batch"] for r in j["batch"]["model"]["rows"]] == [1, 2, 4]
    print("\n" + section)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["one prefill missing", "every prefill into slot 0", "vision run per item",
                                   "an extra op in decode step 3", "positions written per item",
                                   "tokens read per row"])
def test_batch_check_fails_on_an_injected_fault(n300_raw, fault):
    """The same check on the captured records with one fault injected (re-summarised): it must fail."""
    import copy

    from openvla_model.backends.ttnn.op_report import summarise

    raw = copy.deepcopy(n300_raw)
    cap = raw["batch"][-1]
    ops, tr = cap["ops"], cap["transfers"]
    if fault == "one prefill missing":
        cap["ops"] = [o for o in ops if not (o["stage"] == "batch_prefill" and o["step"] == 3)]
        cap["transfers"] = [t for t in tr if not (t[1] == "batch_prefill" and t[2] == 3)]
    elif fault == "every prefill into slot 0":
        cap["fill_cache_slots"] = [[i, 0] for i, _ in cap["fill_cache_slots"]]
    elif fault == "vision run per item":
        vis = [o for o in ops if o["stage"] == "batch_vision"]
        cap["ops"] = vis * (cap["size"] - 1) + ops
    elif fault == "an extra op in decode step 3":
        ops.append(next(o for o in ops if o["stage"] == "batch_decode" and o["step"] == 3))
    elif fault == "positions written per item":
        tr += [t for t in tr if t[1] == "batch_start"] * (cap["size"] - 1)
    else:
        tr += [t for t in tr if t[0] == "d2h"] * (cap["size"] - 1)
    with pytest.raises(AssertionError):
        _check_batch(summarise(raw), raw)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["decode steps per item", "start positions left out", "a prefill per group",
                                   "vision of batch 1 for every size", "a smaller batch decodes max_batch items"])
def test_batch_model_check_fails_on_an_injected_fault(n300_report, fault, monkeypatch):
    """batch_model with one fault injected into its parts (the captures it reads): the sum check must fail."""
    import copy

    import openvla_model.backends.ttnn.op_report as rep

    summary = dict(n300_report)
    summary["batch"] = copy.deepcopy(n300_report["batch"])
    orig = rep.batch_model

    def faulty(s, sizes=None):
        m = orig(s, sizes)
        for r in m["rows"]:
            g = r["group_parts"]
            if fault == "decode steps per item":
                r["batch_ms"] += sum(x["decode_ms"] * (len(x["prefill_ms"]) - 1) for x in g)
            elif fault == "start positions left out":
                r["batch_ms"] -= sum(x["start_ms"] for x in g)
            elif fault == "a prefill per group":
                r["batch_ms"] -= sum(sum(x["prefill_ms"][1:]) for x in g)
            elif fault == "a smaller batch decodes max_batch items":  # the largest capture's step, KV unscaled
                big = max(s["batch"], key=lambda c: c["size"])
                r["batch_ms"] += sum(6 * big["stage_ms"]["decode"] - x["decode_ms"] for x in g
                                     if len(x["prefill_ms"]) not in {c["size"] for c in s["batch"]} | {1})
            else:
                r["batch_ms"] -= sum(x["vision_ms"] - rep.action_model(s)["stage_ms"]["vision"] for x in g)
            r["per_robot_latency_ms"] = r["batch_ms"]
            r["actions_per_s"] = r["batch"] * 1e3 / r["batch_ms"]
        return m
    monkeypatch.setattr(rep, "batch_model", faulty)
    with pytest.raises(AssertionError):
        _check_batch_model(summary, [1, 2, 3, 4])  # 3: a decode step derived from the batch of 4


# ---- SDPA decode's KV read per row at its own position (issue 14) --------------------------------------------------
# Independent expectation: the cache is (max_batch, 32 KV heads / 2 chips, max_seq, 128) bf16 per layer and chip
# (config/ttnn/N300.yaml); decode step k reads, per layer, K and V of rows 0..L+k of each row that holds an item
# (L = its prompt tokens + 256 patches) and, for each idle row (position 0..5 of its own slot), one 32-row chunk.
# The rows that hold items: 1 for the single action, B for a batch of B (what the test ran, not the report's record).


def _kv_step_bytes(seq_lengths, mb):
    import yaml

    prof = yaml.safe_load((HERE.parent / "config" / "ttnn" / "N300.yaml").read_text())
    assert prof["dtypes"]["kv_cache"] == "bfloat16"
    row = 32 // 2 * 128 * 2  # one cache row of one slot, per chip: 16 KV heads x 128 x bf16
    rows = sum(sum(L + k + 1 for L in seq_lengths) + (mb - len(seq_lengths)) * 32 for k in range(6)) / 6
    return 32 * 2 * row * rows  # 32 layers, K and V


def _check_kv(summary, raw):
    """The decode step's KV bytes (single action, each batch) against _kv_step_bytes; AssertionError on mismatch."""
    mb = _max_batch("N300")
    L = 22 + 256  # the report's prompt (22 tokens) + 16 x 16 patches
    assert summary["info"]["sequence_length"] == L
    got = summary["stages"]["decode"].kv_bytes
    assert got == pytest.approx(_kv_step_bytes([L], mb), rel=1e-9), (got, _kv_step_bytes([L], mb))
    for c, rc in zip(summary["batch"], raw["batch"]):
        want = _kv_step_bytes([n + 256 for n in rc["prompt_tokens"]], mb)
        assert c["decode_kv_bytes"] == pytest.approx(want, rel=1e-9), (c["size"], c["decode_kv_bytes"], want)


@pytest.mark.slow
def test_decode_kv_read_per_row_at_its_own_position(n300_report, n300_raw):
    """SDPA decode's KV bytes per step: the rows holding items at their positions, each idle row one chunk."""
    _check_kv(n300_report, n300_raw)
    # what the backend wrote (llm.set_decode_start): one start for the single action, one per item of a batch
    assert n300_raw["info"]["decode_starts"] == [22 + 256]
    assert [c["decode_starts"] for c in n300_raw["batch"]] == [c["sequence_lengths"] for c in n300_raw["batch"]]
    kv = n300_report["stages"]["decode"].kv_bytes
    print(f"\nN300 KV read per decode step, per chip: {kv / 1e6:.1f} MB (every row at the prompt's positions: "
          f"{_kv_step_bytes([22 + 256] * _max_batch('N300'), _max_batch('N300')) / 1e6:.1f} MB)")


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["idle rows charged the prompt's KV", "a batch's idle rows charged its first item's"])
def test_decode_kv_check_fails_on_an_injected_fault(n300_raw, fault):
    """The same check with the recorded rows faulted (every row holding an item at the prompt): it must fail."""
    import copy

    from openvla_model.backends.ttnn.op_report import summarise

    raw = copy.deepcopy(n300_raw)
    mb = _max_batch("N300")
    if fault == "idle rows charged the prompt's KV":
        raw["info"]["decode_starts"] = raw["info"]["decode_starts"] * mb
    else:
        cap = raw["batch"][0]
        cap["decode_starts"] = cap["decode_starts"] + [cap["decode_starts"][0]] * (mb - cap["size"])
    with pytest.raises(AssertionError):
        _check_kv(summarise(raw), raw)


def test_op_report_batch_option_refuses_bad_sizes_in_one_line(capsys):
    """--batch is parsed before any mock run: a bad list exits 2 with one line (openvla-bench's parser)."""
    from openvla_model.backends.ttnn.op_report import main

    assert main(["--mesh-device", "N300", "--batch", "1,x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --batch '1,x'"), err


def test_bench_report_ops_batch_reaches_the_op_report(monkeypatch):
    """`openvla-bench --backend ttnn --mesh-device N300 --report ops --batch 1,2,4`: the op report with those rows."""
    import openvla_model.backends.ttnn.op_report as rep
    from openvla_model import bench

    seen = []
    monkeypatch.setattr(rep, "main", lambda argv: seen.append(list(argv)) or 0)
    assert bench.main(["--backend", "ttnn", "--mesh-device", "N300", "--report", "ops", "--batch", "1,2,4"]) == 0
    assert seen == [["--mesh-device", "N300", "--batch", "1,2,4"]]
