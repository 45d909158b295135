"""pip's configuration as settings for `uv pip install` (what .ci/install hands it).

Run with the Python whose pip is configured (`python .ci/pip_config.py`): pip reads its own files and PIP_*
variables (`pip config list`), and this prints one line per setting, with pip's precedence (global < install <
the environment):

- ``env NAME=VALUE``: an environment variable for uv. Indexes go this way, not as arguments: an index URL may hold
  a password, which a command line shows to every user of the machine;
- ``arg OPTION``: an argument for uv (no secrets);
- ``note TEXT``: a pip setting that has no counterpart here, or a find-links folder that does not exist (pip skips
  one with a warning; uv would stop).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

TRUE = ("1", "y", "yes", "t", "true", "on")  # pip's strtobool
# pip settings that change nothing about what is installed, or that .ci/install sets itself
NEUTRAL = {"disable-pip-version-check", "no-cache-dir", "cache-dir", "quiet", "verbose", "progress-bar", "no-input",
           "root-user-action", "no-warn-script-location", "require-virtualenv", "no-color", "log", "isolated"}


def merged(listing: str) -> dict[str, str]:
    """`pip config list`'s ``section.key='value'`` lines, merged as pip merges them for `pip install`."""
    by_section: dict[str, dict[str, str]] = {"global": {}, "install": {}, ":env:": {}}
    for line in listing.splitlines():
        where, _, value = line.partition("=")
        section, _, key = where.rpartition(".")
        if section in by_section and value:
            by_section[section][key] = str(ast.literal_eval(value))
    return {**by_section["global"], **by_section["install"], **by_section[":env:"]}


def uv_settings(config: dict[str, str]) -> tuple[dict[str, str], list[str], list[str]]:
    """(environment, arguments, notes) for `uv pip install` from pip's merged configuration."""
    env: dict[str, str] = {}
    args: list[str] = []
    notes: list[str] = []

    def words(key: str) -> list[str]:
        return config.get(key, "").split()

    if config.get("index-url"):
        env["UV_INDEX_URL"] = config["index-url"]
    if words("extra-index-url"):
        env["UV_EXTRA_INDEX_URL"] = " ".join(words("extra-index-url"))
    links = []
    for link in words("find-links"):
        local = link.removeprefix("file://") if link.startswith("file://") or "://" not in link else None
        if local is not None and not os.path.exists(local):
            notes.append(f"pip's find-links {link} does not exist: skipped, as pip skips it")
        else:
            links.append(link)
    if links:
        env["UV_FIND_LINKS"] = ",".join(links)
    for key, name in (("constraint", "UV_CONSTRAINT"), ("trusted-host", "UV_INSECURE_HOST")):
        if words(key):
            env[name] = " ".join(words(key))
    timeout = config.get("timeout") or config.get("default-timeout")
    if timeout:
        env["UV_HTTP_TIMEOUT"] = str(max(1, round(float(timeout))))
    if config.get("retries"):
        env["UV_HTTP_RETRIES"] = config["retries"]
    if config.get("proxy"):
        env["HTTPS_PROXY"] = env["HTTP_PROXY"] = config["proxy"]
    if config.get("cert"):
        env["SSL_CERT_FILE"] = config["cert"]
    if config.get("client-cert"):
        env["SSL_CLIENT_CERT"] = config["client-cert"]
    if config.get("keyring-provider"):
        env["UV_KEYRING_PROVIDER"] = config["keyring-provider"]
    if config.get("no-index", "").lower() in TRUE:
        args.append("--no-index")
    if config.get("pre", "").lower() in TRUE:
        args += ["--prerelease", "allow"]
    for key in ("only-binary", "no-binary"):
        for value in words(key):
            args += [f"--{key}", value]
    handled = {"index-url", "extra-index-url", "find-links", "constraint", "trusted-host", "timeout",
               "default-timeout", "retries", "proxy", "cert", "client-cert", "keyring-provider", "no-index", "pre",
               "only-binary", "no-binary"}
    for key in sorted(set(config) - handled - NEUTRAL):
        notes.append(f"pip's {key}={config[key]!r} has no uv counterpart here and is ignored "
                     "(MEDEXPERTS_INSTALLER=pip honours it)")
    return env, args, notes


def main() -> None:
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                            check=True)
    env, args, notes = uv_settings(merged(listed.stdout))
    lines = [f"env {k}={v}" for k, v in env.items()] + [f"arg {a}" for a in args] + [f"note {n}" for n in notes]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
