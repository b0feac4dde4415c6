"""openvla-bench: time every stage of one action, for any backend, against transformers' generate().

    openvla-bench [--backend torch|ttnn] [--device cpu|cuda] [--size full|tiny] [--weights DIR]
                  [--runs N] [--json OUT] [--draft none|all|K[,K]]
    openvla-bench --batch 1,2,4,8 [...]   several streams per policy.predict_batch (run_batch)
    openvla-bench --oft [...]             one OpenVLA-OFT pass per chunk beside OpenVLA (run_oft)
    openvla-bench --oft --backend ttnn --mesh-device N300|T3K [--report ops]   the same on TT-NN (a card), or modelled
    openvla-bench --backend ttnn --mesh-device N300|T3K --report ops [--batch 1,2,4]   the op report (mock mesh,
                                          modelled), with --batch its "Several robots" rows for those sizes

Without --weights, `--size full` builds the full OpenVLA-7B shape with RANDOM weights
(initialised on the device in the working dtype; nothing is downloaded) and `--size tiny` writes
the tiny random checkpoint. One run = one action on a 640x480 frame: image conversion (a bgr8
sensor_msgs/Image through the node's converter, when run as `openvla-bench`), preprocessing, vision, projector, prefill, each decode step, detokenize, total. Every stage is
bracketed by a device synchronisation (or CUDA events for the fast path, which never syncs
between stages); WARMUP_RUNS runs per path are excluded; median and p95 over --runs.

In the same run, on the same weights and inputs: the torch reference path (transformers Llama,
DynamicCache), the fast path (graphs, static cache; see backends/torch_cuda.py), and the plain
transformers generate() path (inputs_embeds = [BOS, patches, prompt[1:]], greedy, 7 new tokens),
with the speed ratios, peak GPU memory, and a token-agreement check (with logit margins for any
mismatch) over several images and prompts.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WARMUP_RUNS = 3
DEFAULT_RUNS = 20
UNNORM_KEY = "bridge_orig"
FRAME_HEIGHT, FRAME_WIDTH = 480, 640
INSTRUCTIONS = (
    "pick up the red cup",
    "put the blue block into the open drawer on the left of the sink next to the yellow towel",
)
AGREEMENT_SEEDS = (0, 1, 2, 3)

log = logging.getLogger("openvla_model")


# -- inputs ------------------------------------------------------------------------------------

class FrameSource:
    """What one run starts from. The model package knows no ROS messages: by default a run starts
    from the RGB array (no conversion stage). `openvla-bench` (openvla_ros.bench) passes the
    node's sensor_msgs/Image conversion so the benchmark covers it too."""

    def __init__(self, make=None, convert=None, name: str = "none (starts from an RGB array)"):
        self.make = make or (lambda rgb: rgb)
        self.convert = convert or (lambda frame: frame)
        self.name = name


def prepare_model_dir(size: str, weights: str | None, tmp: Path):
    """-> (weights dir, checkpoint, source description)."""
    from .checkpoint import Checkpoint

    if weights:
        return Path(weights), Checkpoint(weights), f"checkpoint {weights}"
    if size == "tiny":
        from .tiny_checkpoint import write_tiny_checkpoint

        d = write_tiny_checkpoint(tmp / "tiny", seed=0)
        return d, Checkpoint(d), "tiny random checkpoint"
    from .full_config import RandomCheckpoint, write_full_config

    d = write_full_config(tmp / "full")
    return d, RandomCheckpoint(seed=0), "full size (7.54 B parameters), random weights"


# -- timing helpers ----------------------------------------------------------------------------

def summarise(values) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"median_ms": float(np.median(a)), "p95_ms": float(np.percentile(a, 95)), "mean_ms": float(a.mean()),
            "min_ms": float(a.min()), "n": int(a.size)}


def make_sync(device):
    import torch

    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _action_runner(generate, pre, convert, codec, sync):
    """One end-to-end action: msg -> {stage: ms}. generate(px) -> (tokens, {stage: ms})."""
    clock = time.perf_counter

    def once(msg) -> dict:
        sync()
        t0 = clock()
        rgb = convert(msg)
        t1 = clock()
        px = pre(rgb)
        sync()
        t2 = clock()
        tokens, tm = generate(px)
        t3 = clock()
        codec.unnormalize(codec.decode_tokens(tokens).normalized, UNNORM_KEY)
        t4 = clock()
        return {"image_conversion": (t1 - t0) * 1e3, "preprocess": (t2 - t1) * 1e3, **tm,
                "backend_wall": (t3 - t2) * 1e3, "detokenize": (t4 - t3) * 1e3, "total": (t4 - t0) * 1e3}

    return once


def backend_runner(backend, pre, convert, ids, n, codec, sync):
    """One end-to-end action through a backend (its decode steps timed when it reports them)."""
    def generate(px):
        tokens, tm = backend.generate(px, ids, n)
        steps = getattr(backend, "last_decode_steps_ms", None) or []
        return tokens, {**tm, **{f"decode_step_{k + 1}": ms for k, ms in enumerate(steps)}}

    return _action_runner(generate, pre, convert, codec, sync)


def draft_runner(backend, pre, convert, ids, n, codec, sync, k: int, want_of: dict):
    """One action with a speculative draft built so that exactly k drafts are accepted (the true
    greedy tokens of that frame, corrupted at position k+1). Checks greedy-exactness every run:
    the tokens must equal the plain path's and the backend must report k accepted."""
    from .speculative import draft_accepting

    state = {}

    def generate(px):
        want = state["want"]
        tokens, tm = backend.generate(px, ids, n, draft=draft_accepting(want, k))
        if not np.array_equal(np.asarray(tokens), want) or backend.last_accepted != k:
            raise RuntimeError(f"speculative path with {k} accepted drafts gave tokens {list(tokens)} "
                               f"(accepted {backend.last_accepted}), plain path {list(want)}")
        steps = getattr(backend, "last_decode_steps_ms", None) or []
        return tokens, {**tm, **{f"decode_step_{j + 1}": ms for j, ms in enumerate(steps)}}

    once = _action_runner(generate, pre, convert, codec, sync)

    def run(msg) -> dict:
        state["want"] = want_of[id(msg)]
        return once(msg)

    return run


def parse_draft(value: str) -> list[int]:
    """--draft: none | all | k | a comma list of k (0..6). -> the accepted counts to time."""
    ks = []
    for part in value.split(","):
        part = part.strip().lower()
        if part == "none":
            continue
        k = 6 if part == "all" else int(part) if part.isdigit() else -1
        if not 0 <= k <= 6:
            raise ValueError(f"--draft {value!r}: use none, all, or accepted counts 0..6 (e.g. 0,3,6)")
        if k not in ks:
            ks.append(k)
    return ks


