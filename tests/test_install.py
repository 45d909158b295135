"""`make setup`'s installer (.ci/install): uv gets what pip is configured to install from (.ci/pip_config.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("pip_config", PROJECT / ".ci" / "pip_config.py")
pip_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pip_config)


def test_pips_settings_reach_uv_with_pips_precedence_and_no_secret_on_the_command_line(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    listing = "\n".join([  # `pip config list` of a hospital's machine: files, then the environment
        "global.index-url='https://user:token@mirror.example/simple'",
        "global.extra-index-url='https://a.example/simple https://b.example/simple'",
        "global.find-links='/srv/global-wheels'",
        f"install.find-links='{wheels} /srv/missing-wheels'",
        "global.constraint='/etc/pins.txt'",
        "global.cert='/etc/hospital-ca.pem'",
        "global.no-index='false'",
        ":env:.default-timeout='180'",
        ":env:.trusted-host='mirror.example'",
        ":env:.only-binary=':all:'",
        ":env:.disable-pip-version-check='1'",
        ":env:.src='/srv/src'",
    ])
    env, args, notes = pip_config.uv_settings(pip_config.merged(listing))
    assert env == {"UV_INDEX_URL": "https://user:token@mirror.example/simple",
                   "UV_EXTRA_INDEX_URL": "https://a.example/simple https://b.example/simple",
                   "UV_FIND_LINKS": str(wheels),  # [install] over [global]; a missing folder skipped, as pip does
                   "UV_CONSTRAINT": "/etc/pins.txt", "UV_INSECURE_HOST": "mirror.example", "UV_HTTP_TIMEOUT": "180",
                   "SSL_CERT_FILE": "/etc/hospital-ca.pem"}
    assert args == ["--only-binary", ":all:"] and not any("token" in a for a in args)
    assert any("/srv/missing-wheels" in n for n in notes) and any("src=" in n for n in notes)  # said, not dropped
    assert not any("disable-pip-version-check" in n for n in notes)
    # the environment over the files, pip's spellings of "true"
    _, args, _ = pip_config.uv_settings(pip_config.merged(listing + "\n:env:.no-index='yes'\n:env:.pre='t'"))
    assert "--no-index" in args and args[args.index("--prerelease") + 1] == "allow"
