"""What a run leaves behind for people: ``metrics.json``, the loss-curve PNG, the before/after eval table."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from lorakit.io import atomic_write_bytes


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    """``metrics.json``, replaced atomically."""
    atomic_write_bytes(path, (json.dumps(metrics, indent=2, sort_keys=True, default=str) + "\n").encode())


def plot_loss(history: list[dict[str, Any]], path: Path, title: str = "lorakit train") -> Path | None:
    """Training loss (and its running mean) per optimizer step, as a PNG; None when there is nothing to plot."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
    window = max(1, len(losses) // 20)
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, losses, color="#9ab", linewidth=1, label="loss per step")
    ax.plot(steps, smooth, color="#c33", linewidth=2, label=f"running mean ({window} steps)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy on completion tokens")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png")
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def side_by_side(before: Any, after: Any, samples: int = 4, width: int = 34) -> str:
    """A text table: exact-match before vs after, then a few eval prompts with both outputs."""
    lines = [
        f"exact match   before: {before.correct}/{before.total} = {before.accuracy:.1%}"
        f"   after: {after.correct}/{after.total} = {after.accuracy:.1%}",
    ]
    if hasattr(before, "contains") and hasattr(after, "contains"):
        lines.append(f"answer anywhere in output   before: {before.contains:.1%}   after: {after.contains:.1%}")
    if samples:
        lines.append("")
        lines.append(f"{'prompt':<{width}} | {'expected':<12} | {'before':<{width}} | after")
        lines.append("-" * (width * 3 + 24))
        for b, a in list(zip(before.samples, after.samples))[:samples]:
            lines.append(
                f"{_clip_left(b['prompt'], width):<{width}} | {_clip(b['expected'], 12):<12} | "
                f"{_clip(b['output'], width):<{width}} | {_clip(a['output'], width)} {'✓' if a['correct'] else '✗'}"
            )
    return "\n".join(lines)


def _clip_left(text: str, width: int) -> str:
    """The end of ``text`` (where a prompt's actual input usually is), ``…`` in front when cut."""
    text = " ".join(str(text).split())
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def _clip(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"
