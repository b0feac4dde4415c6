"""Token acceptance of a TT-NN policy against the torch reference: ONE fixed set of 20
image / instruction cases and ONE pass rule (issue 12, "Keep and extend the checks").

The rule: a case passes when ALL 7 action tokens equal the reference's; the candidate passes
when at least MIN_CASE_FRACTION (90 %) of the 20 cases pass, i.e. 18 of 20. (The old per-token
bar of 0.85 let all 7 tokens of an action be right only about 0.85**7 = 32 % of the time.)

The cases are deterministic: synthetic table-top frames (`openvla_model.synthetic`, the demo's
synthetic camera) from fixed seeds at several camera sizes, 20 different instructions (20 to 74
prompt tokens: prefills of 288, 320 and 352 rows, two prompts ending exactly on a 32-row tile
so that the decode steps cross into the next one), and unnorm keys cycled over real OpenVLA-7B
datasets. The unnorm key does not change the tokens (the prompt does not name
it: openvla-spec.md section 4); it changes the de-normalised action, so each case runs the
whole policy with a different key. A checkpoint without some of those keys fills in its own
(the tiny test checkpoint: bridge_orig and its second key).

    from openvla_model.backends.ttnn.acceptance import acceptance_cases, run_acceptance
    result = run_acceptance(ttnn_policy, torch_policy)   # both: OpenVLAPolicy
    print(result.report()); assert result.passed

Used by test/test_ttnn_hardware.py on a card; the same functions run on the CPU in
test/test_ttnn_acceptance.py (torch vs torch, torch vs the golden-function TT-NN emulator, and
injected wrong tokens that must fail the bar). Imports neither ttnn nor torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

N_TOKENS = 7
MIN_CASE_FRACTION = 0.9
# Real OpenVLA-7B dataset keys (its config.json norm_stats), cycled over the cases.
UNNORM_KEYS_7B = ("bridge_orig", "fractal20220817_data", "kuka", "taco_play", "jaco_play", "berkeley_autolab_ur5",
                  "roboturk", "viola")
# (image seed, (height, width), instruction): frame sizes of common cameras and datasets (the
# preprocessing resizes every one to 224x224); instructions of the robot datasets' kind, short
# to long, one with capitals and a full stop (the prompt lower-cases it).
_CASES = (
    (0, (480, 640), "pick up the red cup"),
    (1, (480, 640), "put the spoon on the towel"),
    (2, (256, 256), "open the drawer"),
    (3, (480, 640), "move the blue block to the left of the pot"),
    (4, (224, 224), "close the microwave"),
    (5, (256, 256), "put eggplant into pot or pan"),
    (6, (720, 1280), "Pick up the green can and place it on the plate."),
    (7, (480, 640), "wipe the table with the sponge"),
    (8, (480, 848), "stack the yellow cube on top of the red cube"),
    (9, (480, 640), "push the button"),
    (10, (256, 320), "fold the cloth from left to right"),
    (11, (480, 640), "turn on the faucet"),
    (12, (720, 1280), "place the carrot in the bowl next to the sink"),
    (13, (224, 224), "knock the bottle over"),
    (14, (480, 640), "put the blue block into the open drawer on the left of the sink next to the yellow towel"),
    (15, (256, 256), "move the pot to the back burner of the stove"),
    (16, (480, 640), "take the lid off the pan"),
    (17, (480, 848), "put the corn on the orange plate"),
    (18, (480, 640), "slide the tray to the right edge of the table"),
    (19, (256, 320), "grasp the handle of the mug and lift it up slowly without spilling the coffee inside"),
)
N_CASES = len(_CASES)


@dataclass(frozen=True)
class Case:
    index: int
    image_seed: int
    height: int
    width: int
    instruction: str
    unnorm_key: str

    def image(self) -> np.ndarray:
        """The case's RGB frame (uint8, height x width x 3), the same on every call and machine."""
        from ...synthetic import synthetic_rgb

        return synthetic_rgb(self.image_seed, self.height, self.width)

    def label(self) -> str:
        return f"case {self.index:2d} (seed {self.image_seed}, {self.width}x{self.height}, {self.unnorm_key})"


def acceptance_cases(unnorm_keys) -> list[Case]:
    """The 20 fixed cases, with unnorm keys cycled over UNNORM_KEYS_7B (all of them on
    openvla-7b); a checkpoint without some of them fills in its own keys in sorted order."""
    available = list(unnorm_keys)
    keys = [k for k in UNNORM_KEYS_7B if k in available]
    keys += sorted(k for k in available if k not in keys)[:len(UNNORM_KEYS_7B) - len(keys)]
    if not keys:
        raise ValueError("the checkpoint has no norm_stats keys")
    return [Case(i, seed, h, w, instruction, keys[i % len(keys)])
            for i, (seed, (h, w), instruction) in enumerate(_CASES)]


