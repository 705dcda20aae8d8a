"""densenet.analysis.reuse (`densenet reuse`, Figure 5): the figure names the trained network, warns when
it was barely trained, its panels do not overlap, and the canvas is sized to its panels with a readable
note."""
from __future__ import annotations

import densenet

from helpers import run_main


def test_reuse_names_the_trained_network_and_warns_when_barely_trained(digits_run, tmp_path, capsys):
    code, out, err = run_main(capsys, "reuse", digits_run, "--out", tmp_path / "reuse.png")
    assert code == 0 and (tmp_path / "reuse.png").is_file()
    assert "warning: this checkpoint was saved after 1 epoch" in err and "initialisation" in err
    from densenet.analysis.reuse import network_name

    assert network_name(densenet.create_model("densenet_bc_100_k12", depth=40)) == "DenseNet-BC (L=40, k=12)"
    assert network_name(densenet.create_model("densenet_40_k12")) == "DenseNet (L=40, k=12)"
    assert network_name(densenet.create_model("densenet121")) == "DenseNet-BC (L=121, k=32)"
    assert network_name(densenet.create_model("densenet_bc_100_k12", compression=1.0)) == "DenseNet-B (L=100, k=12)"


def test_reuse_figure_panels_do_not_overlap_and_the_framed_column_says_how_it_is_scaled():
    from densenet.analysis.reuse import feature_reuse, network_name, reuse_figure

    model = densenet.create_model("densenet_bc_100_k12", depth=40)
    fig = reuse_figure(feature_reuse(model), f"Feature reuse: {network_name(model)}")
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"][:3]
    assert len(axes) == 3
    for left, right in zip(axes, axes[1:]):
        frame = left.get_window_extent(r)
        for artist in [right.yaxis.label, *right.get_yticklabels()]:
            box = artist.get_window_extent(r)
            assert box.x1 < frame.x0 or box.x0 > frame.x1 or not artist.get_text(), artist.get_text()
    texts = [t.get_text().replace("\n", " ") for t in fig.texts]
    assert any("scaled to its own maximum" in t for t in texts)
    assert fig._suptitle.get_text() == "Feature reuse: DenseNet-BC (L=40, k=12)"


def test_reuse_figure_is_sized_to_its_panels_and_its_note_is_readable():
    """Issue 23: a third of the canvas was empty and the note below it was 8 pt (and off the figure). One
    panel per dense block, 3 for a CIFAR net and 4 for an ImageNet one; the panels fill the canvas but for
    their labels; every axes and the note lie within the figure; the note is >= 9 pt and meets no axes."""
    import matplotlib.pyplot as plt

    from densenet.analysis.reuse import feature_reuse, reuse_figure

    cifar = densenet.create_model("densenet_bc_100_k12", depth=16, growth_rate=4)
    imagenet = densenet.create_model("densenet121", growth_rate=4, block_config=(2, 3, 4, 3), num_classes=10)
    for model, n in ((cifar, 3), (imagenet, 4)):
        for title in ("Feature reuse: test", ""):
            fig = reuse_figure(feature_reuse(model), title)
            fig.canvas.draw()
            r, page, dpi = fig.canvas.get_renderer(), fig.bbox, fig.dpi
            panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
            assert len(panels) == n and len(fig.axes) == n + 1  # one panel per block, and the colour bar
            for ax in fig.axes:  # each axes, labels and ticks included, within the figure
                box = ax.get_tightbbox(r)
                assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= page.x1 and box.y1 <= page.y1, ax.get_label()
            frames = [ax.get_window_extent(r) for ax in panels]
            # the heatmaps take most of the canvas: what is left is their labels, titles, colour bar, note
            assert all(f.height / page.height >= 0.6 for f in frames), [f.height / page.height for f in frames]
            assert sum(f.width for f in frames) / page.width >= 0.7
            assert all((b.x0 - a.x1) / dpi < 0.8 for a, b in zip(frames, frames[1:]))  # no wide gaps between
            drawn = fig.get_tightbbox(r)  # inches: no empty margin around everything drawn
            width, height = fig.get_size_inches()
            assert max(drawn.x0, drawn.y0, width - drawn.x1, height - drawn.y1) < 0.25
            note = next(t for t in fig.texts if "framed column" in t.get_text())
            assert note.get_fontsize() >= 9
            box = note.get_window_extent(r)
            assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= page.x1
            assert not any(box.overlaps(ax.get_tightbbox(r)) for ax in fig.axes)
            plt.close(fig)
