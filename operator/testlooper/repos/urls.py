"""Git URLs: one normal form, so a webhook payload's repository matches the Repo that names it,
and a URL's embedded credentials never reach a log."""

from __future__ import annotations

import re

_SCP_LIKE = re.compile(r"^(?:[^@/]+@)?(?P<host>[^:/]+):(?P<path>(?!//).+)$")  # git@host:org/repo.git
_URL = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*)://(?:(?P<userinfo>[^@/]*)@)?(?P<host>[^/]*)(?P<path>/.*)?$")
_CREDENTIALS_IN_URL = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^@/\s]+@")


def normalize_url(url: str) -> str:
    """`https://github.com/Org/Repo.git`, `git@github.com:Org/Repo`, `ssh://git@github.com/Org/Repo/`
    and `git://github.com/Org/Repo.git` all become `github.com/org/repo`; `file:///srv/x.git` becomes
    `/srv/x`. Host and path are compared without case, as GitHub and GitLab do; users, ports of the
    standard schemes and a trailing `.git` or `/` are left out."""
    url = url.strip()
    match = _URL.match(url)
    if match:
        host = match["host"].lower()
        scheme = match["scheme"].lower()
        for default_port in (":443", ":80", ":22", ":9418"):
            if host.endswith(default_port) and scheme in ("https", "http", "ssh", "git"):
                host = host.removesuffix(default_port)
        path = match["path"] or ""
        location = f"{host}{path}" if scheme != "file" else path
    else:
        scp = _SCP_LIKE.match(url)
        location = f"{scp['host'].lower()}/{scp['path']}" if scp else url
    location = location.rstrip("/")
    location = location.removesuffix(".git").rstrip("/")
    return location.lower()


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """`text` with every `scheme://user:password@` cut to `scheme://***@`, and each of `secrets`
    (tokens, passwords) replaced by `***`: git's own messages quote the URL it failed on."""
    text = _CREDENTIALS_IN_URL.sub(lambda m: f"{m['scheme']}***@", text)
    for secret in secrets:
        if secret and len(secret) >= 4:  # a tiny "secret" would redact ordinary words
            text = text.replace(secret, "***")
    return text


def url_host(url: str) -> str:
    """The host a git URL talks to, lower case, without user or port: `git.example.com` for
    `https://u@git.example.com:8443/x.git` and `git@git.example.com:x.git`; "" for file:// and
    local paths (nothing leaves the machine)."""
    url = url.strip()
    match = _URL.match(url)
    if match:
        if match["scheme"].lower() == "file":
            return ""
        host = match["host"].rsplit("@", 1)[-1]
        if host.startswith("["):  # [::1]:22
            return host[1:host.find("]")].lower()
        return host.split(":", 1)[0].lower()
    scp = _SCP_LIKE.match(url)
    return scp["host"].lower() if scp else ""


def url_scheme(url: str) -> str:
    """`https`, `http`, `ssh`, `git`, `file`; `ssh` for the scp-like form; "" for a local path."""
    match = _URL.match(url.strip())
    if match:
        return match["scheme"].lower()
    return "ssh" if _SCP_LIKE.match(url.strip()) else ""