def _embed_sequence(modules, px, ids, device, dtype):
    """[emb(BOS), projected patches, emb(prompt[1:])] exactly as the reference builds it."""
    from .modeling import multimodal_embeddings

    projected = modules.projector(modules.vision(px.to(device, dtype)))
    return multimodal_embeddings(modules.llm, projected, np.asarray(ids))


def hf_generate(modules, px, ids, n: int, pad_id: int, device, dtype, sync, with_logits: bool = False):
    """The plain transformers path: vision + projector, then LlamaForCausalLM.generate() on the
    multimodal inputs_embeds (greedy, n new tokens). Returns (tokens, {stage: ms}), plus the raw
    float32 (n, vocab) logits of each step when with_logits."""
    import torch
    from transformers import GenerationConfig

    clock = time.perf_counter
    t0 = clock()
    seq = _embed_sequence(modules, px, ids, device, dtype)
    sync()
    t1 = clock()
    gc = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1,
                          pad_token_id=pad_id, bos_token_id=1, eos_token_id=None)
    extra = {"return_dict_in_generate": True, "output_logits": True} if with_logits else {}
    out = modules.llm.generate(inputs_embeds=seq, attention_mask=torch.ones(seq.shape[:2], dtype=torch.long,
                                                                            device=device),
                               generation_config=gc, **extra)
    seqs = out.sequences if with_logits else out
    tokens = seqs[0, -n:].cpu().numpy().astype(np.int64)
    t2 = clock()
    times = {"vision+projector": (t1 - t0) * 1e3, "generate": (t2 - t1) * 1e3}
    if with_logits:
        return tokens, times, torch.cat([lg.float() for lg in out.logits], dim=0).cpu()
    return tokens, times


def hf_runner(modules, pre, convert, ids, n, codec, pad_id, device, dtype, sync):
    """One end-to-end action through transformers' generate()."""
    import torch

    def generate(px):
        with torch.inference_mode():
            return hf_generate(modules, px, ids, n, pad_id, device, dtype, sync)

    return _action_runner(generate, pre, convert, codec, sync)


def time_interleaved(runners, msgs, runs: int, runs_of=None) -> dict:
    """Time the (already warmed-up) paths round-robin (run i of every path, then run i+1), so a
    slower or busier moment of the machine hits all paths alike. runs_of: fewer runs for some
    paths. -> {name: {stage: [ms]}}."""
    runs_of = runs_of or {}
    rec = {name: {} for name, _ in runners}
    for i in range(runs):
        for name, once in runners:
            if i >= runs_of.get(name, runs):
                continue
            for k, v in once(msgs[i % len(msgs)]).items():
                rec[name].setdefault(k, []).append(float(v))
    return rec


def teacher_forced_logits(modules, px, ids, tokens, device, dtype):
    """The reference model's logits for each of the given tokens, in one full forward over
    [BOS, patches, prompt[1:], tokens[:-1]] (no cache): float32 (n, vocab) on the CPU."""
    import torch

    with torch.inference_mode():
        seq = _embed_sequence(modules, px, ids, device, dtype)
        llm = modules.llm
        prev = torch.as_tensor(np.asarray(tokens[:-1], dtype=np.int64), device=device).view(1, -1)
        seq = torch.cat([seq, llm.get_input_embeddings()(prev)], dim=1)
        pos = torch.arange(seq.shape[1], device=device).view(1, -1)
        out = llm(inputs_embeds=seq, position_ids=pos, use_cache=False, logits_to_keep=len(tokens))
        return out.logits[0].float().cpu()


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def _margin(logits_row) -> float:
    top = logits_row.topk(2).values
    return float(top[0] - top[1])


def check_agreement(fast, ref, pre_ref, pre_fast, tokenizer, config, device, dtype, sync) -> dict:
    """Tokens of fast vs reference vs transformers generate() on the same pixels (the reference
    preprocessing), over AGREEMENT_SEEDS x INSTRUCTIONS; margins and the first mismatch's logits."""
    import torch

    from .synthetic import synthetic_rgb

    n = config.action_dim
    cases = []
    with torch.inference_mode():
        for seed in AGREEMENT_SEEDS:
            rgb = synthetic_rgb(seed, FRAME_HEIGHT, FRAME_WIDTH)
            px = pre_ref(rgb)
            for instr in INSTRUCTIONS:
                ids = tokenizer.encode_prompt(instr)
                ref_tok, _ = ref.generate(px, ids, n)
                case = {"image_seed": seed, "instruction": instr, "prompt_tokens": int(ids.size),
                        "reference": ref_tok.tolist()}
                tf = teacher_forced_logits(ref.modules, px, ids, ref_tok, device, dtype)
                case["reference_margins"] = [_sig(_margin(tf[j])) for j in range(n)]
                hf_tok, _, hf_logits = hf_generate(ref.modules, px, ids, n, config.pad_token_id, device, dtype, sync,
                                                   with_logits=True)
                case["hf_generate"] = hf_tok.tolist()
                case["hf_equal"] = bool(np.array_equal(hf_tok, ref_tok))
                if case["hf_equal"]:
                    # the noise floor: a KV-cached decode of the SAME model code vs one full forward
                    case["hf_vs_reference_max_abs_logit_diff"] = _sig(float((hf_logits - tf).abs().max()))
                if fast is not None:
                    fast_tok, _ = fast.generate(px, ids, n)
                    fl = fast.last_logits(n)
                    case["fast"] = fast_tok.tolist()
                    case["fast_equal"] = bool(np.array_equal(fast_tok, ref_tok))
                    diff = np.nonzero(fast_tok != ref_tok)[0]
                    k = int(diff[0]) if diff.size else n
                    # logits are comparable up to (and including) the first differing step
                    upto = min(k + 1, n)
                    case["fast_vs_reference_max_abs_logit_diff"] = _sig(float((fl[:upto] - tf[:upto]).abs().max()))
                    case["logit_scale"] = _sig(float(tf.std()))
                    if diff.size:
                        a, b = int(ref_tok[k]), int(fast_tok[k])
                        case["first_mismatch"] = {
                            "step": k, "reference_token": a, "fast_token": b,
                            "reference_logit_gap": _sig(float(tf[k, a] - tf[k, b])),
                            "fast_logit_gap": _sig(float(fl[k, b] - fl[k, a]))}
                    if pre_fast is not None and pre_fast.device.type != "cpu":
                        px_dev = pre_fast(rgb)
                        case["device_preprocess_max_abs_diff"] = _sig(float((px_dev.float().cpu() - px.float())
                                                                            .abs().max()))
                        e2e, _ = fast.generate(px_dev, ids, n)
                        case["fast_with_device_preprocess_equal"] = bool(np.array_equal(e2e, ref_tok))
                cases.append(case)
    floor = [c["hf_vs_reference_max_abs_logit_diff"] for c in cases if "hf_vs_reference_max_abs_logit_diff" in c]
    out = {"cases": cases, "hf_equal": sum(c["hf_equal"] for c in cases), "n_cases": len(cases),
           "hf_max_abs_logit_diff": max(floor) if floor else None,
           "min_reference_margin": min(min(c["reference_margins"]) for c in cases)}
    if fast is not None:
        out["fast_equal"] = sum(c["fast_equal"] for c in cases)
        out["max_abs_logit_diff"] = max(c["fast_vs_reference_max_abs_logit_diff"] for c in cases)
        if any("fast_with_device_preprocess_equal" in c for c in cases):
            out["fast_with_device_preprocess_equal"] = sum(c.get("fast_with_device_preprocess_equal", False)
                                                           for c in cases)
    return out


