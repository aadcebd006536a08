"""API keys: the key file, tenants, and what a caller without a good key is told."""

from __future__ import annotations

import pytest

from sdserve.api.auth import DEFAULT_TENANT, ApiKeys
from sdserve.errors import PermissionDenied, Unauthenticated


def _keys(tmp_path, text):
    path = tmp_path / "keys.txt"
    path.write_text(text)
    return ApiKeys.load(path)


def test_keys_with_and_without_tenants(tmp_path):
    keys = _keys(tmp_path, "# key tenant\n\nsk-one acme\n  sk-two   globex\nsk-three\n")
    assert keys.tenant({"authorization": "Bearer sk-one"}) == "acme"
    assert keys.tenant({"authorization": "bearer sk-two"}) == "globex"
    assert keys.tenant({"authorization": "Bearer sk-three"}) == DEFAULT_TENANT


@pytest.mark.parametrize("metadata", [{}, {"authorization": "sk-one"},
                                      {"authorization": "Basic sk-one"},
                                      {"authorization": "Bearer "},
                                      {"authorization": "Bearer sk-on"},
                                      {"authorization": "Bearer sk-one2"}])  # fmt: skip
def test_missing_or_unknown_keys_are_unauthenticated_and_never_echoed(tmp_path, metadata):
    keys = _keys(tmp_path, "sk-one acme\n")
    with pytest.raises(Unauthenticated) as err:
        keys.tenant(metadata)
    assert err.value.code == "UNAUTHENTICATED"
    assert "sk-on" not in str(err.value)


def test_malformed_or_empty_key_files_fail_at_start(tmp_path):
    with pytest.raises(ValueError, match=":2: unknown role 'extra'"):
        _keys(tmp_path, "sk-one acme\nsk-two acme extra\n")
    with pytest.raises(ValueError, match=":2: expected KEY"):
        _keys(tmp_path, "sk-one acme\nsk-two acme admin more\n")
    with pytest.raises(ValueError, match="no API keys"):
        _keys(tmp_path, "# only a comment\n")


def test_only_keys_with_the_admin_role_may_administer(tmp_path):
    keys = _keys(tmp_path, "sk-boss acme admin\nsk-user acme\n")
    assert keys.admin({"authorization": "Bearer sk-boss"}) == "acme"
    assert keys.tenant({"authorization": "Bearer sk-boss"}) == "acme"  # also an ordinary key
    with pytest.raises(PermissionDenied) as err:
        keys.admin({"authorization": "Bearer sk-user"})
    assert err.value.code == "PERMISSION_DENIED" and "admin" in str(err.value)
    with pytest.raises(Unauthenticated):
        keys.admin({"authorization": "Bearer sk-nobody"})
