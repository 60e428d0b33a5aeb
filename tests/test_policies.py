"""Policy specs: validation, resolution against a segment list, JSON round trip."""

import json

import pytest

from monai_ckpt.policies import CheckpointGroup, Segment, resolve_policy, validate_policy

SEGS = [Segment("encoder0", 0, "encoder"), Segment("encoder1", 1, "encoder"), Segment("encoder2", 2, "encoder"),
        Segment("bottleneck", 3, "bottleneck"), Segment("decoder2", 2, "decoder"), Segment("decoder1", 1, "decoder"),
        Segment("decoder0", 0, "decoder"), Segment("head", 0, "head")]
NAMES = [s.name for s in SEGS]


def groups(spec):
    return [(g.names, g.mode) for g in resolve_policy(spec, SEGS)]


def test_named_policies():
    assert groups("none") == []
    assert groups("all") == [((n,), "full") for n in NAMES]
    assert groups("encoder") == [((n,), "full") for n in NAMES[:3]]
    assert groups("bottleneck") == [(("bottleneck",), "full")]
    assert groups("decoder") == [((n,), "full") for n in NAMES[4:7]]
    assert groups("head") == [(("head",), "full")]
    assert groups("cheap") == [((n,), "cheap") for n in NAMES]
    assert groups("offload") == [((n,), "offload") for n in NAMES]


def test_chunked_policies():
    # sqrt(8) -> runs of 3 (Chen et al.): ceil(8 / 3) = 3 groups
    assert [g for g, _ in groups("sqrt")] == [tuple(NAMES[0:3]), tuple(NAMES[3:6]), tuple(NAMES[6:8])]
    assert [g for g, _ in groups({"every": 4})] == [tuple(NAMES[:4]), tuple(NAMES[4:])]
    assert [g for g, _ in groups({"segments": 3})] == [tuple(NAMES[0:3]), tuple(NAMES[3:5]), tuple(NAMES[5:8])]
    assert [g for g, _ in groups({"segments": len(NAMES)})] == [(n,) for n in NAMES]
    assert groups({"every": 2, "mode": "cheap"})[0] == (("encoder0", "encoder1"), "cheap")


def test_names_and_kinds():
    assert groups(["decoder0", "encoder0"]) == [(("encoder0",), "full"), (("decoder0",), "full")]
    assert groups({"names": ["head"], "mode": "offload"}) == [(("head",), "offload")]
    assert groups({"kind": "encoder", "mode": "cheap"}) == [((n,), "cheap") for n in NAMES[:3]]


def test_specs_survive_json():
    for spec in ["sqrt", {"every": 2, "mode": "cheap"}, ["encoder0"], {"segments": 2}]:
        assert resolve_policy(json.loads(json.dumps(spec)), SEGS) == resolve_policy(spec, SEGS)
    assert validate_policy(("encoder0",)) == ["encoder0"]


@pytest.mark.parametrize("spec", ["fast", 3, None])
def test_invalid_specs_list_the_valid_ones(spec):
    with pytest.raises(ValueError, match="valid policies are 'none', 'all', 'blocks', 'encoder'.*'sqrt', 'cheap', 'offload'"):
        validate_policy(spec)


@pytest.mark.parametrize("spec, why", [
    ([], "one or more segment names"), ({"every": 0}, "positive integer"),
    ({"every": 2.5}, "positive integer"), ({"every": True}, "positive integer"),
    ({"every": 2, "segments": 2}, "exactly one of"), ({"mode": "cheap"}, "exactly one of"),
    ({"every": 2, "mode": "fast"}, "'mode' must be one of"), ({"kind": "middle"}, "'kind' must be one of"),
    ({"budget": 8}, "unknown key"),
])
def test_a_bad_value_of_a_known_kind_says_what_is_right(spec, why):
    """The bad value first, then what would be right; not the list of every kind of policy."""
    with pytest.raises(ValueError, match=r"^bad checkpoint_policy ") as e:
        validate_policy(spec)
    assert why in str(e.value) and "valid policies are" not in str(e.value)


def test_unknown_segment_name_lists_the_real_ones():
    with pytest.raises(ValueError, match=r"segment\(s\) \['decoder9'\] that this network does not have; its segments are \['encoder0'"):
        resolve_policy(["decoder0", "decoder9"], SEGS)


def test_groups_are_values():
    assert CheckpointGroup(("a",)) == CheckpointGroup(("a",), "full")


SPLIT = [Segment("encoder0", 0, "encoder", ("encoder0.0", "encoder0.1")), Segment("bottleneck", 1, "bottleneck"),
         Segment("decoder0", 0, "decoder", ("decoder0.0", "decoder0.1", "decoder0.2")), Segment("head0", 0, "head")]


