"""The report of a pipeline run directory (`rl pipeline`), from what its stages wrote: report.md, a
self-contained report.html (plots embedded as data URIs) and curves.png.

    rl report runs/pipeline_tiny        # regenerates it, for a finished or a running pipeline

What it reads: run.dir/pipeline.yaml (the stages, in order), stages/NAME.json (status, wall time),
stages/NAME.yaml (each stage's config), and each stage's metrics.jsonl (a quantize stage's holds one row
per format), hf/ (or reward_model/, FORMAT/hf) for the model's size. Nothing is recomputed: every number is
one a stage logged, so the table is what each loop measured on its own held-out set (the pretrain's
held-out problems, the SFT chats', the GRPO prompts'...: the same task, different draws).

The curves share one time axis, minutes of training: each stage occupies its wall time, and a step is
placed at step / max_steps of it (logged rows carry no clock; pauses between runs are left out).
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import struct
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from core.errors import InputError

PLOTS = (  # panel title, metrics (first present per stage is drawn solid, the rest dashed)
    ("loss (train/loss)", ("train/loss",)),
    ("reward (reward/mean)", ("reward/mean",)),
    ("held-out accuracy (solid: greedy, dashed: sampled)", ("eval/accuracy", "eval/sampled_accuracy")),
)
PERPLEXITY_KINDS = ("pretrain", "sft", "distill")  # eval/loss is the held-out token cross-entropy
KL = {"grpo": ("train/kl", "reference"), "ppo": ("reward/kl", "reference"), "distill": ("eval/kl", "teacher")}


@dataclass
class StageRun:
    """One stage as the run directory holds it."""

    index: int
    name: str
    kind: str
    run_dir: Path
    output: Path
    state: dict[str, Any]
    config: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def status(self) -> str:
        return self.state.get("status", "pending")

    @property
    def wall_time_s(self) -> float | None:
        if "wall_time_s" in self.state:
            return float(self.state["wall_time_s"])
        if self.status == "running":  # as far as it got: until its newest row was written
            metrics = self.run_dir / "metrics.jsonl"
            end = metrics.stat().st_mtime if metrics.is_file() else time.time()
            return max(0.0, end - datetime.fromisoformat(self.state["started"]).timestamp())
        return None

    @property
    def max_steps(self) -> int:
        return int(self.config.get("train", {}).get("max_steps") or 1)

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(int(r["step"]), float(r[key])) for r in self.rows if _number(r.get(key)) and "step" in r]

    def last(self, key: str) -> float | None:
        values = self.series(key)
        return values[-1][1] if values else None

    def first(self, key: str) -> float | None:
        values = self.series(key)
        return values[0][1] if values else None


def load_stages(run_dir: Path) -> list[StageRun]:
    """The stages of a pipeline run directory with their rows; InputError when it is none."""
    manifest = run_dir / "pipeline.yaml"
    if not manifest.is_file():
        raise InputError(
            f"{run_dir} is not a pipeline run directory (no pipeline.yaml; `rl pipeline` writes it)"
        )
    stages = []
    for i, spec in enumerate(yaml.safe_load(manifest.read_text())["stages"], start=1):
        name = spec["name"]
        state_file, config_file = run_dir / "stages" / f"{name}.json", run_dir / "stages" / f"{name}.yaml"
        state = json.loads(state_file.read_text()) if state_file.is_file() else {}
        config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
        stage = StageRun(i, name, spec["kind"], Path(spec["run_dir"]), Path(spec["output"]), state, config)
        stage.rows = read_rows(stage.run_dir / "metrics.jsonl")
        stages.append(stage)
    return stages


def read_rows(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows, less a line a running stage is writing."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


# ---- the numbers ------------------------------------------------------------------------------------------

COLUMNS = (
    "stage",
    "kind",
    "status",
    "steps",
    "greedy accuracy",
    "sampled accuracy",
    "perplexity",
    "reward",
    "KL",
    "params",
    "weight bytes",
    "wall time",
)


def stage_row(stage: StageRun) -> dict[str, str]:
    """One line of the table: what the stage's loop measured, start -> end where it evaluated at step 0."""
    if stage.kind == "quantize":
        return _quantize_row(stage)
    steps = max((int(r["step"]) for r in stage.rows if "step" in r), default=0)
    acc = "" if stage.kind == "rm" else _start_end(stage, "eval/accuracy")  # rm's is pairwise
    loss = stage.last("eval/loss") if stage.kind in PERPLEXITY_KINDS else None
    params, size = model_size(stage.output)
    return {
        "stage": stage.name,
        "kind": stage.kind,
        "status": stage.status,
        "steps": f"{steps}/{stage.max_steps}" if stage.rows else "",
        "greedy accuracy": acc,
        "sampled accuracy": _start_end(stage, "eval/sampled_accuracy"),
        "perplexity": f"{math.exp(loss):.3f}" if loss is not None and loss < 50 else "",
        "reward": _reward(stage),
        "KL": _kl(stage),
        "params": f"{params:,}" if params else "",
        "weight bytes": f"{size:,}" if size else "",
        "wall time": _duration(stage.wall_time_s),
    }


