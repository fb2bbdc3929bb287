"""The cache schema: codecs round trip (with their error measured on F and on φ(F)), RoleSpec fields,
and read_manifest's refusals, each naming the file and the key."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.schema import CODECS, MANIFEST, SCHEMA_VERSION, ManifestError, RoleSpec, decode, encode, read_manifest

N, C = 49, 64


def _maps(kind: str, views: int = 16, seed: int = 0) -> np.ndarray:
    """(views, N, C) float32: 'sparse' = a post-ReLU map (about 70 % zeros), 'dense' = a map with a large DC."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(views, N, C)).astype(np.float32)
    if kind == "sparse":
        return np.maximum(x - 0.5, 0.0).astype(np.float32)
    return (x + 3.0 * rng.normal(size=(views, 1, C))).astype(np.float32)


def _phi(x: np.ndarray) -> np.ndarray:
    """φ(F) = F − its mean over tokens, per channel (what the reader derives from a decoded F)."""
    return x - x.mean(axis=-2, keepdims=True)


def _errors(ref: np.ndarray, approx: np.ndarray) -> tuple[float, float]:
    """(relative L2 error, worst per-token cosine)."""
    rel = float(np.linalg.norm(ref - approx) / np.linalg.norm(ref))
    cos = (ref * approx).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(approx, axis=-1) + 1e-30)
    return rel, float(cos.min())


# ---------------------------------------------------------------------------------------------- codecs


@pytest.mark.parametrize("shape", [(N, C), (10,)])
def test_fp32_round_trip_is_exact(shape):
    x = np.random.default_rng(1).normal(size=(3, 2, *shape)).astype(np.float32)
    spec = RoleSpec("final" if len(shape) == 2 else "logits", shape, "fp32")
    fields = encode(spec, x)
    assert list(fields) == [spec.name] and fields[spec.name].dtype == np.float32
    np.testing.assert_array_equal(decode(spec, fields), x)


def test_fp16_round_trip_equals_the_fp16_cast():
    x = (np.random.default_rng(2).normal(size=(4, N, C)) * 30).astype(np.float32)
    spec = RoleSpec("final", (N, C), "fp16")
    fields = encode(spec, x)
    assert fields["final"].dtype == np.float16
    out = decode(spec, fields)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, x.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("codec", ["int8", "int8dc"])
@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_int8_error_is_within_its_step_bound_per_element(codec, kind):
    x = _maps(kind)
    spec = RoleSpec("final", (N, C), codec)
    fields = encode(spec, x)
    assert fields["final_q"].dtype == np.int8 and fields["final_scale"].shape == (len(x), 1, C)
    out = decode(spec, fields)
    assert out.dtype == np.float32 and out.shape == x.shape
    err = np.abs(out - x)
    # int8: half a step of rounding. int8dc: plus at most half a step more, from re-centring the
    # decoded map on the exact DC (the mean of the rounding errors).
    steps = 0.5 if codec == "int8" else 1.0
    assert (err <= fields["final_scale"] * (steps + 1e-4) + 1e-7).all(), float((err / fields["final_scale"]).max())


def test_int8_keeps_the_zeros_of_a_sparse_map_and_has_no_dc_field():
    x = _maps("sparse")
    spec = RoleSpec("final", (N, C), "int8")
    fields = encode(spec, x)
    assert set(fields) == {"final_q", "final_scale"}
    zeros = x == 0
    assert zeros.mean() > 0.5
    assert (decode(spec, fields)[zeros] == 0).all()