# -- report ------------------------------------------------------------------------------------

STAGE_ORDER = ["image_conversion", "preprocess", "vision", "projector", "vision+projector", "prefill"]


def _stage_rows(paths: dict) -> list[str]:
    keys = []
    for rec in paths.values():
        for k in rec["stages"]:
            if k not in keys:
                keys.append(k)
    steps = sorted([k for k in keys if k.startswith("decode_step_")], key=lambda k: int(k.rsplit("_", 1)[1]))
    ordered = [k for k in STAGE_ORDER if k in keys] + steps
    ordered += [k for k in ("decode", "generate", "detokenize", "backend_wall", "total") if k in keys]
    return ordered


def format_table(report: dict) -> str:
    paths = report["paths"]
    names = list(paths)
    lines = []
    head = f"{'stage (ms)':<20}" + "".join(f"{n + ('*' if paths[n].get('default') else ''):>24}" for n in names)
    lines.append(head)
    lines.append(f"{'':<20}" + "".join(f"{'median':>14}{'p95':>10}" for _ in names))
    for stage in _stage_rows(paths):
        cells = []
        for n in names:
            s = paths[n]["stages"].get(stage)
            cells.append(f"{s['median_ms']:>14.2f}{s['p95_ms']:>10.2f}" if s else f"{'-':>14}{'':>10}")
        lines.append(f"{stage:<20}" + "".join(cells))
    return "\n".join(lines)


def _env_info(device) -> dict:
    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": str(device), "host": platform.node()}
    try:
        import timm

        info["timm"] = timm.__version__
    except Exception:
        pass
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(card=p.name, card_memory_gb=round(p.total_memory / 1e9, 1), cuda=torch.version.cuda)
    else:
        info["card"] = f"CPU ({os.cpu_count()} logical cores visible)"
    return info


def _gb(x) -> float:
    return round(x / 1e9, 3)


def choose_dtype(config, device):
    """-> (dtype, tiny_cpu). The policy's default (float32 on a CPU) except for a large model on a
    CPU: a 7B model in float32 would need 30 GB of host memory, so it runs in bfloat16 there."""
    from .backends.torch_backend import resolve_dtype

    llm_params = 12 * config.llm.num_hidden_layers * config.llm.hidden_size ** 2
    tiny_cpu = device.type == "cpu" and llm_params < 1e9
    if device.type == "cuda" or tiny_cpu:
        return resolve_dtype(None, device), tiny_cpu
    return resolve_dtype("bfloat16", device), tiny_cpu


def load_paths(args, config, checkpoint, device, dtype, report: dict):
    """The reference backend plus the path under test (the fast torch path, or args.backend).
    -> (ref, fast or None, paths [(name, backend, preprocessor, default)], CPU preprocessor,
    the fast path's preprocessor or None). Records load times in the report."""
    from .backends import create_backend
    from .backends.torch_backend import TorchBackend
    from .backends.torch_cuda import FastTorchBackend, use_fast_path
    from .preprocess import Preprocessor

    pre_cpu = Preprocessor(config, device="cpu")
    t = time.perf_counter()
    ref = TorchBackend(config, checkpoint, device=str(device), dtype=dtype)
    report["load_s"] = round(time.perf_counter() - t, 2)
    if args.backend == "torch":
        t = time.perf_counter()
        fast = FastTorchBackend(config, reference=ref)
        report["fast_setup_s"] = round(time.perf_counter() - t, 2)
        pre_fast = Preprocessor(config, device=fast.preprocess_device)
        default_fast = use_fast_path(device)
        paths = [("torch-fast", fast, pre_fast, default_fast), ("torch-reference", ref, pre_cpu, not default_fast)]
        return ref, fast, paths, pre_cpu, pre_fast
    mesh = getattr(args, "mesh_device", None) or os.environ.get("MESH_DEVICE")
    be = create_backend(args.backend, config, checkpoint, device=str(device), mesh_device=mesh)
    pre_be = Preprocessor(config, device=getattr(be, "preprocess_device", "cpu"))
    paths = [(args.backend, be, pre_be, True), ("torch-reference", ref, pre_cpu, False)]
    return ref, None, paths, pre_cpu, None


def warm_up(runners, msgs, slow_names, device) -> dict:
    """WARMUP_RUNS actions per path (1 for the slow ones), and on CUDA each path's peak memory over
    one more action, before the next path runs. -> {name: memory figures} (empty on a CPU)."""
    import torch

    memory = {}
    for name, once in runners:
        for i in range(1 if name in slow_names else WARMUP_RUNS):
            once(msgs[i % len(msgs)])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            once(msgs[0])
            free, total = torch.cuda.mem_get_info(device)
            memory[name] = {"peak_allocated_gb": _gb(torch.cuda.max_memory_allocated(device)),
                            "peak_reserved_gb": _gb(torch.cuda.max_memory_reserved(device)),
                            "device_used_gb": _gb(total - free)}
    return memory


def speed_summary(paths_report: dict, main_name: str) -> tuple[dict, dict]:
    """-> (ratios of the other paths to the main one, actions/s per path), from median totals."""
    med = {k: v["stages"]["total"]["median_ms"] for k, v in paths_report.items()}
    model = {k: v["stages"]["backend_wall"]["median_ms"] for k, v in paths_report.items()}
    ratios = {
        f"hf-generate / {main_name} (total)": round(med["hf-generate"] / med[main_name], 2),
        f"hf-generate / {main_name} (model only)": round(model["hf-generate"] / model[main_name], 2),
        f"torch-reference / {main_name} (total)": round(med["torch-reference"] / med[main_name], 2),
    }
    return ratios, {k: round(1e3 / v, 2) for k, v in med.items()}


