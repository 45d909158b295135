"""pip's configuration as uv arguments, one per line (what .ci/install hands `uv pip install`): index-url,
extra-index-url, find-links, constraint, trusted-host and no-index as options, cert as SSL_CERT_FILE=<path>.

Run with the Python whose pip is configured (`python .ci/pip_config.py`); the files and PIP_* variables that pip
reads are read by pip itself (`pip config list`), with pip's precedence: global < install < the environment.
"""

import ast
import subprocess
import sys

listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True)
by_section: dict[str, dict[str, str]] = {"global": {}, "install": {}, ":env:": {}}
for line in listed.stdout.splitlines():  # `section.key='value'`
    where, _, value = line.partition("=")
    section, _, key = where.rpartition(".")
    if section in by_section and value:
        by_section[section][key] = ast.literal_eval(value)
config = {**by_section["global"], **by_section["install"], **by_section[":env:"]}  # pip's precedence
options = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
           "constraint": "--constraint", "trusted-host": "--allow-insecure-host"}
for key, option in options.items():
    for value in config.get(key, "").split():
        print(option)
        print(value)
if config.get("no-index", "").lower() in ("1", "true", "yes", "on"):
    print("--no-index")
if config.get("cert"):
    print(f"SSL_CERT_FILE={config['cert']}")
