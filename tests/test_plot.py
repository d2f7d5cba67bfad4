"""`dsmtp plot RUN... --out PNG`: several runs' curves, from their metrics.jsonl, in one figure."""

from __future__ import annotations

import json
import math

import matplotlib.image

from dsmtp.cli import main as dsmtp
from dsmtp.train import plot


def write_run(path, depth: int, losses: list[float], val_losses: list[float | None]) -> None:
    """Records as the trainer writes them: eval at 0 and 2, train at 1 and 2, 1000 tokens a step."""
    mtp = lambda loss: [None if loss is None else loss + k + 1 for k in range(depth)]  # noqa: E731
    records = [{"kind": "eval", "step": 0, "tokens": 0, "loss": val_losses[0], "mtp_loss": mtp(val_losses[0])}]
    for step, loss in enumerate(losses, start=1):
        records.append({"kind": "train", "step": step, "tokens": 1000 * step, "loss": loss, "mtp_loss": mtp(loss)})
    records.append({"kind": "eval", "step": 2, "tokens": 2000, "loss": val_losses[1], "mtp_loss": mtp(val_losses[1])})
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def lines_by_label(ax) -> dict[str, tuple[list, list]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_plot_overlays_runs(tmp_path, monkeypatch, capsys):
    write_run(tmp_path / "mtp", depth=2, losses=[5.0, 4.0], val_losses=[6.0, 4.5])
    write_run(tmp_path / "ntp", depth=0, losses=[5.5, 4.25], val_losses=[None, 4.75])
    figures = []
    save = plot.save_figure
    monkeypatch.setattr(plot, "save_figure", lambda fig, path: figures.append(fig.axes) or save(fig, path))
    png = tmp_path / "cmp.png"
    assert dsmtp(["plot", str(tmp_path / "mtp"), str(tmp_path / "ntp"), "--out", str(png)]) == 0

    (train_main, val_main, train_mtp, val_mtp), = figures
    assert lines_by_label(train_main) == {"mtp": ([1000, 2000], [5.0, 4.0]), "ntp": ([1000, 2000], [5.5, 4.25])}
    val = lines_by_label(val_main)
    assert val["mtp"] == ([0, 2000], [6.0, 4.5]) and math.isnan(val["ntp"][1][0]) and val["ntp"][1][1] == 4.75
    assert lines_by_label(train_mtp) == {"mtp depth 1": ([1000, 2000], [6.0, 5.0]),
                                         "mtp depth 2": ([1000, 2000], [7.0, 6.0])}
    assert lines_by_label(val_mtp)["mtp depth 2"] == ([0, 2000], [8.0, 6.5])
    assert matplotlib.image.imread(png).shape == (900, 1300, 4)

    out = capsys.readouterr().out
    assert "mtp        2       2,000     4.5000  5.5000 6.5000" in out
    assert "ntp        2       2,000     4.7500  -" in out


def test_plot_without_mtp_has_only_the_main_panels(tmp_path, monkeypatch):
    write_run(tmp_path / "ntp", depth=0, losses=[5.5, 4.25], val_losses=[6.0, 4.75])
    figures = []
    save = plot.save_figure
    monkeypatch.setattr(plot, "save_figure", lambda fig, path: figures.append(fig.axes) or save(fig, path))
    assert dsmtp(["plot", str(tmp_path / "ntp"), "--out", str(tmp_path / "p.png")]) == 0
    assert [ax.get_title() for ax in figures[0]] == ["train loss, main (next token)", "val loss, main (next token)"]


def test_plot_names_a_missing_run(tmp_path, capsys):
    assert dsmtp(["plot", str(tmp_path / "nowhere"), "--out", str(tmp_path / "p.png")]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nowhere' / 'metrics.jsonl'} does not exist" in err and "train.out_dir" in err
    assert not (tmp_path / "p.png").exists()


def test_runs_with_the_same_name_are_labelled_by_path(tmp_path):
    names = ("a/run", "b/run")
    for name in names:
        write_run(tmp_path / name, depth=1, losses=[5.0, 4.0], val_losses=[6.0, 4.5])
    runs = plot.read_runs([tmp_path / name for name in names])
    assert list(runs) == [str(tmp_path / name) for name in names]
