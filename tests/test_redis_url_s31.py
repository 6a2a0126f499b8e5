"""A Redis password with an unencoded '/', '?' or '#' ends the URL's authority early: shown_url masked only up to
that point, and the password's rest was logged (``redis://:s3cr@t/x@127.0.0.1:6379/0`` showed
``***@t/x@127.0.0.1...``). ``config check`` refused most such URLs for another reason (a db that is no number, a
query), sending the operator the wrong way; it now says to percent-encode the password."""

from __future__ import annotations

import pytest

from tests.test_cli_fixes2 import _config
from tokenwire.daemon.config import ConfigError, load_config
from tokenwire.daemon.logs import shown_url


@pytest.mark.parametrize(("url", "shown", "secret"), [
    ("redis://:s3cr@t/x@127.0.0.1:6379/0", "redis://***@127.0.0.1:6379/0", "t/x"),  # (the review's)
    ("redis://:pa/ss@127.0.0.1:6379/0", "redis://***@127.0.0.1:6379/0", "pa/"),
    ("redis://:pa?ss@127.0.0.1:6379/0", "redis://***@127.0.0.1:6379/0", "pa?"),
    ("rediss://:pa#ss@redis:6380/1", "rediss://***@redis:6380/1", "pa#"),
    ("redis://:a@b?c@redis/0", "redis://***@redis/0", "b?c"),
    ("redis://user:pa/s?s@redis/0", "redis://***@redis/0", "pa/s"),
    ("unix://:pa/ss@/run/redis/redis.sock", "unix://***@/run/redis/redis.sock", "pa/"),
])
def test_a_password_cut_by_slash_question_mark_or_hash_is_masked_whole(url, shown, secret):
    assert shown_url(url) == shown and secret not in shown_url(url)


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:6379/0",
    "unix:///run/redis@main/redis.sock",  # (no authority: an '@' in a socket's path is no password's)
    "https://api.example.com/v1",
])
def test_a_url_without_userinfo_is_shown_as_it_is(url):
    assert shown_url(url) == url


def test_a_query_after_a_userinfo_found_keeps_its_at_sign():
    """Its userinfo ended in the authority (an '@' of its own, then '/'): an '@' only in the query is not the
    password's, and the host stays shown."""
    url = "http://u:p@ss@127.0.0.1:9/v1/chat/completions?x=a@b"
    assert shown_url(url) == "http://***@127.0.0.1:9/v1/chat/completions?x=a@b"


@pytest.mark.parametrize("url", ["redis://:s3cr@t/x@127.0.0.1:6379/0", "rediss://:a@b/0@redis:6380/0",
                                 "redis://:s3cr@t/0#x@h/0"])
def test_a_redis_url_with_an_at_sign_after_its_host_is_refused_naming_the_cure(tmp_path, url):
    """``redis://:s3cr@t/x@HOST/0`` is host "t" to the client: it was refused as "the path must be a database number"
    (or "no ?query or #fragment"), none of which names the password."""
    with pytest.raises(ConfigError, match=r"kv\.redis_url: an '@' after the host") as caught:
        load_config(_config(tmp_path, f'[kv]\nbackend = "redis"\nredis_url = "{url}"\n'))
    said = str(caught.value)
    assert "percent-encode the password" in said and "s3cr" not in said and "@t" not in said


@pytest.mark.parametrize("url", ["redis://:s3cr%40t%2Fx@127.0.0.1:6379/0", "unix:///run/redis@main/redis.sock",
                                 "redis://u:p@ss@h:6379/0"])
def test_an_encoded_password_or_a_socket_path_with_an_at_sign_still_loads(tmp_path, url):
    assert load_config(_config(tmp_path, f'[kv]\nbackend = "redis"\nredis_url = "{url}"\n')).kv.redis_url == url
