"""Push payloads and their signatures, as GitHub and GitLab send them."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

import pytest

from testlooper.decisions.webhooks import PayloadError, github_signature_valid, gitlab_token_valid, repository_urls

GITHUB_PUSH = (Path(__file__).parent / "fixtures" / "webhooks" / "github-push.json").read_bytes()


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def test_a_real_github_push_names_its_repository_by_every_url_form():
    assert repository_urls("github", GITHUB_PUSH) == {"github.com/codertocat/hello-world"}


def test_github_signatures():
    assert github_signature_valid("s3cret", GITHUB_PUSH, sign("s3cret", GITHUB_PUSH))
    assert not github_signature_valid("s3cret", GITHUB_PUSH, sign("other", GITHUB_PUSH))
    assert not github_signature_valid("s3cret", GITHUB_PUSH + b" ", sign("s3cret", GITHUB_PUSH))
    assert not github_signature_valid("s3cret", GITHUB_PUSH, None)
    assert not github_signature_valid("s3cret", GITHUB_PUSH, "sha1=" + "0" * 40)
    assert not github_signature_valid("", GITHUB_PUSH, sign("", GITHUB_PUSH))  # no secret, no trust


def test_gitlab_push_and_token():
    body = json.dumps({"object_kind": "push", "ref": "refs/heads/main", "after": "a" * 40,
                       "project": {"git_http_url": "https://gitlab.example.com/Group/Sub/Proj.git",
                                   "git_ssh_url": "git@gitlab.example.com:Group/Sub/Proj.git"}}).encode()
    assert repository_urls("gitlab", body) == {"gitlab.example.com/group/sub/proj"}
    assert gitlab_token_valid("tok", "tok") and not gitlab_token_valid("tok", "tok2")
    assert not gitlab_token_valid("tok", None) and not gitlab_token_valid("", "")


@pytest.mark.parametrize("body, message", [
    (b"not json", "not JSON"), (b"[1, 2]", "not a JSON object"), (b'{"ref": "x"}', "names no repository"),
    (b"[" * 100_000, "nested too deeply"),  # anyone may send it, before any signature is checked
    (b'{"repository": ' * 100_000, "nested too deeply"),
])
def test_bad_payloads_say_what_is_wrong(body, message):
    with pytest.raises(PayloadError, match=message):
        repository_urls("github", body)