def _start_end(stage: StageRun, key: str) -> str:
    first, last = stage.first(key), stage.last(key)
    if last is None:
        return ""
    starts_at_0 = stage.series(key)[0][0] == 0 and len(stage.series(key)) > 1
    return f"{first:.3f} → {last:.3f}" if starts_at_0 else f"{last:.3f}"


def _reward(stage: StageRun) -> str:
    if stage.kind in ("grpo", "ppo"):
        values = [v for _, v in stage.series("reward/mean")][-5:]
        return f"{sum(values) / len(values):.3f} (mean of last {len(values)} steps)" if values else ""
    if stage.kind == "dpo" and stage.last("eval/rewards/margins") is not None:
        return f"margin {stage.last('eval/rewards/margins'):.3f}, pairs right {stage.last('eval/rewards/accuracies'):.3f}"
    if stage.kind == "rm" and stage.last("eval/accuracy") is not None:
        return f"pairwise accuracy {stage.last('eval/accuracy'):.3f}"
    return ""


def _kl(stage: StageRun) -> str:
    key, to = KL.get(stage.kind, (None, None))
    loss = stage.config.get("algorithm", {}).get("loss", {})
    if stage.kind == "grpo" and not (isinstance(loss, dict) and loss.get("kl_coef")):
        return ""  # no reference model: GRPO logs train/kl = 0
    value = stage.last(key) if key else None
    return f"{value:.4f} (to the {to})" if value is not None else ""


def _quantize_row(stage: StageRun) -> dict[str, str]:
    rows = {r["format"]: r for r in stage.rows if "format" in r}
    formats = stage.config.get("quantize", {}).get("formats", [])
    chosen = rows.get(formats[0]) if formats else None
    base = rows.get("none")
    row = dict.fromkeys(COLUMNS, "")
    row |= {
        "stage": stage.name,
        "kind": stage.kind,
        "status": stage.status,
        "wall time": _duration(stage.wall_time_s),
    }
    if chosen is not None and base is not None:
        row["greedy accuracy"] = f"{base['accuracy']:.3f} → {chosen['export_accuracy']:.3f} ({formats[0]})"
        row["perplexity"] = f"{base['perplexity']:.3f} → {chosen['export_perplexity']:.3f}"
        row["weight bytes"] = f"{int(base['weight_bytes']):,} → {int(chosen['weight_bytes']):,}"
    return row


def quantize_table(stage: StageRun) -> list[dict[str, str]]:
    """Before/after per format, as `rl quantize` wrote them (its report.md's numbers)."""
    rows = [r for r in stage.rows if "format" in r]
    base = next((r for r in rows if r["format"] == "none"), None)
    out = []
    for r in rows:
        ratio = r["weight_bytes"] / base["weight_bytes"] if base else float("nan")
        out.append(
            {
                "format": "none (source)" if r["format"] == "none" else r["format"],
                "accuracy": f"{r['accuracy']:.3f}",
                "perplexity": f"{r['perplexity']:.4f}",
                "exported accuracy": f"{r['export_accuracy']:.3f}",
                "exported perplexity": f"{r['export_perplexity']:.4f}",
                "weight bytes": f"{int(r['weight_bytes']):,}",
                "vs. source": f"{ratio:.2f}x",
            }
        )
    return out


def model_size(output: Path) -> tuple[int | None, int | None]:
    """(parameters, bytes of the weights) of the model a stage wrote, from safetensors headers (no weights
    are read); (None, None) before it wrote one."""
    for directory in (output / "hf", output / "reward_model", output):
        files = sorted(directory.glob("*.safetensors")) if directory.is_dir() else []
        if files:
            params = size = 0
            for file in files:
                with file.open("rb") as f:
                    (length,) = struct.unpack("<Q", f.read(8))
                    header = json.loads(f.read(length))
                for name, info in header.items():
                    if name != "__metadata__":
                        params += math.prod(info["shape"])
                        size += info["data_offsets"][1] - info["data_offsets"][0]
            return params, size
    return None, None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


# ---- the curves -------------------------------------------------------------------------------------------


def spans(stages: list[StageRun]) -> list[tuple[StageRun, float, float]]:
    """(stage, start, end) in minutes of training, one after the other; stages not started are left out."""
    out, t = [], 0.0
    for stage in stages:
        wall = stage.wall_time_s
        if wall is None:
            continue
        out.append((stage, t, t + wall / 60))
        t += wall / 60
    return out


