"""Which s3:// and hf:// URIs a runtime API load may fetch (NIM_PEFT_API_ALLOWED_PATHS)."""

from __future__ import annotations

import pytest

from entrypoint.adapters.uris import split_allowed, uri_problem

ALLOWED = split_allowed("/opt/loras:s3://bucket/loras,hf://acme:hf://other/one")


def test_the_list_splits_on_colons_and_commas_but_not_inside_a_uri():
    assert ALLOWED == ["/opt/loras", "s3://bucket/loras", "hf://acme", "hf://other/one"]
    assert split_allowed("/a:/b") == ["/a", "/b"]  # today's folder lists keep working
    assert split_allowed(None) == []


@pytest.mark.parametrize("uri", [
    "s3://bucket/loras/sql", "s3://bucket/loras/team/sql/", "hf://acme/sql-lora",
    "hf://other/one",
])
def test_a_uri_under_a_listed_prefix_is_allowed(uri):
    assert uri_problem(uri, ALLOWED) is None


@pytest.mark.parametrize(("uri", "says"), [
    ("s3://bucket/loras-private/sql", "not under a prefix"),  # a prefix of the text only
    ("s3://bucket/other/sql", "not under a prefix"),
    ("s3://elsewhere/loras/sql", "not under a prefix"),
    ("hf://acmeevil/sql", "not under a prefix"),
    ("hf://other/two", "not under a prefix"),
    ("s3://bucket/loras/../secret/x", "'..' segment"),
    ("s3://bucket/loras/./x", "'.' or '..' segment"),
    ("s3://bucket/loras//x", "empty"),
    ("s3://bucket/loras/%2e%2e/secret", "'%'"),
    ("hf://acme/x%2f..%2fy", "'%'"),
    ("s3://bucket/loras/x?versionId=1", "'?'"),
    ("hf://acme/x#main", "'#'"),
    ("s3://bucket/loras/a\\..\\b", "'\\'"),
    ("s3://bucket/loras/a\nb", "control character"),
    ("gs://bucket/loras/x", "not an s3:// or hf:// URI"),
])
def test_anything_else_is_refused_and_says_why(uri, says):
    problem = uri_problem(uri, ALLOWED)
    assert problem is not None and says in problem


def test_with_no_prefix_listed_no_uri_is_allowed():
    problem = uri_problem("hf://acme/sql", ["/opt/loras"])
    assert problem is not None and "prefixes listed: none" in problem
    assert "NIM_PEFT_API_ALLOWED_PATHS" in problem