def required_cases(n_cases: int, min_fraction: float = MIN_CASE_FRACTION) -> int:
    """Cases that must pass: ceil(min_fraction * n), with 0.9 * 20 = 18 exactly (no float slop)."""
    return math.ceil(round(min_fraction * n_cases, 9))


@dataclass(frozen=True)
class CaseOutcome:
    case: Case
    reference: tuple
    candidate: tuple

    @property
    def equal(self) -> bool:
        return self.reference == self.candidate

    @property
    def tokens_equal(self) -> int:
        return sum(a == b for a, b in zip(self.reference, self.candidate))

    def line(self) -> str:
        if self.equal:
            return f"{self.case.label()} {self.case.instruction!r}: all {N_TOKENS} equal {list(self.candidate)}"
        off = [b - a for a, b in zip(self.reference, self.candidate)]
        return (f"{self.case.label()} {self.case.instruction!r}: DIFFER at tokens "
                f"{[k + 1 for k, d in enumerate(off) if d]} (bins off {off}): candidate {list(self.candidate)}, "
                f"reference {list(self.reference)}")


@dataclass(frozen=True)
class AcceptanceResult:
    outcomes: tuple
    min_fraction: float = MIN_CASE_FRACTION

    @property
    def n_cases(self) -> int:
        return len(self.outcomes)

    @property
    def n_equal(self) -> int:
        return sum(o.equal for o in self.outcomes)

    @property
    def fraction(self) -> float:
        return self.n_equal / self.n_cases

    @property
    def required(self) -> int:
        return required_cases(self.n_cases, self.min_fraction)

    @property
    def token_agreement(self) -> float:
        return sum(o.tokens_equal for o in self.outcomes) / (N_TOKENS * self.n_cases)

    @property
    def passed(self) -> bool:
        return self.n_equal >= self.required

    def summary(self) -> str:
        return (f"{self.n_equal}/{self.n_cases} cases with all {N_TOKENS} tokens equal to the reference "
                f"({100 * self.fraction:.0f} %, need >= {100 * self.min_fraction:.0f} % = {self.required}): "
                f"{'PASS' if self.passed else 'FAIL'}; per-token agreement {self.token_agreement:.3f}")

    def report(self) -> str:
        return "\n".join([o.line() for o in self.outcomes] + [self.summary()])


def compare(cases, reference_tokens, candidate_tokens, min_fraction: float = MIN_CASE_FRACTION) -> AcceptanceResult:
    """Case by case: `reference_tokens[i]` and `candidate_tokens[i]` are the 7 token ids of
    cases[i]. A missing case or a token list of the wrong length is an error, never a pass."""
    cases = list(cases)
    if not cases:
        raise ValueError("no cases to compare")
    if not (len(reference_tokens) == len(candidate_tokens) == len(cases)):
        raise ValueError(f"{len(cases)} cases but {len(reference_tokens)} reference and {len(candidate_tokens)} "
                         "candidate token lists")
    if not 0 < min_fraction <= 1:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
    outcomes = []
    for case, ref, cand in zip(cases, reference_tokens, candidate_tokens):
        ref, cand = tuple(int(t) for t in np.ravel(ref)), tuple(int(t) for t in np.ravel(cand))
        if len(ref) != N_TOKENS or len(cand) != N_TOKENS:
            raise ValueError(f"{case.label()}: expected {N_TOKENS} tokens, got {len(ref)} reference / "
                             f"{len(cand)} candidate")
        outcomes.append(CaseOutcome(case, ref, cand))
    return AcceptanceResult(tuple(outcomes), min_fraction)


def predict_tokens(policy, cases) -> list:
    """The 7 greedy tokens of `policy.predict(image, instruction, unnorm_key)` for each case."""
    return [np.asarray(policy.predict(c.image(), c.instruction, unnorm_key=c.unnorm_key).tokens).tolist()
            for c in cases]


def run_acceptance(candidate, reference, cases=None, min_fraction: float = MIN_CASE_FRACTION) -> AcceptanceResult:
    """candidate (e.g. the TT-NN policy) against reference (the torch policy) on the fixed cases
    (default: acceptance_cases of the candidate's checkpoint)."""
    cases = list(cases) if cases is not None else acceptance_cases(candidate.config.norm_stats)
    return compare(cases, predict_tokens(reference, cases), predict_tokens(candidate, cases), min_fraction)