def run(args, frames: FrameSource | None = None) -> dict:
    import torch

    from .backends.torch_backend import resolve_device
    from .config import load_config
    from .policy import action_codec
    from .prompt import PromptTokenizer
    from .synthetic import synthetic_rgb

    device = resolve_device(args.device)
    sync = make_sync(device)
    cuda = device.type == "cuda"
    tmp = Path(tempfile.mkdtemp(prefix="openvla_bench_"))
    wdir, checkpoint, source = prepare_model_dir(args.size, args.weights, tmp)
    config = load_config(wdir)
    dtype, tiny_cpu = choose_dtype(config, device)
    tokenizer = PromptTokenizer(wdir)
    codec = action_codec(config)
    n = config.action_dim
    frames = frames or FrameSource()
    convert = frames.convert
    msgs = [frames.make(synthetic_rgb(s, FRAME_HEIGHT, FRAME_WIDTH)) for s in AGREEMENT_SEEDS]
    ids = tokenizer.encode_prompt(INSTRUCTIONS[0])
    report = {"tool": "openvla-bench", "backend": args.backend, "size": args.size, "weights": source,
              "dtype": str(dtype).replace("torch.", ""), "runs": args.runs, "warmup_runs": WARMUP_RUNS,
              "instruction": INSTRUCTIONS[0], "prompt_tokens": int(ids.size),
              "sequence_length": int(ids.size + config.num_patches), "new_tokens": n,
              "frame": f"{FRAME_WIDTH}x{FRAME_HEIGHT}", "image_conversion": frames.name,
              "env": _env_info(device), "paths": {}, "memory": {}}

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    ref, fast, paths, pre_cpu, pre_fast = load_paths(args, config, checkpoint, device, dtype, report)
    if cuda:
        report["memory"]["load_peak_allocated_gb"] = _gb(torch.cuda.max_memory_allocated(device))

    # A full-size torch model on a CPU (the comparison beside a ttnn backend without a GPU) takes
    # many seconds per action: time it with fewer runs (recorded in the report).
    slow_torch = device.type == "cpu" and not tiny_cpu
    ref_runs = min(args.runs, 3) if slow_torch else args.runs
    report["torch_reference_runs"] = ref_runs
    runners = [(name, backend_runner(backend, pre, convert, ids, n, codec, sync)) for name, backend, pre, _ in paths]
    runners.append(("hf-generate", hf_runner(ref.modules, pre_cpu, convert, ids, n, codec, config.pad_token_id,
                                             device, dtype, sync)))
    main_name, main_backend, main_pre, _ = paths[0]
    drafts = args.draft_ks if getattr(main_backend, "supports_draft", False) else []
    if args.draft_ks and not drafts:
        print(f"[bench] {main_name} does not verify drafts: --draft ignored", file=sys.stderr)
    if drafts:
        want_of = {id(m): np.asarray(main_backend.generate(main_pre(convert(m)), ids, n)[0]) for m in msgs}
        runners += [(f"{main_name}+draft{k}", draft_runner(main_backend, main_pre, convert, ids, n, codec, sync, k,
                                                            want_of)) for k in drafts]
    report["drafts"] = drafts
    describe = {name: backend.describe() for name, backend, _, _ in paths}
    describe.update({f"{main_name}+draft{k}": {"path": f"{main_name} with a draft of which {k} are accepted"}
                     for k in drafts})
    describe["hf-generate"] = {"path": "transformers LlamaForCausalLM.generate (greedy, DynamicCache)"}
    default = {name: d for name, _, _, d in paths}
    slow_names = {name for name, _ in runners if slow_torch and (name.startswith("torch") or name == "hf-generate")}

    t = time.perf_counter()
    memory = warm_up(runners, msgs, slow_names, device)
    rec = time_interleaved(runners, msgs, args.runs, {name: ref_runs for name in slow_names})
    report["timing_wall_s"] = round(time.perf_counter() - t, 2)
    for name, _ in runners:
        report["paths"][name] = {"default": default.get(name, False), "describe": describe[name],
                                 "stages": {k: summarise(v) for k, v in rec[name].items()}, **memory.get(name, {})}
        print(f"[bench] {name}: total median {report['paths'][name]['stages']['total']['median_ms']:.2f} ms",
              file=sys.stderr, flush=True)
    report["ratios"], report["actions_per_s"] = speed_summary(report["paths"], paths[0][0])
    med = {k: v["stages"]["total"]["median_ms"] for k, v in report["paths"].items()}
    for k in drafts:
        report["ratios"][f"{main_name}+draft{k} / {main_name} (total)"] = round(med[f"{main_name}+draft{k}"]
                                                                              / med[main_name], 3)

    report["agreement"] = check_agreement(fast, ref, pre_cpu, pre_fast, tokenizer, config, device, dtype, sync)
    for _, backend, _, _ in paths:
        backend.close()
    return report


# -- --batch: several streams in one predict_batch ------------------------------------------

def parse_batch(value: str) -> list[int]:
    """--batch: a comma list of batch sizes (1..64), e.g. 1,2,4,8 -> sorted, with 1 (the baseline
    of the ratios) added when missing."""
    sizes = set()
    for part in value.split(","):
        part = part.strip()
        b = int(part) if part.isdigit() else -1
        if not 1 <= b <= 64:
            raise ValueError(f"--batch {value!r}: use batch sizes 1..64, comma separated (e.g. 1,2,4,8)")
        sizes.add(b)
    return sorted(sizes | {1})


def _percentiles(values) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)), "n": int(a.size)}