def test_int8dc_stores_the_dc_exactly_in_its_dc_field():
    x = _maps("dense")
    fields = encode(RoleSpec("final", (N, C), "int8dc"), x)
    assert fields["final_dc"].dtype == np.float32 and fields["final_dc"].shape == (len(x), 1, C)
    np.testing.assert_allclose(fields["final_dc"], x.mean(axis=1, keepdims=True, dtype=np.float64), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_int8dc_decoded_token_mean_is_the_float32_mean(kind):
    x = _maps(kind)
    spec = RoleSpec("final", (N, C), "int8dc")
    out = decode(spec, encode(spec, x))
    mean = x.mean(axis=1, dtype=np.float64).astype(np.float32)
    np.testing.assert_allclose(out.mean(axis=1, dtype=np.float64), mean, rtol=0, atol=1e-6)


def test_int8dc_decoded_mean_of_logits_is_exact():
    x = np.random.default_rng(3).normal(size=(32, 10)).astype(np.float32) * 4 + 7
    spec = RoleSpec("logits", (10,), "int8dc")
    fields = encode(spec, x)
    assert fields["logits_dc"].shape == (32, 1)
    out = decode(spec, fields)
    np.testing.assert_allclose(out.mean(-1, dtype=np.float64), x.mean(-1, dtype=np.float64), rtol=0, atol=1e-6)


# The errors measured on these synthetic maps (a record; bench/storage.py measures real features):
#   codec   map     F: rel L2, worst token cosine     φ(F): rel L2, worst token cosine
#   int8    sparse  0.0049, 0.99993                   0.0054, 0.99991
#   int8    dense   0.0036, 0.99999                   0.0112, 0.99984
#   int8dc  sparse  0.0080, 0.99975                   0.0063, 0.99992
#   int8dc  dense   0.0018, 0.999997                  0.0057, 0.99996
BOUNDS = {  # (max rel L2 on F, min cosine on F, max rel L2 on φ(F), min cosine on φ(F))
    ("int8", "sparse"): (0.012, 0.999, 0.014, 0.999),
    ("int8", "dense"): (0.008, 0.9999, 0.025, 0.999),
    ("int8dc", "sparse"): (0.02, 0.998, 0.016, 0.999),
    ("int8dc", "dense"): (0.004, 0.99995, 0.014, 0.9995),
}


@pytest.mark.parametrize("codec,kind", list(BOUNDS))
def test_lossy_codec_error_on_F_and_on_phi_F(codec, kind, record_property):
    x = _maps(kind)
    spec = RoleSpec("final", (N, C), codec)
    out = decode(spec, encode(spec, x))
    rel_f, cos_f = _errors(x, out)
    rel_phi, cos_phi = _errors(_phi(x), _phi(out))
    for name, value in (("rel_l2_F", rel_f), ("cos_F", cos_f), ("rel_l2_phi", rel_phi), ("cos_phi", cos_phi)):
        record_property(f"{codec}_{kind}_{name}", round(value, 6))
    print(f"{codec:6s} {kind:6s}  F: rel L2 {rel_f:.5f} worst cos {cos_f:.6f}   "
          f"phi(F): rel L2 {rel_phi:.5f} worst cos {cos_phi:.6f}")
    max_rel_f, min_cos_f, max_rel_phi, min_cos_phi = BOUNDS[(codec, kind)]
    assert 0 < rel_f < max_rel_f and cos_f > min_cos_f
    assert 0 < rel_phi < max_rel_phi and cos_phi > min_cos_phi


def test_dc_split_helps_phi_F_on_a_dense_map_with_a_large_dc():
    """The reason int8dc exists: with a dominant DC, int8's step follows |F| and φ(F) loses precision."""
    x = _maps("dense")
    rel = {}
    for codec in ("int8", "int8dc"):
        spec = RoleSpec("final", (N, C), codec)
        rel[codec] = _errors(_phi(x), _phi(decode(spec, encode(spec, x))))[0]
    assert rel["int8dc"] < 0.7 * rel["int8"]


def test_encode_refuses_a_wrong_trailing_shape():
    with pytest.raises(ValueError, match=r"role final: expected trailing shape \(49, 64\)"):
        encode(RoleSpec("final", (N, C), "fp16"), np.zeros((2, N, C + 1), np.float32))


# ---------------------------------------------------------------------------------------------- RoleSpec


def test_rolespec_fields_for_each_codec():
    assert set(CODECS) == {"fp32", "fp16", "int8", "int8dc"}
    assert RoleSpec("final", (N, C), "fp32").fields() == {"final": ((N, C), "float32")}
    assert RoleSpec("mid", (17, 192), "fp16").fields() == {"mid": ((17, 192), "float16")}
    assert RoleSpec("final", (N, C), "int8").fields() == {"final_q": ((N, C), "int8"), "final_scale": ((1, C), "float32")}
    assert RoleSpec("final", (N, C), "int8dc").fields() == {
        "final_q": ((N, C), "int8"), "final_scale": ((1, C), "float32"), "final_dc": ((1, C), "float32")}
    assert RoleSpec("logits", (10,), "int8").fields() == {"logits_q": ((10,), "int8"), "logits_scale": ((1,), "float32")}
    assert RoleSpec("logits", (10,), "int8dc").fields() == {
        "logits_q": ((10,), "int8"), "logits_scale": ((1,), "float32"), "logits_dc": ((1,), "float32")}


@pytest.mark.parametrize("codec", ["fp32", "fp16", "int8", "int8dc"])
def test_rolespec_dict_round_trip(codec):
    spec = RoleSpec("final", (N, C), codec)
    d = json.loads(json.dumps(spec.to_dict()))
    assert RoleSpec.from_dict(d) == spec
    assert {k: (tuple(v["shape"]), v["dtype"]) for k, v in d["fields"].items()} == spec.fields()


def test_rolespec_refuses_unknown_role_and_codec():
    with pytest.raises(ValueError, match="unknown role 'penultimate'"):
        RoleSpec("penultimate", (N, C))
    with pytest.raises(ValueError, match="unknown codec 'bf16' for role 'final'"):
        RoleSpec("final", (N, C), "bf16")


# ---------------------------------------------------------------------------------------------- read_manifest


def _good_manifest() -> dict:
    roles = {"final": RoleSpec("final", (N, C), "int8dc"), "logits": RoleSpec("logits", (10,), "fp16")}
    return {"format": "zarr", "schema_version": SCHEMA_VERSION, "teacher": {"name": "x"}, "views": {},
            "roles": {k: v.to_dict() for k, v in roles.items()}, "shards": [], "num_samples": 0, "num_views": 2}


def _write(root, obj) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST).write_text(obj if isinstance(obj, str) else json.dumps(obj))


