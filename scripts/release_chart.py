#!/usr/bin/env python3
"""Turns the source tree's chart into the chart of a release, whose default images exist.

Owns: the one difference between charts/mailroute in the repository and the chart the release
workflow pushes: the Chart annotation `mailroute.io/images-published` becomes "true" (the
templates then use the appVersion tag without asking for one) and `image.registry` in values.yaml
names the registry the workflow pushed the images to. Also the release's consistency rule: the
git tag is `v<appVersion>`. Used by .github/workflows/release.yml (after the images are pushed)
and by scripts/check_packaging.py (which renders the released chart the same way).
Must not: change anything else in the chart, or touch the network (helm package/push and the
image builds are the workflow's).

Usage: release_chart.py --out DIR --registry ghcr.io/OWNER [--tag vX.Y.Z] [--chart charts/mailroute]
  Writes DIR/mailroute (the release's chart) and prints its appVersion.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ANNOTATION = "mailroute.io/images-published"
# Registries as OCI references take lower-case names only (GitHub owners may have capitals).
REGISTRY = re.compile(r"^[a-z0-9.-]+(:[0-9]+)?(/[a-z0-9._-]+)*$")


class ReleaseError(Exception):
    pass


def app_version(chart: Path) -> str:
    m = re.search(r'^appVersion:\s*"?([^"\s]+)"?\s*$', (chart / "Chart.yaml").read_text(), re.M)
    if not m:
        raise ReleaseError(f"{chart}/Chart.yaml has no appVersion")
    return m.group(1)


def substitute(text: str, pattern: str, replacement: str, what: str) -> str:
    new, n = re.subn(pattern, replacement, text, flags=re.M)
    if n != 1:
        raise ReleaseError(f"expected exactly one {what}, found {n}")
    return new


def release_chart(chart: Path, out: Path, registry: str, tag: str | None = None) -> Path:
    """Copies `chart` to out/<name> as a published release for images in `registry`."""
    if not REGISTRY.fullmatch(registry):
        raise ReleaseError(f"registry {registry!r} is not a lower-case registry/path (e.g. ghcr.io/owner)")
    version = app_version(chart)
    if tag is not None and tag != f"v{version}":
        raise ReleaseError(f"tag {tag} does not match the chart's appVersion {version} (want v{version})")
    dest = out / chart.name
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(chart, dest)
    chart_yaml = dest / "Chart.yaml"
    chart_yaml.write_text(substitute(
        chart_yaml.read_text(), rf'^(\s+{re.escape(ANNOTATION)}:\s*)"false"\s*$', r'\1"true"', f"{ANNOTATION}: \"false\" annotation"))
    values = dest / "values.yaml"
    values.write_text(substitute(
        values.read_text(), r"^(image:\n(?:\s*#.*\n)*\s+registry:\s*)\S+$", rf"\g<1>{registry}", "top-level image.registry"))
    return dest


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chart", type=Path, default=ROOT / "charts" / "mailroute")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--registry", required=True)
    ap.add_argument("--tag")
    args = ap.parse_args()
    try:
        release_chart(args.chart, args.out, args.registry, args.tag)
    except ReleaseError as e:
        print(f"release_chart: {e}", file=sys.stderr)
        return 1
    print(app_version(args.chart))
    return 0


if __name__ == "__main__":
    sys.exit(main())