def run_batch(args, frames: FrameSource | None = None) -> dict:
    """Per batch size B: B streams' frames (distinct images, prompts of two lengths) converted and
    run as one policy.predict_batch, as the node's batcher does. Latency per action = the whole
    call (every stream waits for the batch); aggregate actions/s = B / median latency."""
    from .backends import create_backend
    from .backends.torch_backend import resolve_device
    from .config import load_config
    from .policy import BatchItem, assemble_policy
    from .synthetic import synthetic_rgb

    device = resolve_device(args.device)
    sync = make_sync(device)
    tmp = Path(tempfile.mkdtemp(prefix="openvla_bench_"))
    wdir, checkpoint, source = prepare_model_dir(args.size, args.weights, tmp)
    config = load_config(wdir)
    dtype, _ = choose_dtype(config, device)
    frames = frames or FrameSource()
    sizes = args.batch_sizes
    t = time.perf_counter()
    be = create_backend(args.backend, config, checkpoint, device=str(device), dtype=dtype,
                        mesh_device=getattr(args, "mesh_device", None) or os.environ.get("MESH_DEVICE"))
    load_s = time.perf_counter() - t
    policy = assemble_policy(config, be, default_unnorm_key=UNNORM_KEY)
    msgs = [frames.make(synthetic_rgb(j, FRAME_HEIGHT, FRAME_WIDTH)) for j in range(max(sizes))]
    instructions = [INSTRUCTIONS[j % len(INSTRUCTIONS)] for j in range(max(sizes))]

    def runner(b: int):
        def once(_msg) -> dict:
            sync()
            t0 = time.perf_counter()
            items = [BatchItem(frames.convert(msgs[j]), instructions[j]) for j in range(b)]
            outcomes = policy.predict_batch(items)
            sync()
            wall = (time.perf_counter() - t0) * 1e3
            bad = [o for o in outcomes if isinstance(o, Exception)]
            if bad:
                raise bad[0]
            stages = {k: v for k, v in outcomes[0].timings_ms.items() if k not in ("preprocess", "total")}
            return {"latency": wall, **stages}

        return once

    # greedy-exactness per item: each stream's tokens in the batch == predict() of it alone
    alone = [policy.predict(frames.convert(msgs[j]), instructions[j]).tokens for j in range(max(sizes))]
    equal = {}
    for b in sizes:
        got = policy.predict_batch([BatchItem(frames.convert(msgs[j]), instructions[j]) for j in range(b)])
        equal[b] = sum(bool(np.array_equal(got[j].tokens, alone[j])) for j in range(b))
    runners = [(f"batch{b}", runner(b)) for b in sizes]
    t = time.perf_counter()
    for _, once in runners:
        for i in range(WARMUP_RUNS):
            once(None)
    rec = time_interleaved(runners, [None], args.runs)
    wall = time.perf_counter() - t
    results = {}
    for b in sizes:
        r = rec[f"batch{b}"]
        lat = _percentiles(r["latency"])
        results[str(b)] = {"latency_ms": lat, "actions_per_s": round(b * 1e3 / lat["p50_ms"], 3),
                           "stages_median_ms": {k: float(np.median(v)) for k, v in r.items() if k != "latency"},
                           "tokens_equal_alone": f"{equal[b]}/{b}"}
    base = results["1"]
    for b in sizes:
        r = results[str(b)]
        r["throughput_vs_batch1"] = round(r["actions_per_s"] / base["actions_per_s"], 3)
        r["latency_vs_batch1"] = round(r["latency_ms"]["p50_ms"] / base["latency_ms"]["p50_ms"], 3)
    report = {"tool": "openvla-bench", "mode": "batch", "backend": args.backend, "size": args.size,
              "weights": source, "dtype": str(dtype).replace("torch.", ""), "runs": args.runs,
              "warmup_runs": WARMUP_RUNS, "batch_sizes": sizes, "frame": f"{FRAME_WIDTH}x{FRAME_HEIGHT}",
              "image_conversion": frames.name, "instructions": list(INSTRUCTIONS), "env": _env_info(device),
              "describe": be.describe(), "batched_backend": hasattr(be, "generate_batch"),
              "load_s": round(load_s, 2), "timing_wall_s": round(wall, 2), "results": results}
    policy.close()
    return report


def print_batch_report(report: dict) -> None:
    env, d = report["env"], report["describe"]
    how = "one generate_batch call per batch" if report["batched_backend"] else \
        "NO generate_batch on this backend: predict_batch runs one generate per item"
    print(f"openvla-bench --batch: backend {d.get('backend')} ({d.get('path', 'reference')}; {how}), "
          f"{report['weights']}, {report['dtype']}, on {env['card']} (torch {env['torch']})")
    print(f"B streams = B distinct {report['frame']} frames, prompts of two lengths alternating, converted and run as "
          f"one policy.predict_batch; {report['runs']} runs per batch size (round-robin) after "
          f"{report['warmup_runs']} warm-up runs; latency = the whole call (what each stream waits)")
    print(f"{'batch':>5}{'latency p50 ms':>16}{'p95 ms':>10}{'per action ms':>15}{'actions/s':>11}"
          f"{'x batch-1 actions/s':>21}{'x batch-1 latency':>19}{'tokens == alone':>17}")
    for b, r in report["results"].items():
        lat = r["latency_ms"]
        print(f"{b:>5}{lat['p50_ms']:>16.2f}{lat['p95_ms']:>10.2f}{lat['p50_ms'] / int(b):>15.2f}"
              f"{r['actions_per_s']:>11.2f}{r['throughput_vs_batch1']:>21.2f}{r['latency_vs_batch1']:>19.2f}"
              f"{r['tokens_equal_alone']:>17}")


# -- --oft: one OpenVLA-OFT pass per action chunk beside plain OpenVLA -------------------------

def random_oft_policy(config_dir, checkpoint, device, dtype: str, seed: int = 0, mesh_device: str | None = None):
    """An OpenVLA-OFT policy on a weights-less config directory (write_full_config) and a
    RandomCheckpoint: random backbone, random L1 head and proprio projector, LIBERO-shaped
    statistics (8 x 7 chunk, 8 proprio values), on the path load_oft_policy would choose for the
    device (FastOFTModel on CUDA), or on the TT-NN mesh `mesh_device` (TtnnOFTModel) when given.
    For speed figures only: meaningless actions."""
    from dataclasses import replace

    import torch

    from .action_codec import ActionCodec
    from .config import load_config
    from .oft import L1RegressionActionHead, OFTTorchModel, ProprioProjector, resolve_spec
    from .oft_checkpoint import TINY_OFT_STATS
    from .oft_policy import OFTPolicy
    from .preprocess import Preprocessor
    from .prompt import PromptTokenizer

    config = replace(load_config(config_dir), norm_stats=TINY_OFT_STATS)
    stats = next(iter(TINY_OFT_STATS.values()))
    llm_dim = int(config.llm.hidden_size)
    torch.manual_seed(seed)
    head = L1RegressionActionHead(llm_dim, llm_dim, len(stats["action"]["q01"]))
    proj = ProprioProjector(len(stats["proprio"]["q01"]), llm_dim)
    spec = resolve_spec(TINY_OFT_STATS, head_action_dim=head.action_dim, projector_dim=proj.fc1.in_features)
    codec = ActionCodec(TINY_OFT_STATS, vocab_size=config.action_vocab_size, n_bins=config.n_action_bins)
    if mesh_device:
        from .backends.ttnn.oft import TtnnOFTModel

        model = TtnnOFTModel(config, checkpoint, spec, head, proj, codec, mesh_device=mesh_device)
        return OFTPolicy(config, spec, model, PromptTokenizer(config_dir), Preprocessor(config, device="cpu"),
                         "random (LIBERO-shaped statistics)")
    model = OFTTorchModel(config, checkpoint, spec, head, proj, codec, device=device, dtype=dtype)
    from .backends.torch_cuda import FastOFTModel, use_fast_path

    if use_fast_path(model.device):  # as load_oft_policy: the fast path on CUDA ($OPENVLA_TORCH_FAST overrides)
        model = FastOFTModel(model)
    pre = Preprocessor(config, device=getattr(model, "preprocess_device", "cpu"))
    return OFTPolicy(config, spec, model, PromptTokenizer(config_dir), pre, "random (LIBERO-shaped statistics)")


