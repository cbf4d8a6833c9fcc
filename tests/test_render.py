"""tests.render is the inverse of the parser: every generated world written as
manifests reads back as the same values."""

from hypothesis import given, settings

from control.semantics.manifests import Document, build_cluster
from tests.render import cluster_docs
from tests.worlds import random_world, worlds


def roundtrip(cset):
    for name, state in cset.clusters.items():
        docs = [Document("rendered", d) for d in cluster_docs(state)]
        back = build_cluster(name, docs, strict=True).state
        assert {k: _strip(v) for k, v in back.namespaces.items()} == {k: _strip(v) for k, v in state.namespaces.items()}
        assert {k: _strip(v) for k, v in back.pods.items()} == {k: _strip(v) for k, v in state.pods.items()}
        want = {k: _strip(v) for k, v in state.policies.items() if not v.rejected}
        assert {k: _strip(v) for k, v in back.policies.items()} == want


def _strip(obj):
    import dataclasses

    return dataclasses.replace(obj, source="")


@settings(max_examples=50, deadline=None)
@given(worlds())
def test_generated_worlds_roundtrip(cset):
    roundtrip(cset)


def test_a_large_random_world_roundtrips():
    roundtrip(random_world(5, clusters=2, pods_per_cluster=200, policies_per_cluster=40))
