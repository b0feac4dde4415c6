"""Action codec vs openvla-spec.md section 5, computed independently here."""
import numpy as np
import pytest

from openvla_model.action_codec import ActionCodec
from openvla_model.errors import UnnormKeyError
from openvla_model.tiny_checkpoint import BRIDGE_ORIG, TINY_OTHER

STATS = {"bridge_orig": BRIDGE_ORIG, "tiny_other_dataset": TINY_OTHER}


def spec_normalized(token: int) -> float:
    idx = min(max(32000 - token - 1, 0), 254)
    return -1.0 + (2 * idx + 1) / 255.0


def test_every_token_id_maps_as_the_spec_says():
    codec = ActionCodec(STATS, vocab_size=32000, n_bins=256)
    tokens = np.arange(0, 32064)
    dec = codec.decode_tokens(tokens)
    expected = np.array([spec_normalized(int(t)) for t in tokens], dtype=np.float32)
    np.testing.assert_allclose(dec.normalized, expected, atol=1e-7, rtol=0)
    in_range = (tokens >= 31744) & (tokens <= 31999)
    assert np.array_equal(dec.out_of_range, ~in_range)
    assert codec.first_action_token == 31744 and codec.last_action_token == 31999
    # the extremes: 31999 -> first centre, 31745 and 31744 -> last centre (idx clipped to 254)
    assert dec.normalized[31999] == pytest.approx(-1 + 1 / 255)
    assert dec.normalized[31745] == pytest.approx(1 - 1 / 255) == dec.normalized[31744]


def test_encode_inverts_decode_for_every_bin():
    codec = ActionCodec(STATS)
    tokens = np.arange(31745, 32000)  # 255 distinct bins
    assert np.array_equal(codec.encode(codec.decode_tokens(tokens).normalized), tokens)


def test_unnormalize_with_mask_leaves_gripper_raw():
    codec = ActionCodec(STATS)
    n = np.array([-1.0, -0.5, 0.0, 0.25, 0.5, 1.0, -0.6], dtype=np.float32)
    out = codec.unnormalize(n, "bridge_orig")
    a = BRIDGE_ORIG["action"]
    for i in range(6):
        assert out[i] == pytest.approx(0.5 * (n[i] + 1) * (a["q99"][i] - a["q01"][i]) + a["q01"][i], rel=1e-6)
    assert out[6] == pytest.approx(-0.6)  # mask false: the normalised value unchanged


def test_unnormalize_without_mask_maps_every_dimension():
    codec = ActionCodec(STATS)
    n = np.full(7, -1.0)
    np.testing.assert_allclose(codec.unnormalize(n, "tiny_other_dataset"), TINY_OTHER["action"]["q01"], rtol=1e-6)
    np.testing.assert_allclose(codec.unnormalize(-n, "tiny_other_dataset"), TINY_OTHER["action"]["q99"], rtol=1e-6)


def test_unnorm_key_required_when_several_datasets_and_errors_list_keys():
    codec = ActionCodec(STATS)
    with pytest.raises(UnnormKeyError, match="bridge_orig, tiny_other_dataset"):
        codec.resolve_key(None)
    with pytest.raises(UnnormKeyError, match="unknown unnorm_key 'bridge'.*valid keys: bridge_orig, tiny_other_dataset"):
        codec.unnormalize(np.zeros(7), "bridge")


def test_single_dataset_needs_no_key():
    codec = ActionCodec({"only": BRIDGE_ORIG})
    assert codec.resolve_key(None) == "only"