def _oft_checkpoint_dir(args, tmp: Path):
    """--oft with --weights (must be an OpenVLA-OFT checkpoint) or --size tiny (a tiny random OFT
    checkpoint written under tmp) -> (weights dir, source description)."""
    from .errors import ConfigError
    from .oft import checkpoint_kind

    if args.weights:
        wdir = Path(args.weights)
        if checkpoint_kind(wdir) != "oft":
            raise ConfigError(f"--oft: {wdir} is not an OpenVLA-OFT checkpoint (no action head or proprio "
                              "projector file beside the HF files)")
        return wdir, f"checkpoint {args.weights}"
    from .oft_checkpoint import write_tiny_oft_checkpoint

    return write_tiny_oft_checkpoint(tmp / "tiny_oft", seed=0), "tiny random OFT checkpoint"


def run_oft(args, frames: FrameSource | None = None) -> dict:
    """Time one OFT pass (a whole chunk) and one plain OpenVLA action on the same backbone and
    frames: per chunk, per action (chunk / T), and the ratio to plain OpenVLA per action."""
    if getattr(args, "backend", "torch") == "ttnn":
        return run_oft_ttnn(args, frames)
    from .backends import create_backend
    from .backends.torch_backend import resolve_device
    from .checkpoint import Checkpoint
    from .config import load_config
    from .policy import assemble_policy
    from .synthetic import synthetic_rgb

    device = resolve_device(args.device)
    sync = make_sync(device)
    tmp = Path(tempfile.mkdtemp(prefix="openvla_bench_"))
    t = time.perf_counter()
    if args.weights or args.size == "tiny":
        from .oft_policy import load_oft_policy

        wdir, source = _oft_checkpoint_dir(args, tmp)
        config = load_config(wdir)
        dtype, _ = choose_dtype(config, device)
        dt = str(dtype).replace("torch.", "")
        oft = load_oft_policy(wdir, device=str(device), dtype=dt)
        checkpoint = Checkpoint(wdir)
    else:
        from .full_config import RandomCheckpoint, write_full_config

        wdir = write_full_config(tmp / "full")
        config = load_config(wdir)
        dtype, _ = choose_dtype(config, device)
        dt = str(dtype).replace("torch.", "")
        oft = random_oft_policy(wdir, RandomCheckpoint(seed=0), str(device), dt)
        checkpoint, source = RandomCheckpoint(seed=0), "full size, random weights (OFT: random head and projector)"
    oft_load_s = time.perf_counter() - t
    t = time.perf_counter()
    be = create_backend("torch", config, checkpoint, device=str(device), dtype=dt)
    plain_key = UNNORM_KEY if UNNORM_KEY in config.norm_stats else sorted(config.norm_stats)[0]
    plain = assemble_policy(config, be, default_unnorm_key=plain_key)
    plain_load_s = time.perf_counter() - t
    frames = frames or FrameSource()
    spec = oft.spec
    n_images = spec.num_images_in_input or 2  # LIBERO's configuration: primary + wrist camera
    msgs = [frames.make(synthetic_rgb(j, FRAME_HEIGHT, FRAME_WIDTH)) for j in range(n_images)]
    oft_key = sorted(oft.config.norm_stats)[0]
    stats = oft.config.norm_stats[oft_key]
    proprio = None
    if oft.uses_proprio:  # a state in the middle of the recorded range
        lo, hi = (np.asarray(stats["proprio"][q], np.float64) for q in ("q01", "q99"))
        proprio = (lo + hi) / 2
    instruction = INSTRUCTIONS[0]

    def oft_once(_msg) -> dict:
        sync()
        t0 = time.perf_counter()
        images = [frames.convert(m) for m in msgs[:n_images]]
        chunk = oft.predict_chunk(images, instruction, proprio=proprio, unnorm_key=oft_key)
        sync()
        return {"total": (time.perf_counter() - t0) * 1e3,
                **{k: v for k, v in chunk.timings_ms.items() if k != "total"}}

    def plain_once(_msg) -> dict:
        sync()
        t0 = time.perf_counter()
        r = plain.predict(frames.convert(msgs[0]), instruction)
        sync()
        return {"total": (time.perf_counter() - t0) * 1e3,
                **{k: v for k, v in r.timings_ms.items() if k != "total"}}

    runners = [("oft-chunk", oft_once), ("openvla-action", plain_once)]
    for _, once in runners:
        for _ in range(WARMUP_RUNS):
            once(None)
    t = time.perf_counter()
    rec = time_interleaved(runners, [None], args.runs)
    wall = time.perf_counter() - t
    chunk_ms = summarise(rec["oft-chunk"]["total"])
    plain_ms = summarise(rec["openvla-action"]["total"])
    steps = spec.num_actions_chunk
    per_action = chunk_ms["median_ms"] / steps
    report = {"tool": "openvla-bench", "mode": "oft", "size": args.size, "weights": source,
              "dtype": dt, "runs": args.runs, "warmup_runs": WARMUP_RUNS, "instruction": instruction,
              "frame": f"{FRAME_WIDTH}x{FRAME_HEIGHT}", "image_conversion": frames.name, "env": _env_info(device),
              "oft": {"describe": oft.describe(), "num_images": n_images, "proprio": proprio is not None,
                      "chunk": steps, "action_dim": spec.action_dim, "load_s": round(oft_load_s, 2),
                      "chunk_ms": chunk_ms, "per_action_ms": round(per_action, 4),
                      "stages_median_ms": {k: float(np.median(v)) for k, v in rec["oft-chunk"].items()}},
              "openvla": {"describe": be.describe(), "load_s": round(plain_load_s, 2), "action_ms": plain_ms,
                          "stages_median_ms": {k: float(np.median(v)) for k, v in rec["openvla-action"].items()}},
              "ratios": {"openvla action / oft chunk": round(plain_ms["median_ms"] / chunk_ms["median_ms"], 3),
                         "openvla action / oft per action": round(plain_ms["median_ms"] / per_action, 3)},
              "timing_wall_s": round(wall, 2)}
    oft.close()
    plain.close()
    return report


def _load_oft_ttnn(args, mesh, tmp: Path):
    """-> (OFT policy on the TT-NN mesh, weights dir, checkpoint, source description)."""
    if args.weights or args.size == "tiny":
        from .checkpoint import Checkpoint
        from .oft_policy import load_oft_policy

        wdir, source = _oft_checkpoint_dir(args, tmp)
        return load_oft_policy(wdir, backend="ttnn", mesh_device=mesh), wdir, Checkpoint(wdir), source
    from .full_config import RandomCheckpoint, write_full_config

    wdir = write_full_config(tmp / "full")
    checkpoint, source = RandomCheckpoint(seed=0), "full size, random weights (OFT: random head and projector)"
    return random_oft_policy(wdir, checkpoint, "cpu", "bfloat16", mesh_device=mesh), wdir, checkpoint, source


