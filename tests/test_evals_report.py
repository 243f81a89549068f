"""The HTML report renders in a real headless browser (Debian package `chromium`), images included."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np

from evals import cli
from evals.suite import default_suite
from evals.testing import OracleGenerator

IMG_CHECK = """<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 100 && i.naturalHeight > 100).length;
  const m = document.createElement('div');
  m.id = 'img-check';
  m.textContent = 'IMAGES_LOADED ' + ok + '/' + imgs.length;
  document.body.appendChild(m);
});
</script></body>"""


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "headless browser missing: apt-get install -y chromium"
    return exe


def browse(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={profile}", "--allow-file-access-from-files", *extra, url]
    env = {**os.environ, "DBUS_SESSION_BUS_ADDRESS": "disabled:"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)


def test_compare_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    bench = default_suite(["arithmetic", "mc", "heldout_text"], n=60).benchmarks
    for name, acc in (("base", {"arithmetic": 0.4, "mc": 0.9}), ("sft", {"arithmetic": 0.85, "mc": 0.8})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "acc.json").write_text(json.dumps(acc))
    cli.set_generator_factory(lambda p: OracleGenerator(Path(p).name, bench,
                                                        json.loads((Path(p) / "acc.json").read_text())))
    curves = tmp_path / "loss.json"
    curves.write_text(json.dumps({"train": [[s, 3.0 / (1 + s / 20)] for s in range(0, 200, 5)],
                                  "val": [[s, 3.2 / (1 + s / 25)] for s in range(0, 200, 50)]}))
    p = argparse.ArgumentParser(prog="tuneloop")
    cli.add_eval_commands(p.add_subparsers(dest="cmd", required=True))
    report_dir = tmp_path / "report"
    gate = tmp_path / "gate.yaml"
    gate.write_text("targets: [arithmetic]\nguards: [mc]\nguard_margin: 0.05\n")
    args = p.parse_args(["compare", str(tmp_path / "base"), str(tmp_path / "sft"), "--results-dir",
                         str(tmp_path / "res"), "--benchmarks", "arithmetic,mc,heldout_text", "--n", "60",
                         "--report", str(report_dir), "--loss-curves", str(curves), "--gate", str(gate)])
    try:
        rc = args.func(args)
    finally:
        cli.set_generator_factory(None)
    index = report_dir / "index.html"
    page = index.read_text()
    # mc drops 0.9 -> 0.8, far beyond the 0.05 margin: the gate fails and the command says so (exit 1)
    assert rc == 1
    assert {"scores.png", "forest.png", "loss.png"} <= {p.name for p in report_dir.glob("*.png")}
    assert "fixed by B" in page and "broken by B" in page
    assert "Gate: FAILED" in page and "FAIL guard mc" in page

    # 1) DOM after load: every <img> decoded with real pixel dimensions.
    probe = report_dir / "probe.html"
    probe.write_text(page.replace("</body>", IMG_CHECK))
    dom = browse(probe.as_uri(), tmp_path / "profile", "--virtual-time-budget=5000", "--dump-dom")
    m = re.search(r"IMAGES_LOADED (\d+)/(\d+)", dom.stdout)
    assert m, f"no marker in DOM; stderr: {dom.stderr[-2000:]}"
    assert m.group(1) == m.group(2) == "3"

    # 2) Screenshot of the real page: produced, not blank, with plot-like colour variety.
    shot = tmp_path / "shot.png"
    res = browse(index.as_uri(), tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2200")
    assert shot.exists() and shot.stat().st_size > 10_000, res.stderr[-2000:]
    img = mpimg.imread(shot)[..., :3]
    non_white = np.mean(np.any(img < 0.95, axis=-1))
    colours = len(np.unique((img * 255).astype(np.uint8).reshape(-1, 3), axis=0))
    assert non_white > 0.05 and colours > 200, (non_white, colours)
    # The orange/blue bars of the score plot are there (matplotlib tab10 colours).
    blue = np.all(np.abs(img - np.array([0x1F, 0x77, 0xB4]) / 255) < 0.03, axis=-1).sum()
    assert blue > 500
