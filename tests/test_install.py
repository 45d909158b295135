"""`make setup`'s installer (.ci/install): uv gets exactly where pip is configured to install from."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]


def uv_args(tmp_path: Path, **env: str) -> list[str]:
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nindex-url = https://mirror.example/simple\n"
                    "extra-index-url = https://a.example/simple https://b.example/simple\n"
                    "find-links = /srv/global-wheels\ncert = /etc/hospital-ca.pem\n"
                    "[install]\nconstraint = /etc/pins.txt\nfind-links = /srv/install-wheels\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    done = subprocess.run([sys.executable, str(PROJECT / ".ci" / "pip_config.py")], capture_output=True, text=True,
                          env={**clean, "PIP_CONFIG_FILE": str(conf), **env}, check=True)
    return done.stdout.splitlines()


def test_pips_configuration_is_handed_to_uv_with_pips_precedence(tmp_path: Path) -> None:
    assert uv_args(tmp_path) == [
        "--index-url", "https://mirror.example/simple",
        "--extra-index-url", "https://a.example/simple", "--extra-index-url", "https://b.example/simple",
        "--find-links", "/srv/install-wheels",  # [install] over [global]
        "--constraint", "/etc/pins.txt",
        "SSL_CERT_FILE=/etc/hospital-ca.pem"]
    # the environment over the files; no-index and trusted hosts too
    args = uv_args(tmp_path, PIP_FIND_LINKS="/srv/env-wheels", PIP_TRUSTED_HOST="mirror.example", PIP_NO_INDEX="1")
    assert args[args.index("--find-links") + 1] == "/srv/env-wheels" and args.count("--find-links") == 1
    assert args[args.index("--allow-insecure-host") + 1] == "mirror.example" and "--no-index" in args