def run_oft_ttnn(args, frames: FrameSource | None = None) -> dict:
    """--oft --backend ttnn: real chunks on a Tenstorrent mesh (N300 | T3K), timed as the torch
    path times them, then plain OpenVLA actions on the same mesh. The two models are timed one
    after the other (not round-robin): each opens the whole mesh, and one mesh is opened at a
    time. The OFT model is loaded first, so a missing card fails at once with the mesh's error
    (no full-size torch model is built anywhere)."""
    import torch

    from .backends import create_backend
    from .config import load_config
    from .errors import BackendError
    from .policy import assemble_policy
    from .synthetic import synthetic_rgb

    mesh = getattr(args, "mesh_device", None) or os.environ.get("MESH_DEVICE")
    tmp = Path(tempfile.mkdtemp(prefix="openvla_bench_"))
    t = time.perf_counter()
    try:
        oft, wdir, checkpoint, source = _load_oft_ttnn(args, mesh, tmp)
    except BackendError as e:
        if "Tenstorrent" not in str(e):
            raise
        raise BackendError(f"{e}. --oft --backend ttnn times real chunks on a Tenstorrent card; without one, "
                           "`--oft --backend ttnn --mesh-device N300|T3K --report ops` gives the modelled chunk "
                           "(op graph counted on a mock mesh)") from e
    oft_load_s = time.perf_counter() - t
    config = load_config(wdir)
    frames = frames or FrameSource()
    spec = oft.spec
    n_images = spec.num_images_in_input or 2
    msgs = [frames.make(synthetic_rgb(j, FRAME_HEIGHT, FRAME_WIDTH)) for j in range(n_images)]
    oft_key = sorted(oft.config.norm_stats)[0]
    stats = oft.config.norm_stats[oft_key]
    proprio = None
    if oft.uses_proprio:
        lo, hi = (np.asarray(stats["proprio"][q], np.float64) for q in ("q01", "q99"))
        proprio = (lo + hi) / 2
    instruction = INSTRUCTIONS[0]

    def oft_once(_msg) -> dict:  # the chunk's read-back is the synchronisation (one read per chunk)
        t0 = time.perf_counter()
        chunk = oft.predict_chunk([frames.convert(m) for m in msgs[:n_images]], instruction, proprio=proprio,
                                  unnorm_key=oft_key)
        return {"total": (time.perf_counter() - t0) * 1e3,
                **{k: v for k, v in chunk.timings_ms.items() if k != "total"}}

    try:
        for _ in range(WARMUP_RUNS):
            oft_once(None)
        t = time.perf_counter()
        rec = time_interleaved([("oft-chunk", oft_once)], [None], args.runs)
        wall = time.perf_counter() - t
        oft_describe = oft.describe()
    finally:
        oft.close()
    t = time.perf_counter()
    be = create_backend("ttnn", config, checkpoint, mesh_device=mesh)
    try:
        plain_key = UNNORM_KEY if UNNORM_KEY in config.norm_stats else sorted(config.norm_stats)[0]
        plain = assemble_policy(config, be, default_unnorm_key=plain_key)
        plain_load_s = time.perf_counter() - t

        def plain_once(_msg) -> dict:
            t0 = time.perf_counter()
            r = plain.predict(frames.convert(msgs[0]), instruction)
            return {"total": (time.perf_counter() - t0) * 1e3,
                    **{k: v for k, v in r.timings_ms.items() if k != "total"}}

        for _ in range(WARMUP_RUNS):
            plain_once(None)
        t = time.perf_counter()
        rec.update(time_interleaved([("openvla-action", plain_once)], [None], args.runs))
        wall += time.perf_counter() - t
        plain_describe = be.describe()
    finally:
        be.close()
    chunk_ms = summarise(rec["oft-chunk"]["total"])
    plain_ms = summarise(rec["openvla-action"]["total"])
    steps = spec.num_actions_chunk
    per_action = chunk_ms["median_ms"] / steps
    return {"tool": "openvla-bench", "mode": "oft", "backend": "ttnn", "mesh_device": mesh, "size": args.size,
            "weights": source, "dtype": "ttnn profile", "runs": args.runs, "warmup_runs": WARMUP_RUNS,
            "timing": "sequential (OFT chunks, then plain actions: one mesh open at a time)",
            "instruction": instruction, "frame": f"{FRAME_WIDTH}x{FRAME_HEIGHT}", "image_conversion": frames.name,
            "env": _env_info(torch.device("cpu")),
            "oft": {"describe": oft_describe, "num_images": n_images, "proprio": proprio is not None,
                    "chunk": steps, "action_dim": spec.action_dim, "load_s": round(oft_load_s, 2),
                    "chunk_ms": chunk_ms, "per_action_ms": round(per_action, 4),
                    "stages_median_ms": {k: float(np.median(v)) for k, v in rec["oft-chunk"].items()}},
            "openvla": {"describe": plain_describe, "load_s": round(plain_load_s, 2), "action_ms": plain_ms,
                        "stages_median_ms": {k: float(np.median(v)) for k, v in rec["openvla-action"].items()}},
            "ratios": {"openvla action / oft chunk": round(plain_ms["median_ms"] / chunk_ms["median_ms"], 3),
                       "openvla action / oft per action": round(plain_ms["median_ms"] / per_action, 3)},
            "timing_wall_s": round(wall, 2)}


def print_oft_report(report: dict) -> None:
    env, o, p = report["env"], report["oft"], report["openvla"]
    if report.get("backend") == "ttnn":
        print(f"openvla-bench --oft --backend ttnn: {report['weights']}, on the {report['oft']['describe'].get('mesh', '')} "
              f"mesh {report.get('mesh_device') or 'auto'}; timed {report['timing']}")
    else:
        print(f"openvla-bench --oft: {report['weights']}, {report['dtype']}, on {env['card']} (torch {env['torch']})")
    print(f"OFT pass: {o['num_images']} image(s) {report['frame']}{' + proprio' if o['proprio'] else ''} -> chunk "
          f"{o['chunk']} x {o['action_dim']} ({o['describe'].get('action_head')}, "
          f"{o['describe'].get('path', 'reference')} path); plain OpenVLA: 1 image -> 7 "
          f"tokens ({p['describe'].get('path', 'reference')}); {report['runs']} runs each, round-robin, after "
          f"{report['warmup_runs']} warm-up runs")
    c, a = o["chunk_ms"], p["action_ms"]
    print(f"oft chunk:        median {c['median_ms']:.2f} ms, p95 {c['p95_ms']:.2f} ms  "
          f"(stages: " + ", ".join(f"{k} {v:.2f}" for k, v in o["stages_median_ms"].items() if k != "total") + ")")
    print(f"oft per action:   {o['per_action_ms']:.2f} ms (chunk / {o['chunk']}, the whole chunk executed)")
    print(f"openvla action:   median {a['median_ms']:.2f} ms, p95 {a['p95_ms']:.2f} ms")
    for k, v in report["ratios"].items():
        print(f"ratio {k}: {v:.2f}x")


