"""Vendor one version of a CustomResourceDefinition's schema for the offline manifest checks (tests/test_deploy.py).

    python scripts/vendor_crd_schema.py CRD.yaml VERSION OUT.json.gz "SOURCE (repository@commit:path)"

Writes the version's ``openAPIV3Schema`` as gzipped JSON with the source recorded beside it (``x-caveat-source``).
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import yaml


def main(crd_path: str, version: str, out: str, source: str) -> None:
    crd = yaml.safe_load(Path(crd_path).read_text())
    schema = next(v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == version)
    schema = {**schema, "x-caveat-source": source}
    text = json.dumps(schema, sort_keys=True, separators=(",", ":")).encode()
    Path(out).write_bytes(gzip.compress(text, compresslevel=9, mtime=0))


if __name__ == "__main__":
    main(*sys.argv[1:])