def test_segments_made_of_blocks():
    def g(spec):
        return [gr.names for gr in resolve_policy(spec, SPLIT)]

    assert g("all") == [("encoder0.0", "encoder0.1"), ("bottleneck",), ("decoder0.0", "decoder0.1", "decoder0.2"),
                        ("head0",)]
    assert g("blocks") == [("encoder0.0",), ("encoder0.1",), ("bottleneck",), ("decoder0.0",), ("decoder0.1",),
                           ("decoder0.2",), ("head0",)]
    assert g({"every": 2}) == [("encoder0.0", "encoder0.1", "bottleneck"), ("decoder0.0", "decoder0.1", "decoder0.2",
                                                                          "head0")]
    assert g(["decoder0.2", "encoder0"]) == [("encoder0.0", "encoder0.1"), ("decoder0.2",)]
    assert g([{"names": ["decoder0.0"]}, {"names": ["decoder0.1", "decoder0.2"], "mode": "cheap"}]) == [
        ("decoder0.0",), ("decoder0.1",), ("decoder0.2",)]
    with pytest.raises(ValueError, match=r"its segments are \['encoder0', 'bottleneck', 'decoder0', 'head0'\] and its "
                                         r"blocks \['encoder0.0'"):
        resolve_policy(["decoder0.7"], SPLIT)
    with pytest.raises(ValueError, match="names a block twice"):
        resolve_policy(["decoder0", "decoder0.1"], SPLIT)
    with pytest.raises(ValueError, match="in two groups"):
        resolve_policy([{"kind": "decoder"}, {"names": ["decoder0.1"], "mode": "cheap"}], SPLIT)


def test_inner_lists_are_groups_of_consecutive_blocks():
    def g(spec):
        return [(gr.names, gr.mode) for gr in resolve_policy(spec, SPLIT)]

    assert g([["decoder0.0", "decoder0.1"], "decoder0.2"]) == [(("decoder0.0", "decoder0.1"), "full"),
                                                              (("decoder0.2",), "full")]
    # segments and blocks mix in a group, across segments
    assert g([["encoder0.1", "bottleneck", "decoder0.0"]]) == [(("encoder0.1", "bottleneck", "decoder0.0"), "full")]
    assert g([["bottleneck", "decoder0"]]) == [(("bottleneck", "decoder0.0", "decoder0.1", "decoder0.2"), "full")]
    assert g({"names": [["encoder0", "bottleneck"]], "mode": "cheap"}) == [
        (("encoder0.0", "encoder0.1", "bottleneck"), "cheap")]
    assert g([{"names": [["decoder0.0", "decoder0.1"]]}, {"names": ["decoder0.2"], "mode": "cheap"}]) == [
        (("decoder0.0", "decoder0.1"), "full"), (("decoder0.2",), "cheap")]
    assert g([["encoder0", "bottleneck"], {"names": ["decoder0.2"], "mode": "cheap"}]) == [
        (("encoder0.0", "encoder0.1", "bottleneck"), "full"), (("decoder0.2",), "cheap")]
    spec = [["decoder0.0", "decoder0.1"], "head0"]
    assert resolve_policy(json.loads(json.dumps(spec)), SPLIT) == resolve_policy(spec, SPLIT)
    with pytest.raises(ValueError, match=r"group \['decoder0.0', 'decoder0.2'\] is not a run of consecutive blocks.*"
                                         r"in order: \['encoder0.0', 'encoder0.1', 'bottleneck'"):
        resolve_policy([["decoder0.0", "decoder0.2"]], SPLIT)
    with pytest.raises(ValueError, match="is not a run of consecutive"):
        resolve_policy([["decoder0.1", "decoder0.0"]], SPLIT)
    with pytest.raises(ValueError, match="names a block twice"):
        resolve_policy([["decoder0.0", "decoder0.1"], "decoder0"], SPLIT)
    with pytest.raises(ValueError, match=r"segment\(s\) \['decoder7'\]"):
        resolve_policy([["decoder0.2", "decoder7"]], SPLIT)
    with pytest.raises(ValueError, match="lists of names"):
        validate_policy([[]])
    with pytest.raises(ValueError, match="lists of names"):
        validate_policy([["decoder0.0", 3]])


@pytest.mark.parametrize("spec, meant", [("ALL", "all"), ("alll", "all"), ("Cheap", "cheap"), ("encoders", "encoder")])
def test_a_near_miss_gets_did_you_mean_and_the_valid_list_once_and_short(spec, meant):
    with pytest.raises(ValueError) as e:
        validate_policy(spec)
    message = str(e.value)
    assert message.startswith(f"unknown checkpoint_policy {spec!r} (did you mean {meant!r}?); valid policies are ")
    assert message.count("valid policies") == 1 and message.count("'sqrt'") == 1 and len(message) < 350


def test_a_bad_budget_is_a_bad_value_not_an_unknown_policy():
    with pytest.raises(ValueError, match=r"^bad checkpoint_policy \{'budget_gb': -1\}: 'budget_gb' must be a positive "
                                         r"number of GiB, got -1\.$"):
        validate_policy({"budget_gb": -1})
    with pytest.raises(ValueError, match=r"takes only \['budget_gb', 'optimizer', 'headroom_gb'\], not \['optimiser'\] "
                                         r"\(did you mean 'optimizer'"):
        validate_policy({"budget_gb": 4, "optimiser": "sgd"})


def test_more_segments_than_the_network_has_is_an_error():
    with pytest.raises(ValueError, match=r"\{'segments': 9\} asks for more runs than this network has segments \(8\): "
                                         r"give at most \{'segments': 8\}"):
        resolve_policy({"segments": 9}, SEGS)