def print_report(report: dict) -> None:
    env = report["env"]
    print(f"openvla-bench: backend {report['backend']}, {report['weights']}, {report['dtype']}, "
          f"on {env['card']} (torch {env['torch']}, transformers {env['transformers']})")
    print(f"one action = {report['frame']} frame -> {report['new_tokens']} tokens; prompt {report['prompt_tokens']} "
          f"tokens, sequence {report['sequence_length']}; {report['runs']} runs after {report['warmup_runs']} "
          f"warm-up runs per path; * = the path chosen by default on this device")
    if report.get("torch_reference_runs", report["runs"]) != report["runs"]:
        print(f"(torch-reference and hf-generate: {report['torch_reference_runs']} runs after 1 warm-up run: "
              "a full-size torch model on the CPU)")
    print("paths are timed round-robin (one run of each in turn), after their warm-up runs")
    print(format_table(report))
    for k, v in report["ratios"].items():
        print(f"ratio {k}: {v:.2f}x")
    print("actions/s (median total): " + ", ".join(f"{k} {v:.1f}" for k, v in report["actions_per_s"].items()))
    for name, p in report["paths"].items():
        if "peak_allocated_gb" in p:
            used = f", device used {p['device_used_gb']:.2f} GB" if "device_used_gb" in p else ""
            print(f"peak GPU memory {name}: {p['peak_allocated_gb']:.2f} GB allocated, "
                  f"{p['peak_reserved_gb']:.2f} GB reserved{used}")
    for name, p in report["paths"].items():
        d = p.get("describe", {})
        if d.get("path") == "fast":
            print(f"fast path: graphs {d.get('cuda_graphs')}, element-wise ops {d.get('elementwise_ops')}, "
                  f"graph failures {d.get('graph_failures') or 'none'}")
    a = report.get("agreement")
    if a:
        line = f"token agreement over {a['n_cases']} image x prompt cases: hf-generate == reference {a['hf_equal']}"
        if a.get("hf_max_abs_logit_diff") is not None:
            line += f" (max |logit diff| {a['hf_max_abs_logit_diff']:.3g})"
        if "fast_equal" in a:
            line += f", fast == reference {a['fast_equal']} (max |logit diff| {a['max_abs_logit_diff']:.3g})"
        if "fast_with_device_preprocess_equal" in a:
            line += f", fast with device preprocessing == reference {a['fast_with_device_preprocess_equal']}"
        line += f"; smallest reference top-1/top-2 margin {a['min_reference_margin']:.3g}"
        print(line)
        for c in a["cases"]:
            if "first_mismatch" in c:
                print(f"  mismatch (image {c['image_seed']}, {c['prompt_tokens']} prompt tokens): {c['first_mismatch']}")


def main(argv=None, frames: FrameSource | None = None) -> int:
    p = argparse.ArgumentParser(prog="openvla-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="torch", choices=["torch", "ttnn"])
    p.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="torch device for the model (default: cuda when available)")
    p.add_argument("--size", default="full", choices=["full", "tiny"],
                   help="model size when no --weights are given (random weights)")
    p.add_argument("--weights", default=None, metavar="DIR", help="a real checkpoint directory (HF layout)")
    p.add_argument("--runs", type=int, default=DEFAULT_RUNS, metavar="N", help="timed runs per path")
    p.add_argument("--json", default=None, metavar="OUT", help="write the full report as JSON here")
    p.add_argument("--draft", default=None, metavar="none|all|K[,K]",
                   help="speculative paths to time beside the plain one: drafts built so that K of 6 are "
                        "accepted (all = 6; default 0,3,6; none = plain path only)")
    p.add_argument("--batch", default=None, metavar="B[,B]",
                   help="instead of the stage table: B streams in one policy.predict_batch per batch size "
                        "(e.g. 1,2,4,8): latency p50/p95 per action, aggregate actions/s, ratios to batch 1; "
                        "with --backend ttnn --report ops: the op report's modelled 'Several robots' rows")
    p.add_argument("--oft", action="store_true",
                   help="instead of the stage table: one OpenVLA-OFT pass per action chunk (tiny OFT checkpoint, "
                        "full size with random weights, or --weights OFT_DIR) beside plain OpenVLA per action; "
                        "--backend ttnn: real chunks on a Tenstorrent mesh, or with --report ops the modelled "
                        "chunk in the op report (mock mesh, no card)")
    p.add_argument("--mesh-device", default=os.environ.get("MESH_DEVICE"), metavar="N300|T3K",
                   help="TT-NN mesh (--backend ttnn; default $MESH_DEVICE)")
    p.add_argument("--report", default=None, choices=["ops"],
                   help="ops: count the TT-NN op graph on a mock mesh (device ops, collectives, bytes, "
                        "modelled time per stage; no card needed) instead of timing")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(levelname)s: %(message)s")
    if args.runs < 1:
        print("error: --runs must be >= 1", file=sys.stderr)
        return 2
    try:
        args.draft_ks = parse_draft(args.draft if args.draft is not None else "0,3,6")
        args.batch_sizes = parse_batch(args.batch) if args.batch is not None else None
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # --oft / --batch with --report ops: the op report with its OpenVLA-OFT chunk / "Several robots"
    # section (one mode, not two)
    modes = [m for m, on in (("--batch", args.batch is not None and not args.report),
                             ("--oft", args.oft and not args.report),
                             ("--report ops", args.report)) if on]
    if len(modes) > 1:
        print(f"error: {' and '.join(modes)} are separate benchmarks: choose one", file=sys.stderr)
        return 2
    if modes and modes[0] != "--report ops" and args.draft is not None:
        print(f"error: --draft times the stage table's speculative paths; it does not apply to {modes[0]}",
              file=sys.stderr)
        return 2
    if args.report == "ops":
        if args.backend != "ttnn" or not args.mesh_device:
            print("error: --report ops needs --backend ttnn and --mesh-device N300|T3K", file=sys.stderr)
            return 2
        from .backends.ttnn.op_report import main as op_report_main

        return op_report_main(["--mesh-device", args.mesh_device] + (["--oft"] if args.oft else [])
                              + (["--batch", args.batch] if args.batch is not None else [])
                              + (["--json", args.json] if args.json else []))
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except Exception:
        pass

    from .errors import OpenVLAError

    mode = (run_batch, print_batch_report) if args.batch_sizes else (run_oft, print_oft_report) if args.oft \
        else (run, print_report)
    try:
        report = mode[0](args, frames)
    except (OpenVLAError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    mode[1](report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
