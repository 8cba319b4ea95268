"""`greenrun report`: synthetic runs (events, missing energy keys, two side by side, one in a bucket), the
equivalents arithmetic, the CLI's exit codes, and the HTML as headless Chromium renders it."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from greenrun import cli, report
from greenrun.report import series
from greenrun.runtime import equivalents
from tests.common import run_cli

pytest_plugins = ["tests.s3_fixtures"]

FIGURES = ("loss", "lr", "throughput", "power", "ledger")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def metrics_lines(
    steps: int = 40, energy: bool = True, events: bool = True, slope: float = 0.05, preempt_at: int = 20
) -> list[dict]:
    """What a run of `steps` steps logs every 5 steps: a train line, a val loss every 10, ledger keys, and
    a preemption at `preempt_at` whose resume went back 5 steps to the newest checkpoint."""
    lines: list[dict] = [{"step": 0, "tokens": 0, "val_loss": 8.3}]
    for step in range(5, steps + 1, 5):
        r = {
            "step": step,
            "tokens": step * 4096,
            "loss": 8.0 - slope * step,
            "lr": 1e-3 * min(1.0, step / 10),
            "grad_norm": 1.0,
            "elapsed_s": 2.0 * step,
            "tok_per_s": 2048.0,
        }
        if energy:
            kwh = 0.0005 * step
            r |= {
                "kwh": kwh,
                "kgco2e": kwh * 0.47,
                "usd": 0.01 * step,
                "gpu_hours": step / 1800,
                "tokens_per_kwh": step * 4096 / kwh,
                "power_w": 300.0 + step,
                "energy_source": "measured",
            }
        if step % 10 == 0:
            r["val_loss"] = 8.1 - slope * step
        lines.append(r)
        if events and step == preempt_at:
            lines.append({"event": "preempt", "step": step})
            lines.append(
                {"event": "resume", "step": step - 5, "lost_steps": 5, "lost_s": 10.0, "wait_s": 30.0}
            )
    return lines


def write_run(path: Path, lines: list[dict], ledger: bool = True, config: str = "") -> Path:
    path.mkdir(parents=True)
    last = [r for r in lines if "event" not in r][-1]
    summary: dict = {"step": last["step"], "tokens": last["tokens"], "val_loss": last.get("val_loss")}
    summary["run_wall_s"] = last["elapsed_s"] + 1.0
    summary["energy"] = {"kwh": None, "kg_co2": None, "usd": None, "gpu_hours": 0.0}  # as older runs wrote it
    if ledger:
        summary["ledger"] = {k: last[k] for k in series.LEDGER_KEYS} | {"energy_source": "measured"}
    text = "\n".join(json.dumps(r) for r in lines) + "\n"
    (path / "metrics.jsonl").write_text(text + '{"step": 41, "tok')  # a torn last line, as a kill leaves
    (path / "summary.json").write_text(json.dumps(summary))
    (path / "config.yaml").write_text(
        config or "model:\n  name: tiny\n  n_layer: 2\nprecision:\n  name: bf16\n"
    )
    return path


def images(document: str) -> dict[str, bytes]:
    """figure id -> the PNG its <img> carries."""
    found = re.findall(r'<figure id="fig-([a-z]+)"><img [^>]*src="data:image/png;base64,([^"]+)"', document)
    return {key: base64.b64decode(data) for key, data in found}


def test_one_run_with_a_preemption_and_a_resume(tmp_path: Path, capsys, caplog) -> None:
    run = write_run(tmp_path / "run-a", metrics_lines())
    path = report.make([str(run)])
    assert path == run / "report.html"
    document = path.read_text()
    pngs = images(document)
    assert set(pngs) == set(FIGURES)
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in pngs.values())
    # Self-contained: every src/href is a data: URI or a fragment, and there is no script to run.
    assert all(v.startswith(("data:", "#")) for v in re.findall(r'(?:src|href)="([^"]*)"', document))
    assert "<script" not in document and "<link" not in document
    t = series.totals(report.load(str(run)))
    assert (t["steps"], t["tokens"], t["resumes"], t["preempts"], t["lost_steps"]) == (40, 163840, 1, 1, 5)
    assert t["kwh"] == pytest.approx(0.02) and t["energy_source"] == "measured"
    assert "1 (1 preempted)" in document and "5 (10 s)" in document
    assert "<td>resume</td>" in document.replace(' class="text"', "")
    for eq in equivalents.EQUIVALENTS:
        assert eq.source in document and eq.factor_text in document
    out = capsys.readouterr()
    assert "run-a" in out.out and "measured" in out.out
    assert "skipped 1 line" in caplog.text  # the torn line is named, not fatal


def test_a_run_without_energy_keys_still_gets_a_report(tmp_path: Path) -> None:
    run = write_run(tmp_path / "old", metrics_lines(energy=False, events=False), ledger=False)
    runs = [report.load(str(run))]
    t = series.totals(runs[0])
    assert t["kwh"] is None and t["kgco2e"] is None and t["usd"] is None and t["energy_source"] == "unknown"
    plots = {p.key: p for p in report.plots.figures(runs)}
    assert plots["power"].not_measured == ["old"] and plots["ledger"].not_measured == ["old"]
    assert plots["loss"].not_measured == [] and plots["throughput"].not_measured == []
    document = report.make([str(run)], out=tmp_path / "old.html").read_text()
    assert set(images(document)) == set(FIGURES)
    assert "Not measured: old." in document and "No resume or preemption was recorded." in document
    row = re.search(r'<table id="equivalents">.*?<tbody><tr>(.*?)</tr>', document).group(1)
    assert row.count(">-</td>") == 5  # kWh, kg CO2e and the three equivalents: unknown, not zero


def test_power_from_device_joules_when_power_w_is_missing(tmp_path: Path) -> None:
    lines = metrics_lines(energy=False, events=False)
    for i, r in enumerate(lines[1:], 1):
        # 250 W throughout; a second process from 45 s on (a resume) counts its joules from zero again,
        # so the window across the restart says nothing and is skipped.
        r["joules"] = 250.0 * (r["elapsed_s"] - (45.0 if i >= 5 else 0.0))
    steps, watts, how = series.power(report.Run("j", "j", [r for r in lines if "event" not in r]))
    assert how == "device joules over time" and len(steps) == len(lines) - 3
    assert watts == pytest.approx([250.0] * len(steps))


def test_two_runs_side_by_side(tmp_path: Path, capsys) -> None:
    a = write_run(tmp_path / "base", metrics_lines())
    b = write_run(
        tmp_path / "bf16", metrics_lines(steps=30, energy=False, events=False, slope=0.07), ledger=False
    )
    out = tmp_path / "compare.html"
    assert cli.main(["report", str(a), str(b), "--out", str(out)]) == 0
    document = out.read_text()
    summary = re.search(r'<table id="summary">.*?</table>', document).group(0)
    assert summary.count("<tr>") == 3 and "base" in summary and "bf16" in summary
    assert set(images(document)) == set(FIGURES)
    assert "Not measured: bf16." in document  # power and the ledger: only the first run has them
    printed = capsys.readouterr().out
    assert "base" in printed and "bf16" in printed


def test_equivalents_arithmetic() -> None:
    by_key = {eq.key: eq for eq in equivalents.EQUIVALENTS}
    assert set(by_key) == {"car_km", "phone_charges", "tree_years"}
    assert by_key["car_km"].factor == pytest.approx(0.2442, rel=1e-3)  # EPA 3.93e-4 t per mile, per km
    got = equivalents.compute(kwh=1.2, kgco2e=0.2442 * 10)
    assert got["car_km"] == pytest.approx(10.0, rel=1e-3)
    assert got["phone_charges"] == pytest.approx(100.0)  # 1.2 kWh / 0.012 kWh per charge
    assert got["tree_years"] == pytest.approx(0.2442 * 10 / 21.8)
    assert equivalents.compute(kwh=None, kgco2e=None) == dict.fromkeys(by_key)
    assert equivalents.compute(kwh=0.5, kgco2e=None)["phone_charges"] == pytest.approx(0.5 / 0.012)
    assert all(eq.source and eq.factor_text for eq in equivalents.EQUIVALENTS)


def test_cli_exit_codes(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-run"
    r = run_cli("report", str(missing))
    assert r.returncode == 2 and str(missing) in r.stderr and "does not exist" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli("report", str(empty))
    assert r.returncode == 2 and str(empty / "metrics.jsonl") in r.stderr and "Traceback" not in r.stderr
    assert cli.main(["report"]) == 2
    assert cli.main(["report", str(empty), "colour=red"]) == 2
    assert cli.main(["report", str(empty), "--out"]) == 2
    run = write_run(tmp_path / "run", metrics_lines(steps=10))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert cli.main(["report", str(run), f"out={blocker}/report.html"]) == 1  # cannot write: runtime failure
    assert cli.main(["report", str(run), "--help"]) == 0


def test_report_of_a_run_in_a_bucket(s3_bucket, tmp_path: Path) -> None:
    local = write_run(
        tmp_path / "s3-run",
        metrics_lines(),
        config="model:\n  name: <script>alert(1)</script>\nenergy:\n  pue: 1.1\n",  # bucket data: escaped
    )
    for name in ("metrics.jsonl", "summary.json", "config.yaml"):
        s3_bucket.client.upload_file(str(local / name), s3_bucket.name, f"team/s3-run/{name}")
    endpoint = f"storage.endpoint_url={s3_bucket.endpoint_url}"
    out = tmp_path / "bucket.html"
    path = report.make([f"s3://{s3_bucket.name}/team/s3-run"], out=out, storage_overrides=[endpoint])
    document = path.read_text()
    assert set(images(document)) == set(FIGURES)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in document and "<script" not in document
    assert f"s3://{s3_bucket.name}/team/s3-run" in document and "<td>1.1</td>" in document
    with pytest.raises(report.ReportError) as e:
        report.make([f"s3://{s3_bucket.name}/team/other"], out=out, storage_overrides=[endpoint])
    assert e.value.exit_code == 2 and "team/other/metrics.jsonl" in str(e.value)
    with pytest.raises(report.ReportError) as e:
        report.make(["s3://"], out=out)
    assert e.value.exit_code == 2


# --- rendering: what a browser makes of the file -----------------------------------------------------

# Added to a copy of the report for the test only (the report itself has no script): after load, write
# each <img>'s decoded width and every uncaught error into the DOM, where --dump-dom shows them.
PROBE = """<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(String(e.message || e)));
window.addEventListener("load", () => {
  const imgs = [...document.querySelectorAll("figure img")].map(
    i => ({figure: i.parentElement.id, complete: i.complete, width: i.naturalWidth}));
  const pre = document.createElement("pre");
  pre.id = "render-check";
  pre.textContent = JSON.stringify({imgs, errors: window.__errors});
  document.body.appendChild(pre);
});
</script>"""


def chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0"]
    cmd += [f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def render_problems(html_path: Path, tmp_path: Path) -> list[str]:
    """What is wrong with html_path in a browser: console errors, uncaught exceptions, undecoded figures."""
    probe = tmp_path / f"probe-{html_path.name}"
    probe.write_text(html_path.read_text().replace("<head>", "<head>" + PROBE, 1))
    r = chromium(["--dump-dom", probe.as_uri()], tmp_path / "profile")
    assert r.returncode == 0, r.stderr
    problems = [line for line in r.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    check = re.search(r'<pre id="render-check">(.*?)</pre>', r.stdout, re.S)
    if check is None:
        return [*problems, "the probe never ran (no load event?)"]
    result = json.loads(check.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    problems += [f"uncaught: {e}" for e in result["errors"]]
    problems += [
        f"{i['figure']}: not decoded" for i in result["imgs"] if not (i["complete"] and i["width"] > 0)
    ]
    drawn = {i["figure"] for i in result["imgs"]}
    problems += [f"fig-{key}: missing" for key in FIGURES if f"fig-{key}" not in drawn]
    return problems


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (apt-get install chromium)")
def test_the_report_renders_in_chromium(tmp_path: Path) -> None:
    a = write_run(tmp_path / "base", metrics_lines())
    b = write_run(
        tmp_path / "bf16", metrics_lines(steps=30, energy=False, slope=0.07, preempt_at=25), ledger=False
    )
    path = report.make([str(a), str(b)], out=tmp_path / "two.html")
    assert render_problems(path, tmp_path) == []
    shot = tmp_path / "two.png"
    r = chromium([f"--screenshot={shot}", "--window-size=1280,2400", path.as_uri()], tmp_path / "profile")
    assert r.returncode == 0 and shot.read_bytes().startswith(b"\x89PNG")
    assert not [line for line in r.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]

    # The check can fail: a figure that does not decode and a script error are both caught.
    broken = tmp_path / "broken.html"
    text = re.sub(
        r'(<figure id="fig-lr"><img [^>]*src="data:image/png;base64,)[^"]+', r"\1AAAA", path.read_text()
    )
    broken.write_text(text.replace("</body>", "<script>undefinedFunction()</script></body>"))
    problems = render_problems(broken, tmp_path)
    assert "fig-lr: not decoded" in problems
    assert any("Uncaught" in p for p in problems)
