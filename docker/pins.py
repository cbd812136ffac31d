"""pyproject.toml's pins for the image: what to download, and whether an image's ``pip freeze`` matches.

python docker/pins.py requirements     the exact pins of [project.dependencies] but torch, one per line
python docker/pins.py torch            the torch version
python docker/pins.py check FREEZE     every pin of pyproject.toml and requirements/nodeps.txt is in FREEZE
                                       at that version, and torchvision is not (exit 1 otherwise)
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse(lines: list[str]) -> dict[str, str]:
    """Package → version of exact pins (comments and blank lines skipped)."""
    found = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise SystemExit(f"not an exact pin: {line!r}")
        found[normalise(name)] = version.strip()
    return found


def project_pins() -> dict[str, str]:
    return parse(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])


def pins() -> dict[str, str]:
    """pyproject's dependencies and requirements/nodeps.txt (installed with --no-deps)."""
    return project_pins() | parse((ROOT / "requirements" / "nodeps.txt").read_text().splitlines())


def check(freeze: Path) -> list[str]:
    installed = {}
    for line in freeze.read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep:
            installed[normalise(name)] = version.split("+", 1)[0]  # torch 2.13.0+cpu is torch 2.13.0
    problems = [
        f"{name}: pinned {version}, image has {installed.get(name, 'nothing')}"
        for name, version in pins().items()
        if installed.get(name) != version
    ]
    if "torchvision" in installed:
        problems.append("torchvision is installed")
    return problems


def main(argv: list[str]) -> int:
    if argv[:1] == ["requirements"]:
        print("\n".join(f"{name}=={version}" for name, version in project_pins().items() if name != "torch"))
    elif argv[:1] == ["torch"]:
        print(pins()["torch"])
    elif argv[:1] == ["check"] and len(argv) == 2:
        problems = check(Path(argv[1]))
        for problem in problems:
            print(problem)
        print(f"image pins: {'MISMATCH' if problems else 'match pyproject.toml and requirements/nodeps.txt'}")
        return 1 if problems else 0
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
