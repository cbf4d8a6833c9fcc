"""Property-based tests of label-selector semantics (matchLabels and the four
matchExpressions operators), against an independent reading of the raw dictionary."""

from hypothesis import given, settings
from hypothesis import strategies as st

from control.semantics.model import MC_KEY, Options, effective_labels
from control.semantics.objects import _Ctx, selector

KEYS = st.sampled_from(["app", "tier", "env", "example.com/role", MC_KEY])
VALUES = st.sampled_from(["a", "b", "c", "prod", "c1", "c2"])
LABELS = st.dictionaries(KEYS, VALUES, max_size=5)


@st.composite
def expressions(draw):
    op = draw(st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist"]))
    expr = {"key": draw(KEYS), "operator": op}
    if op in ("In", "NotIn"):
        expr["values"] = draw(st.lists(VALUES, min_size=1, max_size=3))
    return expr


RAW_SELECTORS = st.fixed_dictionaries({}, optional={"matchLabels": LABELS, "matchExpressions": st.lists(expressions(), max_size=4)})


def oracle(raw: dict, labels: dict) -> bool:
    """The API reference, read directly off the raw selector."""
    for k, v in (raw.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in raw.get("matchExpressions") or []:
        present = e["key"] in labels
        if e["operator"] == "In" and not (present and labels[e["key"]] in e["values"]):
            return False
        if e["operator"] == "NotIn" and present and labels[e["key"]] in e["values"]:
            return False
        if e["operator"] == "Exists" and not present:
            return False
        if e["operator"] == "DoesNotExist" and present:
            return False
    return True


CTX = _Ctx("test", {"kind": "NetworkPolicy", "metadata": {"name": "p"}})


@settings(max_examples=400, deadline=None)
@given(RAW_SELECTORS, LABELS)
def test_selector_matches_like_the_api_reference(raw, labels):
    assert selector(CTX, raw, "s").matches(labels) == oracle(raw, labels)


@given(LABELS)
def test_empty_selector_selects_everything(labels):
    assert selector(CTX, {}, "s").matches(labels)


@given(KEYS, st.lists(VALUES, min_size=1, max_size=3), LABELS)
def test_notin_is_the_complement_of_in(key, values, labels):
    sel_in = selector(CTX, {"matchExpressions": [{"key": key, "operator": "In", "values": values}]}, "s")
    sel_out = selector(CTX, {"matchExpressions": [{"key": key, "operator": "NotIn", "values": values}]}, "s")
    assert sel_in.matches(labels) != sel_out.matches(labels)


@given(KEYS, LABELS)
def test_doesnotexist_is_the_complement_of_exists(key, labels):
    a = selector(CTX, {"matchExpressions": [{"key": key, "operator": "Exists"}]}, "s")
    b = selector(CTX, {"matchExpressions": [{"key": key, "operator": "DoesNotExist"}]}, "s")
    assert a.matches(labels) != b.matches(labels)


@given(RAW_SELECTORS, RAW_SELECTORS, LABELS)
def test_requirements_are_anded(r1, r2, labels):
    both = {
        "matchLabels": {**(r1.get("matchLabels") or {}), **(r2.get("matchLabels") or {})},
        "matchExpressions": (r1.get("matchExpressions") or []) + (r2.get("matchExpressions") or []),
    }
    if set(r1.get("matchLabels") or {}) & set(r2.get("matchLabels") or {}):
        return  # merged matchLabels would lose a requirement
    assert selector(CTX, both, "s").matches(labels) == (oracle(r1, labels) and oracle(r2, labels))


@given(LABELS, st.sampled_from(["c1", "c2", "c3"]))
def test_virtual_cluster_label_overrides_what_users_set(labels, cluster):
    on = effective_labels(labels, cluster, Options())
    assert on[MC_KEY] == cluster and {k: v for k, v in on.items() if k != MC_KEY} == {k: v for k, v in labels.items() if k != MC_KEY}
    assert effective_labels(labels, cluster, Options(multicluster=False)) == labels