def plot_curves(stages: list[StageRun], out: Path) -> Path | None:
    """curves.png: loss, reward and held-out accuracy of every stage on one time axis (module docstring)."""
    placed = spans(stages)
    if not placed:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(len(PLOTS), 1, figsize=(11, 2.6 * len(PLOTS)), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, keys) in zip(axes, PLOTS):
        for stage, t0, t1 in placed:
            color = colors[(stage.index - 1) % len(colors)]
            for k, key in enumerate(keys):
                points = stage.series(key)
                xs = [t0 + (t1 - t0) * min(step / stage.max_steps, 1.0) for step, _ in points]
                style = {"linestyle": "-" if k == 0 else "--", "color": color}
                if points:
                    ax.plot(xs, [v for _, v in points], marker="." if len(points) < 30 else None, **style)
            if stage.kind == "quantize" and "accuracy" in keys[0]:
                rows = [r for r in stage.rows if "format" in r]
                ax.scatter([t1] * len(rows), [r["export_accuracy"] for r in rows], color=color, marker="x")
        for stage, t0, t1 in placed:
            ax.axvspan(t0, t1, color="grey", alpha=0.06 if stage.index % 2 else 0.0)
        ax.set_title(title, fontsize=10, loc="left")
        ax.grid(alpha=0.3)
    handles = [
        Line2D([], [], color=colors[(s.index - 1) % len(colors)], label=f"{s.index}. {s.name}")
        for s, _, _ in placed
    ]
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 6), frameon=False)
    axes[-1].set_xlabel("minutes of training (each stage its wall time; a step at step / max_steps of it)")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ---- the documents ----------------------------------------------------------------------------------------


def write_report(run_dir: str | Path) -> Path:
    """report.md, report.html and curves.png in the pipeline's run directory; returns report.md's path."""
    run_dir = Path(run_dir)
    stages = load_stages(run_dir)
    table = [stage_row(s) for s in stages]
    quantized = [(s, quantize_table(s)) for s in stages if s.kind == "quantize" and s.rows]
    plot = plot_curves(stages, run_dir / "curves.png")
    finished = sum(s.status == "done" for s in stages)
    title = f"Pipeline {run_dir.name}: {finished} of {len(stages)} stages done"
    notes = [
        "Each stage's numbers are its own loop's held-out evaluation (start → end: at step 0 and at its last "
        "evaluation). Perplexity: exp(held-out response cross-entropy) of pretrain, sft and distill. "
        "KL: GRPO's train/kl and PPO's reward/kl to their reference, distill's eval/kl to its teacher. "
        "Params and bytes: the stage's exported weights (hf/). The quantize stage's accuracy and perplexity are "
        "`rl quantize`'s, before → after, on its own held-out rows (perplexity over whole texts, prompt included).",
    ]
    md = [f"# {title}", "", *notes, "", *_markdown(table)]
    for stage, rows in quantized:
        md += ["", f"## Quantized export ({stage.name}: {stage.run_dir})", "", *_markdown(rows)]
    if plot is not None:
        md += ["", "## Curves", "", f"![loss, reward and accuracy of every stage]({plot.name})"]
    (run_dir / "report.md").write_text("\n".join(md) + "\n")
    (run_dir / "report.html").write_text(_html(title, notes, table, quantized, plot))
    return run_dir / "report.md"


def _markdown(rows: list[dict[str, str]]) -> list[str]:
    if not rows:
        return []
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return lines + ["| " + " | ".join(r[k] or "" for k in keys) + " |" for r in rows]


def _html_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(_html_cell(r[k] or "") for k in keys) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_cell(text: str) -> str:
    """Numbers (a cell that starts with a digit) right-aligned, words left-aligned; "a → b" never wraps (what
    follows it, such as "(fp8)", may)."""
    body = html.escape(text).replace(" → ", "&nbsp;→&nbsp;")
    return f'<td class="n">{body}</td>' if text[:1].isdigit() else f"<td>{body}</td>"


def _html_text(text: str) -> str:
    """Escaped, with the markdown `code` spans of the notes as <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _html(title: str, notes: list[str], table: list[dict], quantized: list, plot: Path | None) -> str:
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        *(f"<p>{_html_text(n)}</p>" for n in notes),
        _html_table(table),
    ]
    for stage, rows in quantized:
        parts += [f"<h2>Quantized export ({html.escape(stage.name)})</h2>", _html_table(rows)]
    if plot is not None:
        data = base64.b64encode(plot.read_bytes()).decode()
        parts += ["<h2>Curves</h2>", f'<img alt="curves" src="data:image/png;base64,{data}">']
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}td.n{text-align:right}"
        "th{background:#f4f4f4}code{background:#f4f4f4;padding:0 3px}img{max-width:100%}"
    )
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n"
    )
