"""Mask secrets in URLs before they reach a log line, an error message or MLflow.

URLs carry credentials in two places: the userinfo (``scheme://user:password@host``, or a bare
token as the user, as in ``https://<token>@host``) and the query or fragment
(``?token=...``, ``&X-Amz-Signature=...``). Everything else is kept byte for byte, so the
redacted URL still tells the reader which host, path and database were meant.
"""

from __future__ import annotations

import re
import urllib.parse

MASK = "***"

# scheme://userinfo@ - the authority ends at the first / ? or #, and userinfo at its last @
# (passwords sometimes contain an unencoded @).
_USERINFO = re.compile(r"^(?P<prefix>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#]*)@")
_PARAM = re.compile(r"(?P<name>[^&;=]+)=(?P<value>[^&;]*)")
# Substrings of parameter names whose values are secrets: password/passwd/pass, pwd, token,
# access_token, secret, client_secret, key, api_key, apikey, sig, signature (S3 and Azure
# presigned URLs), credential, auth. Masking a harmless value by mistake only costs log detail.
_SECRET_NAME = re.compile(r"pass|pwd|token|secret|key|sig|credential|auth", re.IGNORECASE)


def _redact_userinfo(userinfo: str) -> str:
    """``user:password`` -> ``user:***``; a lone name may be a token, so it is masked too."""
    user, colon, password = userinfo.partition(":")
    if colon:
        return f"{user}:{MASK}" if password else userinfo
    return MASK if user else userinfo


def _redact_params(text: str) -> str:
    def mask(match: re.Match[str]) -> str:
        name = urllib.parse.unquote_plus(match["name"])
        if _SECRET_NAME.search(name) and match["value"]:
            return f"{match['name']}={MASK}"
        return match[0]

    return _PARAM.sub(mask, text)


def redact_url(url: str) -> str:
    """``url`` with passwords, userinfo tokens and secret query/fragment values replaced by ***.

    Plain paths and URLs without secrets come back unchanged; this never raises, because it is
    called while reporting another error.
    """
    text = str(url)
    match = _USERINFO.match(text)
    if match:
        head = match["prefix"] + _redact_userinfo(match["userinfo"]) + "@"
        rest = text[match.end():]
    else:
        head, rest = "", text
    # Only a URL (something with a scheme) has a query; a local path may contain '?' or '#'.
    if match or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", text):
        path, hash_, fragment = rest.partition("#")
        path, question, query = path.partition("?")
        rest = path + question + _redact_params(query) + hash_ + _redact_params(fragment)
    return head + rest