def test_read_manifest_accepts_a_good_manifest(tmp_path):
    _write(tmp_path, _good_manifest())
    assert read_manifest(tmp_path)["roles"]["final"]["codec"] == "int8dc"


def test_read_manifest_refuses_a_missing_manifest(tmp_path):
    with pytest.raises(ManifestError) as e:
        read_manifest(tmp_path / "nothing-here")
    assert str(tmp_path / "nothing-here") in str(e.value) and MANIFEST in str(e.value) and "missing" in str(e.value)


def test_read_manifest_refuses_invalid_json(tmp_path):
    _write(tmp_path, '{"format": "zarr", ')
    with pytest.raises(ManifestError) as e:
        read_manifest(tmp_path)
    assert str(tmp_path / MANIFEST) in str(e.value) and "JSON" in str(e.value)


@pytest.mark.parametrize("key", ["format", "schema_version", "teacher", "views", "roles", "shards", "num_samples",
                                 "num_views"])
def test_read_manifest_refuses_a_missing_key(tmp_path, key):
    m = _good_manifest()
    del m[key]
    _write(tmp_path, m)
    with pytest.raises(ManifestError) as e:
        read_manifest(tmp_path)
    assert str(tmp_path / MANIFEST) in str(e.value) and f"missing key {key!r}" in str(e.value)


def test_read_manifest_refuses_another_schema_version(tmp_path):
    _write(tmp_path, _good_manifest() | {"schema_version": SCHEMA_VERSION + 1})
    with pytest.raises(ManifestError) as e:
        read_manifest(tmp_path)
    assert str(tmp_path / MANIFEST) in str(e.value) and "schema_version" in str(e.value)
    assert str(SCHEMA_VERSION + 1) in str(e.value)


def test_read_manifest_refuses_an_unknown_format(tmp_path):
    _write(tmp_path, _good_manifest() | {"format": "hdf5"})
    with pytest.raises(ManifestError, match="format 'hdf5'") as e:
        read_manifest(tmp_path)
    assert str(tmp_path / MANIFEST) in str(e.value)


@pytest.mark.parametrize("edit", ["field_shape", "field_dtype", "role_shape", "extra_field", "codec"])
def test_read_manifest_refuses_a_role_whose_fields_disagree(tmp_path, edit):
    """A hand-edited manifest: the declared fields no longer match what shape + codec store."""
    m = _good_manifest()
    role = m["roles"]["final"]
    if edit == "field_shape":
        role["fields"]["final_q"]["shape"] = [N - 1, C]
    elif edit == "field_dtype":
        role["fields"]["final_q"]["dtype"] = "uint8"
    elif edit == "role_shape":
        role["shape"] = [N, C + 1]
    elif edit == "extra_field":
        role["fields"]["final_extra"] = {"shape": [1], "dtype": "float32"}
    else:
        role["codec"] = "int8"  # the fields still declare final_dc
    _write(tmp_path, m)
    with pytest.raises(ManifestError) as e:
        read_manifest(tmp_path)
    assert str(tmp_path / MANIFEST) in str(e.value) and "role 'final'" in str(e.value)


def test_read_manifest_refuses_a_malformed_role(tmp_path):
    m = _good_manifest()
    m["roles"]["final"]["codec"] = "bf16"
    _write(tmp_path, m)
    with pytest.raises(ManifestError) as e:
        read_manifest(tmp_path)
    assert str(tmp_path / MANIFEST) in str(e.value) and "role 'final' is malformed" in str(e.value)
